import json
import math

import pytest
import torch

from hf_ntl.data import ImagePreprocessor, load_image_classification_dataset, stratified_subset
from hf_ntl.errors import InputError
from hf_ntl.losses import inverse_cross_entropy, inverse_cross_entropy_neg_logits, kl_from_uniform
from hf_ntl.metrics.memory import peak_memory
from hf_ntl.models import build_tiny_classifier, head_linear, load_classifier
from hf_ntl.protect import run_sophon
from hf_ntl.trainers import SophonConfig, SophonTrainer, sophon_trainer
from hf_ntl.trainers.sophon_trainer import STATE_JSON, STATE_TENSORS

# ----------------------------------------------------------------------------- the losses


@pytest.mark.parametrize("num_classes", [2, 3, 7])
def test_ice_equals_a_hand_computation_and_has_the_documented_gradient(num_classes):
    generator = torch.Generator().manual_seed(num_classes)
    logits = torch.randn(5, num_classes, generator=generator, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(num_classes, (5,), generator=generator)
    p = torch.softmax(logits.detach(), dim=1)
    p_true = p[torch.arange(5), labels]
    loss = inverse_cross_entropy(logits, labels)
    assert loss.item() == pytest.approx(-sum(math.log(1 - v) for v in p_true.tolist()) / 5, rel=1e-10)
    loss.backward()
    onehot = torch.nn.functional.one_hot(labels, num_classes).double()
    expected = p_true[:, None] * (onehot - p) / (1 - p_true[:, None]) / 5
    torch.testing.assert_close(logits.grad, expected)

    # The reference code's form: CE on negated logits, i.e. -log softmax(-z)_y.
    negated = torch.log_softmax(-logits.detach(), dim=1)[torch.arange(5), labels]
    assert inverse_cross_entropy_neg_logits(logits, labels).item() == pytest.approx(-negated.mean().item())


def test_ice_gradient_vanishes_as_the_true_class_probability_goes_to_zero():
    labels = torch.tensor([0])
    norms = []
    for true_logit in (0.0, -5.0, -20.0):
        logits = torch.tensor([[true_logit, 1.0, 0.5]], requires_grad=True)
        inverse_cross_entropy(logits, labels).backward()
        norms.append(logits.grad.norm().item())
    assert norms[0] > 0.1 and norms[1] < 1e-2 and norms[2] < 1e-8
    # Stable where 1 - p_y underflows in float32 (p_y -> 1): no inf/nan.
    confident = torch.tensor([[40.0, 0.0, 0.0]], requires_grad=True)
    value = inverse_cross_entropy(confident, labels)
    value.backward()
    assert math.isfinite(value.item()) and value.item() == pytest.approx(40 - math.log(2), rel=1e-5)
    assert torch.isfinite(confident.grad).all()


@pytest.mark.parametrize("num_classes", [3, 10, 13])
def test_klu_equals_a_hand_computation_and_its_gradient_is_p_minus_uniform(num_classes):
    logits = torch.randn(4, num_classes, dtype=torch.float64, requires_grad=True)
    p = torch.softmax(logits.detach(), dim=1)
    by_hand = -(torch.log(num_classes * p).sum(dim=1) / num_classes).mean()
    loss = kl_from_uniform(logits)
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-10)
    loss.backward()
    torch.testing.assert_close(logits.grad, (p - 1 / num_classes) / 4)
    uniform = torch.zeros(2, num_classes)
    assert kl_from_uniform(uniform).item() == pytest.approx(0.0, abs=1e-6)  # float32 log(C)


# ----------------------------------------------------------------------------- the trainer


@pytest.fixture(scope="module")
def data():
    source = load_image_classification_dataset("textured-shapes", num_train=64, num_test=24)
    target = load_image_classification_dataset("uci-digits")
    return source, stratified_subset(target["train"], 60, seed=0)


def config(tmp_path, **overrides):
    values = {
        "output_dir": str(tmp_path / "sophon"),
        "report_to": "none",
        "disable_tqdm": True,
        "iterations": 4,
        "guard_every": 2,
        "inner_steps": 2,
        "environments": 2,
        "inner_batch_sizes": [12, 20],
        "query_size": 6,
        "per_device_train_batch_size": 16,
        "guard_threshold": 0.0,  # untrained tiny models; the guard's own tests set it
        "logging_steps": 1,
    }
    return SophonConfig(**{**values, **overrides})


