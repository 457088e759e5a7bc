import dataclasses

import pytest
import torch

from hf_ntl.attacks import (
    DEFAULT_SUITE,
    MASKED_ATTACK,
    AttackSpec,
    EncodedSplit,
    finetune,
    load_suite,
    lora_target_modules,
    pruning_masks,
)
from hf_ntl.data import ImagePreprocessor, load_image_classification_dataset
from hf_ntl.models import build_tiny_classifier


@pytest.fixture(scope="module")
def train():
    dataset = load_image_classification_dataset("textured-shapes", num_train=40, num_test=10)
    return EncodedSplit.from_dataset(dataset["train"], ImagePreprocessor())


@pytest.mark.parametrize(
    ("preset", "expected_suffixes"),
    [
        ("tiny-resnet", {"convolution"}),
        ("tiny-vit", {"q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2", "projection"}),
        ("tiny-convnext", {"pwconv1", "pwconv2", "patch_embeddings", "1"}),
    ],
)
def test_lora_targets_are_found_from_the_model(preset, expected_suffixes):
    model = build_tiny_classifier(preset, 10)
    targets = lora_target_modules(model)
    assert {name.rsplit(".", 1)[-1] for name in targets} == expected_suffixes
    assert not any(name.startswith("classifier") for name in targets)
    assert not any("dwconv" in name for name in targets)  # depthwise convs are left out


@pytest.mark.parametrize("preset", ["tiny-resnet", "tiny-vit", "tiny-convnext"])
def test_lora_attack_trains_adapters_and_head_only(preset, train):
    model = build_tiny_classifier(preset, 10)
    base = {name: p.detach().clone() for name, p in model.named_parameters()}
    attacked = finetune(model, train, AttackSpec("lora", trainable="lora", lora_rank=4, steps=5))
    head_changed = False
    adapters = {}
    for name, param in attacked.named_parameters():
        if "lora_" in name:
            adapters[name] = param
            continue
        if "modules_to_save" in name:  # peft's trainable copy of the head
            original = base[name.replace("base_model.model.", "").replace("modules_to_save.default.", "")]
            head_changed |= not torch.equal(param, original)
            continue
        original_name = name.replace("base_model.model.", "").replace("base_layer.", "").replace("original_module.", "")
        assert torch.equal(param, base[original_name]), f"base weight {name} changed"
    assert head_changed
    # peft initialises lora_B to zero: after training, the adapters must have moved.
    lora_b = [p for name, p in adapters.items() if "lora_B" in name]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)


def pruned_model(fraction=0.9):
    model = build_tiny_classifier("tiny-resnet", 10)
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 4:
                param.mul_((torch.rand_like(param) > fraction).float())
    return model


def test_dense_attack_regrows_pruned_weights_and_masked_keeps_them_zero(train):
    model = pruned_model()
    masks = pruning_masks(model)
    assert masks and all(not torch.all(mask) for mask in masks.values())
    dense = finetune(model, train, AttackSpec("dense", steps=3))
    masked = finetune(model, train, AttackSpec("masked", steps=3, mask="masked"))
    dense_params, masked_params = dict(dense.named_parameters()), dict(masked.named_parameters())
    regrown = sum(int((dense_params[name][~mask] != 0).sum()) for name, mask in masks.items())
    assert regrown > 0
    for name, mask in masks.items():
        assert torch.all(masked_params[name][~mask] == 0), name
        assert not torch.equal(masked_params[name], dict(model.named_parameters())[name])  # it did train


def test_default_suite_covers_the_threat_model():
    suite = load_suite("default")
    kinds = {(spec.trainable, spec.reinit_head) for spec in suite}
    assert {("all", False), ("all", True), ("head", True), ("lora", False)} <= kinds
    assert {spec.lora_rank for spec in suite if spec.trainable == "lora"} >= {4, 16}
    for optimizers in ({"sgd-momentum"}, {"adam", "adamw"}):
        rates = [spec.learning_rate for spec in suite if spec.optimizer in optimizers]
        assert max(rates) / min(rates) >= 100, optimizers  # at least two decades
    assert MASKED_ATTACK not in suite and MASKED_ATTACK in load_suite("default", pruned=True)
    # Beyond every simulated attacker: a re-initialised last stage, and a scheduled run of twice the budget.
    assert any(spec.reinit_last_stage and spec.trainable == "all" for spec in suite)
    longest = max(suite, key=lambda spec: spec.steps_for(200))
    assert longest.lr_scheduler == "cosine" and longest.warmup_ratio > 0
    assert [spec.name for spec in suite] == [spec.name for spec in DEFAULT_SUITE]


