import copy
import itertools
import json
import math

import numpy as np
import pytest
import torch

from hf_ntl.artifacts import read_samples
from hf_ntl.data import ImagePreprocessor, load_image_classification_dataset, stratified_subset
from hf_ntl.data.fingerprint import image_hashes
from hf_ntl.data.loading import AUDIT_VALIDATION_SAMPLES, validation_split
from hf_ntl.losses import capped_cross_entropy, fisher_ratio
from hf_ntl.models import build_tiny_classifier, load_classifier
from hf_ntl.protect import _target_pool, run_ntp
from hf_ntl.pruning import STATE_TENSORS, AdmmState, keep_count, project_topk
from hf_ntl.trainers import NTPConfig, NTPTrainer

# ----------------------------------------------------------------------------- the maths


def test_fisher_ratio_matches_a_hand_computation():
    features = torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, 2.0], [0.0, 1.0], [1.0, 1.0]])
    labels = torch.tensor([0, 0, 1, 1, 2])
    f = features.numpy() / np.linalg.norm(features.numpy(), axis=1, keepdims=True)
    y = labels.numpy()
    means = {c: f[y == c].mean(0) for c in (0, 1, 2)}
    within = sum(((f[i] - means[y[i]]) ** 2).sum() for i in range(5)) / 5
    between = sum((y == c).sum() / 5 * ((means[c] - f.mean(0)) ** 2).sum() for c in (0, 1, 2))
    assert fisher_ratio(features, labels).item() == pytest.approx(between / (within + 1e-8), rel=1e-5)
    # A class label of 7 works the same as 2: any number and numbering of classes.
    assert fisher_ratio(features, torch.tensor([0, 0, 1, 1, 7])).item() == pytest.approx(between / within, rel=1e-5)


def test_capped_target_term_value_and_gradient():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]], requires_grad=True)
    labels = torch.tensor([0, 2])
    ce = torch.nn.functional.cross_entropy(logits, labels)
    p = torch.softmax(logits.detach(), dim=1)
    by_hand = -(math.log(p[0, 0]) + math.log(p[1, 2])) / 2
    assert ce.item() == pytest.approx(by_hand, rel=1e-6)
    assert capped_cross_entropy(logits, labels, cap=10.0).item() == pytest.approx(by_hand, rel=1e-6)
    capped = capped_cross_entropy(logits, labels, cap=0.5)
    assert capped.item() == 0.5
    capped.backward()
    assert torch.all(logits.grad == 0)  # above the cap NTP stops pushing


def test_topk_projection_is_global_and_exact():
    values = {"a": torch.tensor([[0.1, -5.0], [0.3, 0.2]]), "b": torch.tensor([4.0, -0.5, 3.0])}
    projected = project_topk(values, keep=3)
    assert projected["a"].tolist() == [[0.0, -5.0], [0.0, 0.0]]
    assert projected["b"].tolist() == [4.0, 0.0, 3.0]  # the three largest magnitudes over both tensors
    assert keep_count(1000, 0.9) == 100


def test_admm_update_follows_the_scaled_form():
    weights = {"w": torch.tensor([1.0, -2.0, 0.5, 3.0])}
    state = AdmmState.start(weights, keep=2, rho=0.1)
    assert state.z["w"].tolist() == [0.0, -2.0, 0.0, 3.0] and state.u["w"].tolist() == [0.0] * 4
    assert state.penalty(weights).item() == pytest.approx(0.5 * 0.1 * (1.0 + 0.25))
    record = state.update(weights, "topk", keep=2, l1_delta=0.0)
    assert state.u["w"].tolist() == [1.0, 0.0, 0.5, 0.0]  # U + W - Z
    assert state.masks["w"].tolist() == [False, True, False, True]
    assert record == {"round": 1, "primal_residual": pytest.approx(math.sqrt(1.25)), "mask_changes": 0,
                      "z_sparsity": 0.5}  # fmt: skip
    assert state.history == [record]


def test_the_support_of_z_follows_the_weights_between_rounds():
    # The Z-step projects over all prunable weights: a weight that grows enters the support, one that
    # shrinks leaves it (restricted to the previous support, it could never come back).
    state = AdmmState.start({"w": torch.tensor([1.0, -2.0, 0.5, 3.0])}, keep=2, rho=0.1)
    record = state.update({"w": torch.tensor([4.0, -2.0, 0.5, 0.1])}, "topk", keep=2, l1_delta=0.0)
    assert state.masks["w"].tolist() == [True, True, False, False] and record["mask_changes"] == 2
    assert state.z["w"].tolist() == [4.0, -2.0, 0.0, 0.0] and not state.pruned