def make_trainer(args, data, preset="tiny-resnet", target=None):
    source, target_train = data
    model = build_tiny_classifier(preset, 10, seed=0)
    target = target_train if target is None else target
    return SophonTrainer(model, args, source["train"], target, ImagePreprocessor(), guard_eval=source["test"])


def parameters(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def suppression_after_simulation(trainer, iteration=0):
    """The query suppression loss the attackers of `iteration` reach, without changing the model."""
    generator = trainer._generator(iteration)
    meta = {name: torch.zeros_like(p) for name, p in trainer.model.named_parameters()}
    trainer._metrics.clear()
    for _ in range(trainer.args.environments):
        trainer._simulate(trainer.sample_attack(generator), generator, meta)
    losses = trainer._metrics["suppression_loss"]
    trainer._metrics.clear()
    return sum(losses) / len(losses)


def test_one_outer_step_lowers_the_suppression_loss_the_attackers_reach(tmp_path, data):
    # The same episodes (iteration 0) before and after one FTS step, with plain SGD attackers.
    args = config(tmp_path, inner_optimizers=["sgd"], inner_lr_min=1e-3, inner_lr_max=1e-3)
    args.suppression_learning_rate = 1e-3
    trainer = make_trainer(args, data)
    before = suppression_after_simulation(trainer)
    weights = parameters(trainer.model)
    trainer.suppression_step(iteration=0)
    after = suppression_after_simulation(trainer)
    assert after < before
    assert any(not torch.equal(p, weights[n]) for n, p in trainer.model.named_parameters())
    assert all(p.grad is None for p in trainer.model.parameters())  # nothing leaks into the NTR step


def test_simulation_leaves_batchnorm_statistics_untouched(tmp_path, data):
    trainer = make_trainer(config(tmp_path), data)
    buffers = {name: b.clone() for name, b in trainer.model.named_buffers()}
    assert any("running_mean" in name for name in buffers)
    trainer.suppression_step(iteration=0)
    for name, buffer in trainer.model.named_buffers():
        assert torch.equal(buffer, buffers[name]), name
    # The check can fail: one ordinary train-mode forward does move them.
    trainer.model.train()
    trainer.model(pixel_values=trainer.restricted.select(range(8)).pixel_values)
    assert any(not torch.equal(b, buffers[n]) for n, b in trainer.model.named_buffers())


def test_peak_memory_does_not_grow_with_the_number_of_inner_steps(tmp_path, data):
    peaks = {}
    for steps in (2, 20):
        trainer = make_trainer(config(tmp_path / str(steps), inner_steps=steps, environments=1), data)
        trainer.suppression_step(iteration=0)  # optimiser state allocated outside the measurement
        with peak_memory() as peak:
            trainer.suppression_step(iteration=1)
        peaks[steps] = peak.bytes
    assert peaks[2] > 0
    assert peaks[20] <= 1.2 * peaks[2], peaks


def test_peak_memory_sees_graphs_kept_alive():
    weight = torch.randn(128, 128, requires_grad=True)

    def run(steps, keep_graphs):
        losses = []
        for _ in range(steps):
            loss = (torch.randn(32, 128) @ weight).relu().pow(2).mean()
            losses.append(loss) if keep_graphs else loss.backward()
        if keep_graphs:
            sum(losses).backward()

    peaks = {}
    for steps in (2, 20):
        with peak_memory() as peak:
            run(steps, keep_graphs=True)
        peaks[steps] = peak.bytes
    assert peaks[20] > 3 * peaks[2]


def test_training_logs_every_quantity_and_changes_the_model(tmp_path, data):
    trainer = make_trainer(config(tmp_path), data)
    before = parameters(trainer.model)
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "suppression_loss" in entry]
    assert len(logged) == 4
    keys = {"loss", "suppression_loss", "attacker_query_accuracy", "attacker_final_query_accuracy", "fts_grad_norm"}
    assert keys <= set(logged[0])
    assert [e["step"] for e in trainer.state.log_history if "eval_accuracy" in e] == [2, 4]
    assert trainer.guard_log["last_good_step"] == 4 and trainer.guard_log["tripped_at"] is None
    assert all(not torch.equal(p, before[n]) for n, p in trainer.model.named_parameters() if p.ndim > 1)


