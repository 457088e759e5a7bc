import json
import shutil

import pytest
import torch
from datasets import concatenate_datasets

from hf_ntl.artifacts import write_record, write_samples
from hf_ntl.attacks import EncodedOnDemand, EncodedSplit, load_suite
from hf_ntl.data import load_image_classification_dataset, stratified_order
from hf_ntl.data.fingerprint import SampleSet
from hf_ntl.data.loading import validation_split
from hf_ntl.data.transforms import ImagePreprocessor
from hf_ntl.evaluation import EvaluateArguments, report_tables, run_attacks, run_evaluation
from hf_ntl.leakage import TestOverlapError, training_samples
from hf_ntl.metrics.slc_auc import slc_auc
from hf_ntl.models import build_tiny_classifier, load_classifier
from hf_ntl.terminal import tables_text


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoints")
    for name, classes, seed in (("ten", 10, 0), ("original", 10, 1), ("five", 5, 2)):
        build_tiny_classifier("tiny-resnet", classes, seed=seed).save_pretrained(root / name)
        ImagePreprocessor().save_pretrained(root / name)
    return root


def arguments(checkpoints, **overrides):
    values = {
        "model_name_or_path": str(checkpoints / "ten"),
        "target_dataset": "uci-digits",
        "suite": "quick",
        "steps": 3,
        "counts": [5, 10],
        "seeds": [0, 1],
    }
    return EvaluateArguments(**{**values, **overrides})