# ----------------------------------------------------------------------------- the trainer


@pytest.fixture(scope="module")
def data():
    source = load_image_classification_dataset("textured-shapes", num_train=64, num_test=20)
    target = load_image_classification_dataset("uci-digits")
    return source, stratified_subset(target["train"], 40, seed=0)


def config(tmp_path, **overrides):
    values = {
        "output_dir": str(tmp_path / "ntp"),
        "report_to": "none",
        "disable_tqdm": True,
        "admm_rounds": 2,
        "steps_per_round": 3,
        "retrain_steps": 2,
        "per_device_train_batch_size": 16,
        "probe_steps": 20,
        "sparsity": 0.8,
        "logging_steps": 1,
    }
    return NTPConfig(**{**values, **overrides})


def make_trainer(args, data, preset="tiny-resnet", seed=0):
    source, target_train = data
    model = build_tiny_classifier(preset, 10, seed=seed)
    return NTPTrainer(model, args, source["train"], target_train, ImagePreprocessor(), source_eval=source["test"])


def nonzeros(trainer):
    return sum(int((p != 0).sum()) for p in trainer.prunable.values())


def test_exact_sparsity_and_exact_zeros_after_training_and_reload(tmp_path, data):
    trainer = make_trainer(config(tmp_path), data)
    trainer.train()
    assert nonzeros(trainer) == trainer.keep  # exact, to one weight
    for name, param in trainer.prunable.items():
        assert torch.all(param[~trainer.admm.masks[name]] == 0)
    assert trainer.sparsity()["overall"] == pytest.approx(1 - trainer.keep / trainer.sparsity()["prunable_weights"])
    trainer.model.save_pretrained(tmp_path / "saved")
    reloaded = dict(load_classifier(tmp_path / "saved").named_parameters())
    for name, param in trainer.prunable.items():
        assert torch.equal(reloaded[name], param.detach())
    assert sum(int((reloaded[name] != 0).sum()) for name in trainer.prunable) == trainer.keep
    # The norms, biases and the head are not pruned by default.
    assert not any("normalization" in n or n.startswith("classifier") for n in trainer.prunable)
    logged = [entry for entry in trainer.state.log_history if "fisher_ratio" in entry]
    assert {"source_ce", "target_ce", "fisher_ratio", "sparsity", "rho"} <= set(logged[0])
    assert any("primal_residual" in entry for entry in logged) and any(
        "eval_accuracy" in e for e in trainer.state.log_history
    )


def test_resume_restores_admm_state_and_reaches_the_same_result(tmp_path, data):
    straight = make_trainer(config(tmp_path / "a", save_total_limit=None), data)
    straight.train()
    checkpoint = tmp_path / "a" / "ntp" / "checkpoint-3"  # end of ADMM round 1
    assert (checkpoint / STATE_TENSORS).exists()

    resumed = make_trainer(config(tmp_path / "b"), data)
    resumed._start_or_restore(str(checkpoint))
    saved, extra = AdmmState.load(checkpoint)
    assert resumed.admm.rounds_done == 1 and set(extra) == {"probe.weight", "probe.bias"}
    for table in ("z", "u", "masks"):
        for name, tensor in getattr(saved, table).items():
            assert torch.equal(getattr(resumed.admm, table)[name], tensor)
    assert torch.equal(resumed.probe.weight, extra["probe.weight"])

    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.admm.rounds_done == 2
    final_straight = dict(straight.model.named_parameters())
    for name, param in resumed.model.named_parameters():
        torch.testing.assert_close(param, final_straight[name], rtol=1e-5, atol=1e-6)
    assert nonzeros(resumed) == resumed.keep


def test_target_batches_leave_the_running_statistics_to_the_source(tmp_path, data):
    trainer = make_trainer(config(tmp_path), data)
    trainer._start_or_restore(None)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(8)])
    reference = copy.deepcopy(trainer.model).train()
    reference(pixel_values=batch["pixel_values"])  # the source batch alone
    trainer.model.train()
    trainer.compute_loss(trainer.model, batch)  # source and target batches
    expected = dict(reference.named_buffers())
    buffers = dict(trainer.model.named_buffers())
    assert any("running_mean" in name for name in buffers)
    for name, buffer in buffers.items():
        torch.testing.assert_close(buffer, expected[name], rtol=0, atol=0, msg=name)