def test_a_restricted_domain_with_other_classes_trains_the_encoder_but_not_the_head(tmp_path, data):
    five = stratified_subset(load_image_classification_dataset("uci-digits")["train"], 60, seed=0)
    five = five.filter(lambda row: row["label"] < 5)
    five = five.cast_column("label", type(five.features["label"])(num_classes=5))
    with pytest.raises(ValueError, match="5 classes but the model's head has 10.*head_reinit_probability=1"):
        make_trainer(config(tmp_path), data, target=five)
    trainer = make_trainer(config(tmp_path, head_reinit_probability=1.0), data, target=five)
    head = [p.detach().clone() for p in head_linear(trainer.model).parameters()]
    encoder = parameters(trainer.model)
    trainer.suppression_step(iteration=0)
    for new, old in zip(head_linear(trainer.model).parameters(), head, strict=True):
        assert torch.equal(new, old)  # fresh heads carry no gradient back to the released one
    changed = [n for n, p in trainer.model.named_parameters() if not torch.equal(p, encoder[n])]
    assert changed and not any(n.startswith("classifier") for n in changed)


def test_vit_trains_with_the_functional_inner_loop(tmp_path, data):
    trainer = make_trainer(config(tmp_path, iterations=2, save_strategy="no", eval_strategy="no"), data, "tiny-vit")
    before = parameters(trainer.model)
    trainer.train()
    assert any(not torch.equal(p, before[n]) for n, p in trainer.model.named_parameters())
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_guard_restores_the_last_good_state_and_stops(tmp_path, data, monkeypatch):
    args = config(tmp_path, iterations=6, guard_threshold=0.5, save_total_limit=None)
    trainer = make_trainer(args, data)
    # The accuracies are given (the guard's decisions are under test): the initial check passes,
    # the evaluation at step 2 passes, the one at step 4 fails.
    monkeypatch.setattr(sophon_trainer, "predict_accuracy", lambda *args, **kwargs: 0.9)
    accuracies = iter([0.9, 0.1])
    trainer.compute_metrics = lambda prediction: {"accuracy": next(accuracies)}
    trainer.train()
    assert trainer.state.global_step == 4 and trainer.guard_log["tripped_at"] == 4
    assert trainer.guard_log["last_good_step"] == 2
    assert [h["accuracy"] for h in trainer.guard_log["history"]] == [0.9, 0.9, 0.1]
    at_step_2 = dict(load_classifier(tmp_path / "sophon" / "checkpoint-2").named_parameters())
    for name, param in trainer.model.named_parameters():
        assert torch.equal(param, at_step_2[name]), name
    # What is saved after the trip is the restored state, not the failed one.
    at_step_4 = dict(load_classifier(tmp_path / "sophon" / "checkpoint-4").named_parameters())
    assert all(torch.equal(p, at_step_2[n]) for n, p in at_step_4.items())


def test_a_relative_guard_trips_on_a_drop_from_the_model_own_start(tmp_path, data, monkeypatch):
    # guard_max_drop: the floor is the start's accuracy less the drop (0.6 - 0.2), whatever guard_threshold allows.
    args = config(tmp_path, iterations=6, guard_max_drop=0.2, save_total_limit=None)
    trainer = make_trainer(args, data)
    monkeypatch.setattr(sophon_trainer, "predict_accuracy", lambda *args, **kwargs: 0.6)
    accuracies = iter([0.4, 0.35])  # exactly the allowed drop passes; a little more trips
    trainer.compute_metrics = lambda prediction: {"accuracy": next(accuracies)}
    trainer.train()
    assert trainer.guard_log["initial"] == 0.6 and trainer.guard_log["tripped_at"] == 4
    assert trainer.guard_log["last_good_step"] == 2
    with pytest.raises(ValueError, match="guard_max_drop is an accuracy difference"):
        config(tmp_path, guard_max_drop=1.5)


def test_resume_restores_method_state_and_reaches_the_same_result(tmp_path, data):
    straight = make_trainer(config(tmp_path / "a", save_total_limit=None), data)
    straight.train()
    checkpoint = tmp_path / "a" / "sophon" / "checkpoint-2"
    assert (checkpoint / STATE_TENSORS).exists() and (checkpoint / STATE_JSON).exists()

    resumed = make_trainer(config(tmp_path / "b"), data)
    resumed.load_method_state(checkpoint)
    assert resumed.guard_log["last_good_step"] == 2 and len(resumed.guard_log["history"]) == 2
    at_step_2 = dict(load_classifier(checkpoint).state_dict())
    for name, tensor in resumed.last_good.items():
        assert torch.equal(tensor, at_step_2[name]), name
    adam = resumed.suppression_optimizer.state_dict()["state"]
    assert adam and all(float(slots["step"]) == 2 for slots in adam.values())

    resumed = make_trainer(config(tmp_path / "b"), data)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    final = dict(straight.model.named_parameters())
    for name, param in resumed.model.named_parameters():
        torch.testing.assert_close(param, final[name], rtol=1e-5, atol=1e-6)
    assert resumed.guard_log["history"] == straight.guard_log["history"]
    # What each attacker family reaches is part of the method state: the record is that of a straight run.
    families = straight.method_results()["attacker_families"]
    assert families and resumed.method_results()["attacker_families"] == pytest.approx(families)