def test_epoch_budgets_give_the_documented_step_counts():
    spec = AttackSpec("full", steps=150, epochs=15, max_steps=1200, batch_size=32)
    # max(150, ceil(15 * ceil(n / 32))), at most 1200; fewer samples than a batch make one batch an epoch.
    assert [spec.steps_for(n) for n in (1, 10, 50, 200, 320, 321, 1147, 5000)] == [
        150, 150, 150, 150, 150, 165, 540, 1200
    ]  # fmt: skip
    assert AttackSpec("fixed", steps=150, batch_size=32).steps_for(1147) == 150  # no epochs: a fixed budget
    assert AttackSpec("half", steps=1, epochs=0.5, batch_size=10).steps_for(95) == 5
    steps = {s.name: s.steps_for(1147) for s in load_suite("default", pruned=True)}
    long_runs = [steps.pop("adamw-cosine-2x"), steps.pop("adamw-wd2-cosine-2x")]
    assert long_runs == [1080, 1080] and set(steps.values()) == {540}  # twice the budget, the rest once
    with pytest.raises(ValueError, match="below the floor"):
        AttackSpec("x", steps=100, epochs=1, max_steps=50)
    with pytest.raises(ValueError, match="epochs must be positive"):
        AttackSpec("x", epochs=0)


def test_finetune_runs_the_budget_for_its_number_of_samples(train, monkeypatch):
    steps = []
    original_step = torch.optim.Adam.step

    def counting_step(self, *args, **kwargs):
        steps.append(1)
        return original_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", counting_step)
    model = build_tiny_classifier("tiny-resnet", 10)
    finetune(model, train.select(list(range(20))), AttackSpec("budget", steps=2, epochs=3, batch_size=8))
    assert len(steps) == 9  # 3 epochs of ceil(20 / 8) = 3 batches


def test_suite_selection_and_step_override():
    suite = load_suite("default", only=["lora-r4", "full"], steps=3)
    assert [spec.name for spec in suite] == ["full", "lora-r4"] and {spec.steps for spec in suite} == {3}
    assert {spec.steps_for(1000) for spec in suite} == {3}  # a fixed budget replaces the epoch budget
    with pytest.raises(ValueError, match=r"Unknown attack name\(s\) \['lora-r99'\]"):
        load_suite("default", only=["lora-r99"])
    with pytest.raises(ValueError, match="Unknown suite 'heavy'"):
        load_suite("heavy")


def test_user_suite_from_yaml(tmp_path):
    path = tmp_path / "suite.yaml"
    path.write_text(
        "attacks:\n"
        "  - {name: probe, trainable: head, reinit_head: true, learning_rate: 0.01}\n"
        "  - {name: lora-r8, trainable: lora, lora_rank: 8, optimizer: adamw}\n"
    )
    suite = load_suite(str(path))
    assert suite == [
        AttackSpec("probe", trainable="head", reinit_head=True, learning_rate=0.01),
        AttackSpec("lora-r8", trainable="lora", lora_rank=8, optimizer="adamw"),
    ]
    path.write_text("- {name: full, learning_rat: 0.1}\n")
    with pytest.raises(ValueError, match=r"unknown keys \['learning_rat'\]"):
        load_suite(str(path))
    path.write_text("- {name: a}\n- {name: a}\n")
    with pytest.raises(ValueError, match="unique"):
        load_suite(str(path))
    path.write_text("- {name: x, trainable: everything}\n")
    with pytest.raises(ValueError, match="trainable must be one of"):
        load_suite(str(path))


def test_spec_round_trips_through_its_dict():
    spec = AttackSpec("x", trainable="lora", lora_rank=16, mask="masked")
    assert AttackSpec(**spec.to_dict()) == spec
    assert dataclasses.replace(spec, steps=1).steps == 1
