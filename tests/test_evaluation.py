import json

import pytest

from hf_ntl.data.transforms import ImagePreprocessor
from hf_ntl.evaluation import EvaluateArguments, format_report_table, run_evaluation
from hf_ntl.metrics.slc_auc import slc_auc
from hf_ntl.models import build_tiny_classifier


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


def test_report_files_and_every_point(report):
    result, out = report
    saved = json.loads((out / "report.json").read_text())
    assert saved["points"] == result["points"]
    assert (out / "learning_curves.png").stat().st_size > 1000
    # 3 attacks x (model, original, scratch) x 2 seeds x 2 counts, each with its own record.
    assert len(result["points"]) == 3 * 3 * 2 * 2
    assert set(result["points"][0]) == {"model", "attack", "num_samples", "seed", "accuracy", "steps", "seconds"}
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
    curves, worst = result["curves"], result["worst_case_curves"]
    for label in ("model", "original", "scratch"):
        for n in (5, 10):
            assert worst[label][n] == max(curves[label][attack][n] for attack in curves[label])
    for label in ("model", "original"):
        for attack, score in result["slc_auc"][label]["per_attack"].items():
            model_curve, scratch_curve = curves[label][attack], curves["scratch"][attack]
            assert score == slc_auc([5, 10], [model_curve[5], model_curve[10]], [scratch_curve[5], scratch_curve[10]])
        expected = slc_auc([5, 10], [worst[label][5], worst[label][10]], [worst["scratch"][5], worst["scratch"][10]])
        assert result["slc_auc"][label]["worst_case"] == expected
        per_attack = result["slc_auc"][label]["per_attack"]
        strongest = result["slc_auc"][label]["strongest_attack"]
        assert per_attack[strongest]["slc_auc"] == max(score["slc_auc"] for score in per_attack.values())
    table = format_report_table(result)
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
    assert result["counts"] == [7, 13]  # of 1,347 uci-digits train samples
    assert result["fractions"] == pytest.approx([7 / 1347, 13 / 1347])


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
    with pytest.raises(ValueError, match=r"1\.\.1347"):
        run_evaluation(arguments(checkpoints, counts=[10, 5000]), progress=False)
    with pytest.raises(ValueError, match="at least two distinct"):
        run_evaluation(arguments(checkpoints, counts=[10, 10]), progress=False)
    with pytest.raises(ValueError, match="Unknown attack name"):
        run_evaluation(arguments(checkpoints, attacks=["jailbreak"]), progress=False)
    with pytest.raises(ValueError, match="at least one seed"):
        arguments(checkpoints, seeds=[])