def test_bad_configurations_are_refused_early(tmp_path, data):
    with pytest.raises(ValueError, match=r"inner_steps \(K\) must be >= 1"):
        config(tmp_path, inner_steps=0)
    with pytest.raises(ValueError, match="larger than query_size"):
        config(tmp_path, inner_batch_sizes=[16, 32], query_size=16)
    with pytest.raises(ValueError, match="suppression_loss must be one of"):
        config(tmp_path, suppression_loss="ce")
    with pytest.raises(ValueError, match="inner_optimizers"):
        config(tmp_path, inner_optimizers=["lbfgs"])
    with pytest.raises(ValueError, match="inner_lr_min <= inner_lr_max"):
        config(tmp_path, inner_lr_min=1e-2, inner_lr_max=1e-3)
    with pytest.raises(ValueError, match="only 60 restricted samples"):
        make_trainer(config(tmp_path, inner_batch_sizes=[100]), data)
    with pytest.raises(ValueError, match="already below guard_threshold"):
        make_trainer(config(tmp_path, guard_threshold=0.99), data).train()
    with pytest.raises(InputError, match="not a SOPHON checkpoint"):
        make_trainer(config(tmp_path), data).load_method_state(tmp_path)


def test_run_sophon_saves_a_protected_model_with_its_record(tmp_path):
    source_model = tmp_path / "source"
    build_tiny_classifier("tiny-resnet", 10).save_pretrained(source_model)
    ImagePreprocessor().save_pretrained(source_model)
    args = config(tmp_path, model_name_or_path=str(source_model), guard_samples=40, iterations=2)
    args.source_dataset, args.target_dataset = "uci-digits", "textured-shapes"
    args.source_fraction, args.target_fraction = 0.05, 0.01
    record = run_sophon(args)
    folder = tmp_path / "sophon" / "model"
    saved = json.loads((folder / "hf_ntl.json").read_text())
    assert saved == json.loads(json.dumps(record))
    assert saved["method"] == "sophon" and saved["config"]["inner_steps"] == 2
    assert saved["data"] == {"source_train_samples": 67, "guard_samples": 40, "target_train_samples": 50}
    assert saved["guard"]["last_good_step"] == 2 and 0 <= saved["source_accuracy_after"] <= 1
    assert (folder / "model.safetensors").exists() and not list(folder.glob("*.bin"))
    reloaded = dict(load_classifier(folder).named_parameters())
    assert all(torch.isfinite(p).all() for p in reloaded.values())


def test_bf16_autocasts_the_simulated_attackers_and_keeps_the_meta_gradient_fp32(tmp_path, data, matmul_dtypes):
    args = config(tmp_path, inner_optimizers=["sgd"], inner_lr_min=1e-3, inner_lr_max=1e-3)
    full = make_trainer(args, data)
    half = make_trainer(
        config(
            tmp_path / "bf16", inner_optimizers=["sgd"], inner_lr_min=1e-3, inner_lr_max=1e-3, bf16=True, use_cpu=True
        ),
        data,
    )
    with matmul_dtypes(half.model) as dtypes:
        reached = suppression_after_simulation(half)
    assert dtypes == {torch.bfloat16}
    assert math.isfinite(reached) and reached == pytest.approx(suppression_after_simulation(full), rel=0.05)

    def meta_gradient(trainer):
        generator = trainer._generator(0)
        meta = {name: torch.zeros_like(p) for name, p in trainer.model.named_parameters()}
        for _ in range(trainer.args.environments):
            trainer._simulate(trainer.sample_attack(generator), generator, meta)
        return torch.cat([g.flatten() for g in meta.values()])

    half_gradient = meta_gradient(half)
    assert half_gradient.dtype == torch.float32 and torch.isfinite(half_gradient).all()
    # bf16 keeps an 8-bit mantissa: through two inner steps the cosine measured 0.90-0.94 (it is ~0 when broken).
    assert torch.nn.functional.cosine_similarity(half_gradient, meta_gradient(full), dim=0) > 0.8
