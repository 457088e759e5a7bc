import copy
import json
import math
from dataclasses import replace

import pytest
import torch
from torch.func import functional_call

from hf_ntl.artifacts import read_samples
from hf_ntl.attacks import AttackSpec
from hf_ntl.attacks.finetune import _prepare
from hf_ntl.data import ImagePreprocessor, load_image_classification_dataset, stratified_subset
from hf_ntl.data.fingerprint import image_hashes
from hf_ntl.data.loading import AUDIT_VALIDATION_SAMPLES, validation_split
from hf_ntl.errors import InputError
from hf_ntl.losses import inverse_cross_entropy, inverse_cross_entropy_neg_logits, kl_from_uniform
from hf_ntl.metrics.memory import peak_memory
from hf_ntl.models import build_tiny_classifier, head_linear, load_classifier
from hf_ntl.protect import run_sophon
from hf_ntl.trainers import SimulatedAttack, SophonConfig, SophonTrainer, sophon_trainer
from hf_ntl.trainers.sophon_config import ATTACKER_FAMILIES
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


# Attackers that all do the same thing (full fine-tuning, plain SGD at 1e-3, on the whole restricted set): for tests
# that compare two simulations of the same episodes.
PLAIN_SGD = {"attacker_families": ["sgd"], "attacker_lr_ranges": ["sgd:1e-3:1e-3"], "small_data_probability": 0.0}


def make_trainer(args, data, preset="tiny-resnet", target=None):
    source, target_train = data
    model = build_tiny_classifier(preset, 10, seed=0)
    target = target_train if target is None else target
    return SophonTrainer(model, args, source["train"], target, ImagePreprocessor(), guard_eval=source["test"])