def test_the_probe_is_refitted_every_round_and_the_record_keeps_each_round(tmp_path, data):
    trainer = make_trainer(config(tmp_path, admm_rounds=3), data)
    probes = []
    fit = trainer._fit_probe

    def recording_fit():
        probe = fit()
        probes.append(probe.weight.detach().clone())
        return probe

    trainer._fit_probe = recording_fit
    trainer.train()
    assert len(probes) == 1 + 3  # at the start and at each round end (the last one's after the hard prune)
    assert all(not torch.equal(a, b) for a, b in itertools.pairwise(probes))
    rounds = trainer.method_results()["admm_rounds"]
    assert [r["round"] for r in rounds] == [1, 2, 3] and all("probe_train_accuracy" in r for r in rounds)
    assert all(r["z_sparsity"] == pytest.approx(0.8, abs=1e-3) for r in rounds)
    assert rounds[1]["mask_changes"] > 0  # the support moved with the weights


def test_gradient_accumulation_gives_the_same_update(tmp_path, data):
    # No batch-statistics terms (ViT has no BatchNorm; lambda = 0; the cap never binds), SGD so that
    # any scaling error shows up in the update.
    common = {"optim": "sgd", "learning_rate": 0.1, "fisher_lambda": 0.0, "target_ce_cap": 1e3}
    common |= {"admm_rounds": 1, "steps_per_round": 1, "retrain_steps": 0, "eval_strategy": "no", "save_strategy": "no"}
    one = make_trainer(config(tmp_path / "1x8", per_device_train_batch_size=8, **common), data, "tiny-vit")
    four = make_trainer(
        config(tmp_path / "4x2", per_device_train_batch_size=2, gradient_accumulation_steps=4, **common),
        data,
        "tiny-vit",
    )
    before = {n: p.detach().clone() for n, p in one.model.named_parameters()}
    one.train()
    four.train()
    moved = 0
    for (name, a), (_, b) in zip(one.model.named_parameters(), four.model.named_parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
        moved += not torch.equal(a, before[name])
    assert moved > 0


def test_run_ntp_saves_a_protected_model_with_its_record(tmp_path):
    source_model = tmp_path / "source"
    build_tiny_classifier("tiny-resnet", 10).save_pretrained(source_model)
    ImagePreprocessor().save_pretrained(source_model)
    args = config(tmp_path, model_name_or_path=str(source_model), source_dataset="uci-digits")
    args.target_dataset = "textured-shapes"
    args.source_fraction, args.target_fraction = 0.05, 0.01
    record = run_ntp(args)
    folder = tmp_path / "ntp" / "model"
    saved = json.loads((folder / "hf_ntl.json").read_text())
    assert saved["method"] == "ntp" and saved["config"]["sparsity"] == 0.8
    assert saved["sparsity"]["overall"] == pytest.approx(0.8, abs=1e-5) == record["sparsity"]["overall"]
    assert saved["sparsity"]["target"] == 0.8
    # 1% of textured-shapes' 5,000 train images less the 200 an audit chooses on.
    assert saved["data"] == {"source_train_samples": 67, "target_train_samples": 48}
    assert 0 <= saved["source_accuracy_after"] <= 1 and saved["source_accuracy_before"] is not None
    assert [r["round"] for r in saved["admm_rounds"]] == [1, 2] and 0 <= saved["final_probe_train_accuracy"] <= 1
    assert (folder / "model.safetensors").exists() and not list(folder.glob("*.bin"))
    # The record names the samples it trained on; they come from the train split every stage sees, whatever
    # the protection's seed (42 here, 0 in evaluate): none is a test image of the audit.
    samples = read_samples(folder)
    assert set(samples) == {"protection: source train", "protection: target train"} == set(saved["samples"])
    assert saved["samples"]["protection: source train"] == samples["protection: source train"].summary()
    assert args.seed == 42
    uci = load_image_classification_dataset("uci-digits")
    trained = set(samples["protection: source train"].hashes)
    assert len(trained) == 67 and trained <= set(image_hashes(uci["train"]))
    assert not trained & set(image_hashes(uci["test"]))
    # Nor is any target sample among the validation images an audit chooses its worst case on.
    shapes = load_image_classification_dataset("textured-shapes")["train"]
    validation = shapes.select(validation_split(shapes["label"], AUDIT_VALIDATION_SAMPLES)[0])
    assert not set(samples["protection: target train"].hashes) & set(image_hashes(validation))


def test_protections_leave_the_audit_validation_split_out_of_their_target_data(tmp_path):
    uci = load_image_classification_dataset("uci-digits")["train"]
    validation, rest = validation_split(uci["label"], 150)
    pool = _target_pool(uci, config(tmp_path, audit_validation_samples=150))
    assert sorted(image_hashes(pool)) == sorted(image_hashes(uci.select(rest)))
    assert not set(image_hashes(pool)) & set(image_hashes(uci.select(validation)))
    assert _target_pool(uci, config(tmp_path, audit_validation_samples=0)) is uci  # a deliberate opt-out
    with pytest.raises(ValueError, match=r"audit_validation_samples \(1347\) leaves nothing.*lower it"):
        _target_pool(uci, config(tmp_path, audit_validation_samples=1347))
    with pytest.raises(ValueError, match="audit_validation_samples must be >= 0"):
        config(tmp_path, audit_validation_samples=-1)


def test_bad_configurations_are_refused_early(tmp_path, data):
    for sparsity in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match=r"sparsity must lie in \(0, 1\)"):
            config(tmp_path, sparsity=sparsity)
    with pytest.raises(ValueError, match="projection"):
        config(tmp_path, projection="random")
    source, target_train = data
    args = config(tmp_path)
    with pytest.raises(ValueError, match="needs target-domain data"):
        NTPTrainer(build_tiny_classifier("tiny-resnet", 10), args, source["train"], None, ImagePreprocessor())
    with pytest.raises(ValueError, match="3 outputs but the source data has 10 classes"):
        NTPTrainer(build_tiny_classifier("tiny-resnet", 3), args, source["train"], target_train, ImagePreprocessor())
    five_classes = target_train.filter(lambda row: row["label"] < 5)
    five_classes = five_classes.cast_column("label", type(five_classes.features["label"])(num_classes=5))
    with pytest.raises(ValueError, match="target_head='shared'.*5 classes"):
        make_trainer(config(tmp_path, target_head="shared"), (source, five_classes))
    with pytest.raises(ValueError, match="No prunable parameters matched"):
        make_trainer(config(tmp_path, prunable_patterns=["no_such_layer"]), data)