@pytest.fixture(scope="module")
def report(checkpoints, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    args = arguments(checkpoints, original_model_name_or_path=str(checkpoints / "original"), output_dir=str(out))
    return run_evaluation(args, progress=False), out


def test_report_files_and_every_point(checkpoints, report):
    result, out = report
    saved = json.loads((out / "report.json").read_text())
    assert saved["points"] == result["points"]
    assert (out / "learning_curves.png").stat().st_size > 1000
    # 3 attacks x (model, original, scratch) x 2 seeds x 2 counts, each with its own record.
    assert len(result["points"]) == 3 * 3 * 2 * 2
    assert set(result["points"][0]) == {
        "model", "attack", "num_samples", "seed", "accuracy", "validation_accuracy", "steps", "seconds"
    }  # fmt: skip
    assert result["target_validation_samples"] == 200 and result["target_train_samples"] == 1347 - 200
    # Untrained checkpoints saved by hand record no training data: checked, nothing found, and said so.
    assert result["test_overlap"]["total"] == 0
    assert result["test_overlap"]["unrecorded"] == {
        "model": [str(checkpoints / "ten")],
        "original": [str(checkpoints / "original")],
    }
    assert result["steps_per_count"] == {5: [3], 10: [3]}
    # The report names the samples behind every figure: split, count and a fingerprint of their content.
    samples = result["samples"]
    assert [samples[role]["samples"] for role in ("train pool", "validation", "test")] == [1147, 200, 450]
    assert samples["validation"]["split"] == "train" and samples["test"]["split"] == "test"
    assert len({samples[role]["fingerprint"] for role in samples}) == 3
    assert set(result["zero_shot_accuracy"]) == {"model", "original"}


def test_scratch_and_model_share_every_protocol(report):
    result, _ = report
    for spec in result["suite"]:
        runs = {
            label: sorted(
                (p["seed"], p["num_samples"], p["steps"])
                for p in result["points"]
                if p["attack"] == spec["name"] and p["model"] == label
            )
            for label in ("model", "original", "scratch")
        }
        assert runs["model"] == runs["scratch"] == runs["original"]
        assert {steps for _, _, steps in runs["model"]} == {spec["steps"]} == {3}


def test_scores_follow_from_the_curves(report):
    result, _ = report
    curves, worst, chosen = result["curves"], result["worst_case_curves"], result["worst_case_attacks"]
    validation = result["validation_curves"]
    for label in ("model", "original", "scratch"):
        for n in (5, 10):
            # The worst case is the validation argmax, read on test.
            best = max(validation[label][attack][n] for attack in validation[label])
            assert validation[label][chosen[label][n]][n] == best
            assert worst[label][n] == curves[label][chosen[label][n]][n]
    for label in ("model", "original"):
        for attack, score in result["slc_auc"][label]["per_attack"].items():
            model_curve, scratch_curve = curves[label][attack], curves["scratch"][attack]
            assert score == slc_auc([5, 10], [model_curve[5], model_curve[10]], [scratch_curve[5], scratch_curve[10]])
        expected = slc_auc([5, 10], [worst[label][5], worst[label][10]], [worst["scratch"][5], worst["scratch"][10]])
        assert result["slc_auc"][label]["worst_case"] == expected
        per_attack = result["slc_auc"][label]["per_attack_validation"]
        strongest = result["slc_auc"][label]["strongest_attack"]
        assert per_attack[strongest]["slc_auc"] == max(score["slc_auc"] for score in per_attack.values())
    table = tables_text(report_tables(result))
    assert "worst case" in table and "lora-r4" in table


def test_same_seed_same_report(checkpoints, report):
    first, _ = report
    again = run_evaluation(
        arguments(checkpoints, original_model_name_or_path=str(checkpoints / "original")), progress=False
    )

    def without_time(points):
        return [{k: v for k, v in p.items() if k != "seconds"} for p in points]

    assert without_time(again["points"]) == without_time(first["points"])
    assert again["slc_auc"] == first["slc_auc"]


def test_fractions_become_counts(checkpoints):
    result = run_evaluation(
        arguments(checkpoints, fractions=[0.005, 0.01], attacks=["full"], seeds=[0]), progress=False
    )
    assert result["counts"] == [6, 11]  # of uci-digits' 1,347 train samples less the 200 of validation
    assert result["fractions"] == pytest.approx([6 / 1147, 11 / 1147])


def test_class_count_mismatch_when_the_head_is_kept(checkpoints):
    with pytest.raises(ValueError, match=r"5-way head but the target has 10 classes.*\['full', 'lora-r4'\]"):
        run_evaluation(arguments(checkpoints, model_name_or_path=str(checkpoints / "five")), progress=False)
    # A suite of head-replacing attacks, or an explicit fresh head, is fine.
    probe_only = arguments(checkpoints, model_name_or_path=str(checkpoints / "five"), attacks=["head-only"], seeds=[0])
    assert set(run_evaluation(probe_only, progress=False)["slc_auc"]["model"]["per_attack"]) == {"head-only"}
    fresh = arguments(checkpoints, model_name_or_path=str(checkpoints / "five"), replace_head=True, seeds=[0])
    assert run_evaluation(fresh, progress=False)["zero_shot_accuracy"] == {}


def test_bad_grids_and_names(checkpoints):
    with pytest.raises(ValueError, match="empty"):
        run_evaluation(arguments(checkpoints, counts=[]), progress=False)
    with pytest.raises(ValueError, match=r"1\.\.1147 \(the target train split less 200 validation\)"):
        run_evaluation(arguments(checkpoints, counts=[10, 5000]), progress=False)
    with pytest.raises(ValueError, match="at least two distinct"):
        run_evaluation(arguments(checkpoints, counts=[10, 10]), progress=False)
    with pytest.raises(ValueError, match="Unknown attack name"):
        run_evaluation(arguments(checkpoints, attacks=["jailbreak"]), progress=False)
    with pytest.raises(ValueError, match="at least one seed"):
        arguments(checkpoints, seeds=[])


def _trained_on(folder, images, dataset="uci-digits"):
    """Give a checkpoint a record saying it was trained on `images` (as a protection stage writes it)."""
    samples = {"protection: target train": SampleSet.of(images, dataset, "train", 32)}
    write_record(folder, {"stage": "protected", "source_model": "tiny-resnet"})
    write_samples(folder, samples)


def test_leakage_guard_refuses_test_images_before_any_fine_tuning(checkpoints, tmp_path, monkeypatch):
    uci = load_image_classification_dataset("uci-digits")
    leaky, clean = tmp_path / "leaky", tmp_path / "clean"
    for folder in (leaky, clean):
        shutil.copytree(checkpoints / "ten", folder)
    # Three test scans hidden among train scans, as the seed-dependent split once did.
    _trained_on(leaky, concatenate_datasets([uci["train"].select(range(20)), uci["test"].select([0, 5, 9])]))
    _trained_on(clean, uci["train"].select(validation_split(uci["train"]["label"], 200)[1][:23]))

    def no_training(*args, **kwargs):
        raise AssertionError("fine-tuning started before the leakage check")

    monkeypatch.setattr("hf_ntl.evaluation.finetuned_accuracies", no_training)
    with pytest.raises(TestOverlapError, match=r"3 test image\(s\).*protection: target train.*--allow_test_overlap"):
        run_evaluation(arguments(checkpoints, model_name_or_path=str(leaky)), progress=False)
    monkeypatch.undo()

    clean_report = run_evaluation(arguments(checkpoints, model_name_or_path=str(clean), seeds=[0]), progress=False)
    assert clean_report["test_overlap"]["total"] == 0
    assert list(clean_report["test_overlap"]["counts"]["model"].values()) == [0]

    allowed = arguments(checkpoints, model_name_or_path=str(leaky), seeds=[0], allow_test_overlap=True)
    overlap = run_evaluation(allowed, progress=False)["test_overlap"]
    assert overlap["allowed"] and overlap["total"] == 3
    assert overlap["counts"]["model"] == {f"protection: target train [{leaky}]": 3}


def test_leakage_guard_refuses_a_protection_trained_on_the_validation_split(checkpoints, tmp_path, monkeypatch):
    uci = load_image_classification_dataset("uci-digits")["train"]
    validation, pool = validation_split(uci["label"], 200)
    beyond_150 = sorted(set(validation) - set(validation_split(uci["label"], 150)[0]))  # smaller splits nest
    leaky = tmp_path / "leaky"
    shutil.copytree(checkpoints / "ten", leaky)
    # What a protection drawing from the whole train split once did: four of the audit's validation images.
    _trained_on(leaky, uci.select([*pool[:20], *beyond_150[:4]]))

    def no_training(*args, **kwargs):
        raise AssertionError("fine-tuning started before the leakage check")

    monkeypatch.setattr("hf_ntl.evaluation.finetuned_accuracies", no_training)
    with pytest.raises(
        TestOverlapError, match=r"4 validation image\(s\).*audit_validation_samples.*--allow_test_overlap"
    ):
        run_evaluation(arguments(checkpoints, model_name_or_path=str(leaky)), progress=False)
    # Fewer validation samples than the protection reserved: the audit chooses on images it never saw.
    monkeypatch.undo()
    smaller = run_evaluation(
        arguments(checkpoints, model_name_or_path=str(leaky), validation_samples=150, seeds=[0]), progress=False
    )
    assert smaller["validation_overlap"]["total"] == 0 == smaller["test_overlap"]["total"]
    allowed = arguments(checkpoints, model_name_or_path=str(leaky), seeds=[0], allow_test_overlap=True)
    overlap = run_evaluation(allowed, progress=False)["validation_overlap"]
    assert overlap["allowed"] and overlap["counts"]["model"] == {f"protection: target train [{leaky}]": 4}


def test_leakage_guard_follows_the_chain_of_records_to_the_source_fit(checkpoints, tmp_path):
    uci = load_image_classification_dataset("uci-digits")
    source, protected = tmp_path / "source", tmp_path / "protected"
    shutil.copytree(checkpoints / "original", source)
    shutil.copytree(checkpoints / "ten", protected)
    write_record(source, {"stage": "source", "base_model": "tiny-resnet"})
    write_samples(source, {"source fit": SampleSet.of(uci["test"].select([1, 2]), "uci-digits", "test", 32)})
    write_record(protected, {"stage": "protected", "source_model": str(source)})
    write_samples(protected, {})
    with pytest.raises(TestOverlapError, match=r"2 test image\(s\).*source fit"):
        run_evaluation(arguments(checkpoints, model_name_or_path=str(protected)), progress=False)


def test_the_record_chain_is_followed_through_base_models_and_gaps_are_named(tmp_path):
    uci = load_image_classification_dataset("uci-digits")
    pretrain, source, protected = tmp_path / "pretrain", tmp_path / "source", tmp_path / "protected"
    for folder, record, images in (
        (pretrain, {"stage": "source", "base_model": "tiny-resnet"}, uci["test"].select([3])),
        (source, {"stage": "source", "base_model": str(pretrain)}, uci["train"].select([0])),
        (protected, {"stage": "protected", "source_model": str(source)}, uci["train"].select([1])),
    ):
        folder.mkdir()
        write_record(folder, record)
        write_samples(folder, {"fit": SampleSet.of(images, "uci-digits", "train", 32)})
    sets, unrecorded = training_samples(protected)
    assert sorted(sets) == sorted(f"fit [{folder}]" for folder in (pretrain, source, protected))
    assert unrecorded == []  # the chain ends at a tiny preset: random weights, nothing to check
    # A fine-tuned Hub checkpoint or a folder that moved: not checked, and said so.
    write_record(pretrain, {"stage": "source", "base_model": "microsoft/resnet-18"})
    assert training_samples(protected)[1] == ["microsoft/resnet-18"]
    write_record(source, {"stage": "source", "base_model": str(tmp_path / "moved")})
    assert training_samples(protected)[1] == [str(tmp_path / "moved")]


def test_an_audit_encodes_only_the_train_samples_its_runs_use(checkpoints):
    # Memory bounded by the counts, not by the train split: only the first max(counts) of each seed's order.
    dataset = load_image_classification_dataset("uci-digits")
    preprocessor = ImagePreprocessor()
    pool = EncodedOnDemand(dataset["train"], preprocessor)
    scored = EncodedSplit.from_dataset(dataset["test"].select(range(20)), preprocessor)
    suite = load_suite("quick", steps=2)[:1]
    model = {"model": load_classifier(checkpoints / "ten")}
    run_attacks(model, pool, scored, scored, suite, counts=[5, 12], seeds=[0, 1], progress=False)
    used = set().union(*(stratified_order(pool.labels.numpy(), seed)[:12].tolist() for seed in (0, 1)))
    assert set(pool.encoded) == used and len(used) <= 24 < len(pool)
    some = sorted(used)[:5]
    torch.testing.assert_close(pool.select(some).pixel_values, preprocessor(dataset["train"].select(some)["image"]))