def parameters(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def simulate(trainer, attack, generator, meta_gradients):
    """One fresh simulated attacker's K steps, its meta-gradient added to `meta_gradients`; its final copy."""
    attacker = trainer._start_attacker(attack, generator, lifetime=trainer.args.inner_steps)
    trainer._advance(attacker, generator, meta_gradients)
    return attacker.state


def suppression_after_simulation(trainer, iteration=0):
    """The query suppression loss the attackers of `iteration` reach, without changing the model."""
    generator = trainer._generator(iteration)
    meta = {name: torch.zeros_like(p) for name, p in trainer.model.named_parameters()}
    trainer._metrics.clear()
    for _ in range(trainer.args.environments):
        simulate(trainer, trainer.sample_attack(generator), generator, meta)
    losses = trainer._metrics["suppression_loss"]
    trainer._metrics.clear()
    return sum(losses) / len(losses)


def test_one_outer_step_lowers_the_suppression_loss_the_attackers_reach(tmp_path, data):
    # The same episodes (iteration 0) before and after one FTS step, with plain SGD attackers.
    args = config(tmp_path, **PLAIN_SGD)
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
    families = straight.method_results()["attacker_family_outcomes"]
    assert families and resumed.method_results()["attacker_family_outcomes"] == pytest.approx(families)


def test_bad_configurations_are_refused_early(tmp_path, data):
    with pytest.raises(ValueError, match=r"inner_steps \(K\) must be >= 1"):
        config(tmp_path, inner_steps=0)
    with pytest.raises(ValueError, match="larger than query_size"):
        config(tmp_path, inner_batch_sizes=[16, 32], query_size=16)
    with pytest.raises(ValueError, match="suppression_loss must be one of"):
        config(tmp_path, suppression_loss="ce")
    with pytest.raises(ValueError, match="attacker_families must be a non-empty subset"):
        config(tmp_path, attacker_families=["lbfgs"])
    with pytest.raises(ValueError, match="FAMILY:LOW:HIGH"):
        config(tmp_path, attacker_lr_ranges=["sgd:fast:1e-1"])
    with pytest.raises(ValueError, match="0 < LOW <= HIGH"):
        config(tmp_path, attacker_lr_ranges=["sgd:1e-1:1e-3"])
    with pytest.raises(ValueError, match="attacker_horizon must be >= 0"):
        config(tmp_path, attacker_horizon=-1)
    with pytest.raises(ValueError, match="small_data_sizes"):
        config(tmp_path, small_data_sizes=[50, 10])
    with pytest.raises(ValueError, match="small-data attackers own at least 55"):
        make_trainer(config(tmp_path, small_data_sizes=[55, 60]), data)
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
    assert saved["data"] == {"source_train_samples": 67, "guard_samples": 40, "target_train_samples": 48}
    # None of the target samples is among the validation images an audit chooses its worst case on.
    shapes = load_image_classification_dataset("textured-shapes")["train"]
    validation = set(image_hashes(shapes.select(validation_split(shapes["label"], AUDIT_VALIDATION_SAMPLES)[0])))
    assert not set(read_samples(folder)["protection: target train"].hashes) & validation
    assert saved["guard"]["last_good_step"] == 2 and 0 <= saved["source_accuracy_after"] <= 1
    assert (folder / "model.safetensors").exists() and not list(folder.glob("*.bin"))
    reloaded = dict(load_classifier(folder).named_parameters())
    assert all(torch.isfinite(p).all() for p in reloaded.values())


def test_bf16_autocasts_the_simulated_attackers_and_keeps_the_meta_gradient_fp32(tmp_path, data, matmul_dtypes):
    full = make_trainer(config(tmp_path, **PLAIN_SGD), data)
    half = make_trainer(config(tmp_path / "bf16", **PLAIN_SGD, bf16=True, use_cpu=True), data)
    with matmul_dtypes(half.model) as dtypes:
        reached = suppression_after_simulation(half)
    assert dtypes == {torch.bfloat16}
    assert math.isfinite(reached) and reached == pytest.approx(suppression_after_simulation(full), rel=0.05)

    def meta_gradient(trainer):
        generator = trainer._generator(0)
        meta = {name: torch.zeros_like(p) for name, p in trainer.model.named_parameters()}
        for _ in range(trainer.args.environments):
            simulate(trainer, trainer.sample_attack(generator), generator, meta)
        return torch.cat([g.flatten() for g in meta.values()])

    half_gradient = meta_gradient(half)
    assert half_gradient.dtype == torch.float32 and torch.isfinite(half_gradient).all()
    # bf16 keeps an 8-bit mantissa: through two inner steps the cosine measured 0.90-0.94 (it is ~0 when broken).
    assert torch.nn.functional.cosine_similarity(half_gradient, meta_gradient(full), dim=0) > 0.8


# ----------------------------------------------------------------------------- attackers that span the suite


def test_sampled_attackers_cover_every_family_within_its_ranges(tmp_path, data):
    args = config(tmp_path, adversarial_temperature=0.0, attacker_lr_ranges=["sgd:1e-2:3e-1"])
    trainer = make_trainer(args, data)
    generator = torch.Generator().manual_seed(0)
    attacks = [trainer.sample_attack(generator) for _ in range(600)]
    assert {attack.family for attack in attacks} == set(ATTACKER_FAMILIES)
    for attack in attacks:
        family = args.family(attack.family)
        assert family.lr_min <= attack.learning_rate <= family.lr_max
        assert (attack.optimizer, attack.trainable) == (family.optimizer, family.trainable)
        assert attack.lora_rank in ((4, 16) if attack.trainable == "lora" else (0,))
        assert attack.reinit_head or attack.trainable != "head"  # a probe always fits a fresh head
    assert max(a.learning_rate for a in attacks if a.family == "sgd") > 1e-1  # the override, not the family's own
    assert max(a.learning_rate for a in attacks if a.family == "sgd-momentum") > 5e-2  # lr up to 1e-1, as the suite
    pools = [attack.pool_size for attack in attacks if attack.pool_size is not None]
    assert 0.18 < len(pools) / len(attacks) < 0.32 and min(pools) == 10 and max(pools) == 50
    # With fewer restricted samples the largest pool leaves a query's worth (6) to score the attacker on.
    small = make_trainer(config(tmp_path, small_data_probability=1.0), (data[0], data[1].select(range(40))))
    assert max(small.sample_attack(generator).pool_size for _ in range(200)) == 34
    fresh = [a.reinit_head for a in attacks if a.trainable == "all"]
    assert 0.35 < sum(fresh) / len(fresh) < 0.65


@pytest.mark.parametrize("trainable", ["lora", "head"])
def test_lora_and_probe_attackers_leave_the_frozen_weights_bit_identical(tmp_path, data, trainable):
    trainer = make_trainer(config(tmp_path, inner_steps=3), data)
    attack = SimulatedAttack(
        "any", "adam", 1e-2, batch_size=20, trainable=trainable, reinit_head=trainable == "head", lora_rank=4
    )
    meta = {name: torch.zeros_like(p) for name, p in trainer.model.named_parameters()}
    state = simulate(trainer, attack, torch.Generator().manual_seed(0), meta)
    model = dict(trainer.model.named_parameters())
    frozen = {name: tensor for name, tensor in state.released.items() if name not in state.trainable}
    assert set(frozen) == set(model) - trainer.head_names
    for name, tensor in frozen.items():
        assert torch.equal(tensor, model[name]), name  # what the attacker builds on, untouched
    if trainable == "lora":  # adapters (and the kept head) trained
        assert all(state.trainable[f"{name}.lora_B"].abs().sum() > 0 for name in trainer.lora_weights)
        assert set(state.trainable) - {n for n in state.trainable if "lora_" in n} == trainer.head_names
    else:
        assert set(state.trainable) == trainer.head_names  # the probe is all it trains
    # The suppression loss reaches the encoder through the adapters or the probe.
    assert all(meta[name].abs().sum() > 0 for name in trainer.lora_weights)


def test_the_simulated_lora_attacker_computes_what_peft_lora_does(tmp_path, data, load_into_peft):
    trainer = make_trainer(config(tmp_path), data)
    attack = SimulatedAttack("lora", "adam", 1e-3, batch_size=20, trainable="lora", lora_rank=4)
    state = trainer.attacker_copy(attack, torch.Generator().manual_seed(0))
    reference = _prepare(copy.deepcopy(trainer.model), AttackSpec("lora", trainable="lora", lora_rank=4)).eval()
    load_into_peft(state, reference, trainer.lora_weights)
    pixels = trainer.restricted.select(range(8)).pixel_values
    trainer.model.eval()
    simulated = functional_call(trainer.model, (state.parameters(), state.buffers), kwargs={"pixel_values": pixels})
    torch.testing.assert_close(simulated.logits, reference(pixel_values=pixels).logits, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(simulated.logits, trainer.model(pixel_values=pixels).logits, atol=1e-3)


def test_a_small_data_attacker_fine_tunes_on_its_own_samples_and_is_queried_on_others(tmp_path, data):
    trainer = make_trainer(config(tmp_path), data)
    attack = SimulatedAttack("sgd", "sgd", 1e-3, batch_size=20, pool_size=10)
    generator = torch.Generator().manual_seed(0)
    order = torch.randperm(trainer.restricted_size, generator=generator)
    own = set(order[:10].tolist())
    seen = set()
    for _ in range(5):
        query, support = trainer._episode_indices(attack, order, generator)
        assert len(query) == 6 and len(support) == 10
        assert set(support.tolist()) <= own and not set(query.tolist()) & own
        seen |= set(support.tolist())
    assert seen == own
    query, support = trainer._episode_indices(replace(attack, pool_size=None), order, generator)
    assert len(query) == 6 and len(support) == 14 and not set(query.tolist()) & set(support.tolist())


def test_adversarial_sampling_shifts_towards_the_family_that_succeeds(tmp_path, data):
    args = config(tmp_path, iterations=6, inner_steps=1, attacker_horizon=0, adversarial_floor=0.2)  # fresh attackers
    trainer = make_trainer(args, data)
    uniform = 1 / len(ATTACKER_FAMILIES)
    assert trainer.family_probabilities() == pytest.approx(dict.fromkeys(ATTACKER_FAMILIES, uniform))  # none seen yet
    # A constructed case: attackers of one family reach every query sample, the others a tenth.
    drawn = {}
    copy_state, suppression = trainer.attacker_copy, trainer.suppression_loss

    def attacker_copy(attack, generator):
        drawn["family"] = attack.family
        return copy_state(attack, generator)

    def rigged(forward, batch, generator):
        loss, _ = suppression(forward, batch, generator)
        return loss, {"accuracy": 1.0 if drawn["family"] == "adamw" else 0.1}

    trainer.attacker_copy, trainer.suppression_loss = attacker_copy, rigged
    for iteration in range(12):
        trainer.suppression_step(iteration)
    probabilities = trainer.family_probabilities()
    assert set(trainer.family_outcomes) == set(ATTACKER_FAMILIES)
    assert max(probabilities, key=probabilities.get) == "adamw" and probabilities["adamw"] > 0.5
    assert min(probabilities.values()) >= 0.2 * uniform - 1e-9  # the floor keeps every threat in play
    assert sum(probabilities.values()) == pytest.approx(1.0)
    generator = torch.Generator().manual_seed(0)
    draws = [trainer.sample_attack(generator).family for _ in range(300)]
    assert draws.count("adamw") > 0.4 * len(draws) and set(draws) == set(ATTACKER_FAMILIES)
    trainer.args.adversarial_temperature = 0.0
    assert trainer.family_probabilities() == pytest.approx(dict.fromkeys(ATTACKER_FAMILIES, uniform))


# ----------------------------------------------------------------------------- persistent attackers


def test_persistent_attackers_restart_on_schedule_and_are_carried_onto_the_new_weights(tmp_path, data):
    # A horizon of 5 steps is followed in whole iterations of K = 2: 6 steps.
    args = config(tmp_path, inner_steps=2, attacker_horizon=5, attacker_families=["sgd-momentum", "probe"])
    trainer = make_trainer(args, data)
    starts = {0: [], 1: []}
    seen = [None, None]
    for iteration in range(8):
        trainer.suppression_step(iteration)
        for slot, attacker in enumerate(trainer.attackers):
            if attacker is not seen[slot]:
                starts[slot].append(iteration)
                seen[slot] = attacker
            assert attacker.steps_taken <= attacker.lifetime
    # Environment 0's first attacker lives 6 steps (3 iterations); environment 1's, staggered, 2; then 6 each.
    assert starts == {0: [0, 3, 6], 1: [0, 1, 4, 7]}
    # Carried: the last FTS step moved the model; the next carry moves every attacker's released tensors by as
    # much, keeping its own progress (a probe's frozen copies become the current weights).
    generator = torch.Generator().manual_seed(0)
    full = SimulatedAttack("sgd-momentum", "sgd-momentum", 1e-2, batch_size=20)
    probe = SimulatedAttack("probe", "adam", 1e-2, batch_size=20, trainable="head", reinit_head=True)
    trainer._carry_attackers()  # as a suppression step does before it starts attackers from the current weights
    trainer.attackers = [trainer._start_attacker(attack, generator, lifetime=100) for attack in (full, probe)]
    trainer.suppression_step(iteration=8)
    attackers = trainer.attackers
    before = {slot: {n: t.detach().clone() for n, t in a.state.released.items()} for slot, a in enumerate(attackers)}
    previous, weights = dict(trainer.previous_weights), parameters(trainer.model)
    assert any(not torch.equal(weights[name], previous[name]) for name in weights)
    trainer._carry_attackers()
    kinds = set()
    for slot, attacker in enumerate(trainer.attackers):
        kinds.add(attacker.attack.trainable)
        for name, tensor in attacker.state.released.items():
            expected = before[slot][name] + (weights[name] - previous[name])
            torch.testing.assert_close(tensor, expected, rtol=0, atol=1e-6)
            if attacker.attack.trainable == "head":
                torch.testing.assert_close(tensor, weights[name], rtol=0, atol=1e-6)
            else:
                assert not torch.equal(tensor, weights[name])  # a full attacker's own progress is kept
    assert kinds == {"all", "head"}  # both kinds of copy were carried (the draws are seeded)


def test_persistent_attackers_resume_exactly_from_a_checkpoint(tmp_path, data):
    values = {"save_total_limit": None, "inner_steps": 2, "attacker_horizon": 6}
    straight = make_trainer(config(tmp_path / "a", **values), data)
    straight.train()
    checkpoint = tmp_path / "a" / "sophon" / "checkpoint-2"
    assert (checkpoint / "sophon_attackers-0.safetensors").exists()
    resumed = make_trainer(config(tmp_path / "b", **values), data)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    final = dict(straight.model.named_parameters())
    for name, param in resumed.model.named_parameters():
        torch.testing.assert_close(param, final[name], rtol=1e-5, atol=1e-6)
    for mine, theirs in zip(resumed.attackers, straight.attackers, strict=True):
        assert (mine.attack, mine.steps_taken) == (theirs.attack, theirs.steps_taken)
        for (name, tensor), other in zip(mine.state.tensors().items(), theirs.state.tensors().values(), strict=True):
            torch.testing.assert_close(tensor, other, rtol=1e-5, atol=1e-6, msg=name)
    # Without the attackers' file a resumed run starts new attackers at iteration 2 and ends elsewhere.
    (checkpoint / "sophon_attackers-0.safetensors").unlink()
    forgetful = make_trainer(config(tmp_path / "c", **values), data)
    forgetful.train(resume_from_checkpoint=str(checkpoint))
    assert any(not torch.allclose(p, final[n], atol=1e-6) for n, p in forgetful.model.named_parameters())


def test_peak_memory_does_not_grow_with_the_attacker_horizon(tmp_path, data):
    # Six iterations of K = 10 from a fresh trainer, all measured: with H = 200 the attacker lives through all
    # 60 steps; with H = 20 it restarts twice. Anything kept per step of a life would make H = 200 the larger.
    peaks = {}
    for horizon in (20, 200):
        args = config(tmp_path / str(horizon), inner_steps=10, attacker_horizon=horizon, environments=1)
        trainer = make_trainer(args, data)
        with peak_memory() as peak:
            for iteration in range(6):
                trainer.suppression_step(iteration)
        peaks[horizon] = peak.bytes
        assert trainer.attackers[0].steps_taken == (60 if horizon == 200 else 20)
    assert peaks[20] > 0
    assert peaks[200] <= 1.1 * peaks[20], peaks


def test_an_attacker_that_diverges_adds_nothing_and_is_restarted(tmp_path, data):
    trainer = make_trainer(config(tmp_path, inner_steps=3), data)
    meta = {name: torch.zeros_like(p) for name, p in trainer.model.named_parameters()}
    attacker = trainer._start_attacker(SimulatedAttack("sgd", "sgd", 1e12, batch_size=20), torch.Generator(), 30)
    trainer._advance(attacker, torch.Generator().manual_seed(0), meta)
    assert trainer._metrics["attackers_diverged"] == [1.0] and attacker.steps_taken == attacker.lifetime
    assert all(torch.isfinite(g).all() for g in meta.values())
    assert "sgd" not in trainer.family_outcomes


def test_adversarial_sampling_favours_the_lowest_outcome_when_lower_is_more_successful(tmp_path, data):
    trainer = make_trainer(config(tmp_path, attacker_families=["sgd", "adam", "probe"]), data)
    trainer.family_outcomes = {"sgd": 0.30, "adam": 0.10, "probe": 0.20}
    assert max(trainer.family_probabilities().items(), key=lambda item: item[1])[0] == "sgd"  # accuracy: higher
    trainer.higher_outcome_is_worse = False  # a denoising MSE: the lowest is the most successful attacker
    probabilities = trainer.family_probabilities()
    assert probabilities["adam"] > probabilities["probe"] > probabilities["sgd"]


# ----------------------------------------------------------------------------- composition with NTP


def test_sophon_on_a_pruned_model_keeps_its_pruned_weights_exactly_zero(tmp_path, data):
    def encoder_weights(model):
        return {n: p for n, p in model.named_parameters() if p.ndim > 1 and not n.startswith("classifier")}

    def pruned_trainer(folder, keep):
        source, target = data
        model = build_tiny_classifier("tiny-resnet", 10, seed=0)
        with torch.no_grad():  # a pruned model: half of every encoder weight matrix/kernel exactly zero
            for param in encoder_weights(model).values():
                param.view(-1)[::2] = 0
        args = config(tmp_path / folder, keep_pruning_mask=keep)
        return SophonTrainer(model, args, source["train"], target, ImagePreprocessor(), guard_eval=source["test"])

    with pytest.raises(InputError, match="holds no pruned"):
        make_trainer(config(tmp_path, keep_pruning_mask=True), data)
    for keep in (True, False):
        trainer = pruned_trainer(str(keep), keep)
        trainer.suppression_step(iteration=0)  # one FTS step on its own
        zeros = [bool((param.view(-1)[::2] == 0).all()) for param in encoder_weights(trainer.model).values()]
        assert all(zeros) if keep else not any(zeros)
        # An NTR backward: the pruned entries' gradients are zero as computed (before Trainer clips them).
        trainer.model(pixel_values=trainer.guard_set.pixel_values[:8]).logits.square().sum().backward()
        zeros = [bool((param.grad.view(-1)[::2] == 0).all()) for param in encoder_weights(trainer.model).values()]
        assert all(zeros) if keep else not any(zeros)
        trainer.model.zero_grad(set_to_none=True)
        trainer.train()
        saved = load_classifier(tmp_path / str(keep) / "sophon" / "checkpoint-4")
        for model in (trainer.model, saved):
            zeros = [bool((param.view(-1)[::2] == 0).all()) for param in encoder_weights(model).values()]
            assert all(zeros) if keep else not any(zeros)  # without the mask, FTS and NTR regrow them