@pytest.mark.parametrize(("preset", "sparsity"), [("tiny-resnet", 0.9), ("tiny-convnext", 0.3), ("tiny-vit", 0.3)])
def test_the_default_sparsity_follows_batch_norm_and_an_explicit_one_wins(tmp_path, data, preset, sparsity):
    trainer = make_trainer(config(tmp_path, sparsity=None), data, preset)
    assert trainer.target_sparsity == sparsity
    assert trainer.keep == keep_count(sum(p.numel() for p in trainer.prunable.values()), sparsity)
    assert make_trainer(config(tmp_path, sparsity=0.6), data, preset).target_sparsity == 0.6


@pytest.mark.parametrize("preset", ["tiny-vit", "tiny-convnext"])
def test_other_architectures_reach_exact_sparsity(tmp_path, data, preset):
    trainer = make_trainer(config(tmp_path, eval_strategy="no", save_strategy="no"), data, preset)
    trainer.train()
    assert nonzeros(trainer) == trainer.keep
    assert not any("position_embeddings" in n or "cls_token" in n or "layernorm" in n for n in trainer.prunable)


def test_bf16_training_autocasts_and_stays_close_to_fp32(tmp_path, data, matmul_dtypes):
    settings = {"eval_strategy": "no", "save_strategy": "no"}
    full = make_trainer(config(tmp_path / "fp32", **settings), data)
    half = make_trainer(config(tmp_path / "bf16", bf16=True, use_cpu=True, **settings), data)
    with matmul_dtypes(half.model) as dtypes:
        half.train()
    full.train()
    assert torch.bfloat16 in dtypes and nonzeros(half) == half.keep
    losses = [[entry["loss"] for entry in t.state.log_history if "loss" in entry] for t in (half, full)]
    assert all(math.isfinite(loss) for loss in losses[0])
    assert losses[0][0] == pytest.approx(losses[1][0], rel=0.05)  # the first step, before trajectories part
