import importlib

import pytest
import torch

from hf_ntl.attacks import AttackSpec, EncodedOnDemand, EncodedSplit, finetune, finetuned_accuracy
from hf_ntl.data import ImagePreprocessor, load_image_classification_dataset
from hf_ntl.metrics import predict_accuracy
from hf_ntl.metrics.learning_curve import check_counts, counts_from_fractions
from hf_ntl.models import build_tiny_classifier, last_stage, load_classifier, scratch_copy


@pytest.fixture(scope="module")
def shapes():
    dataset = load_image_classification_dataset("textured-shapes", num_train=100, num_test=50)
    preprocessor = ImagePreprocessor()
    return EncodedSplit.from_dataset(dataset["train"], preprocessor), EncodedSplit.from_dataset(
        dataset["test"], preprocessor
    )


def test_samples_encoded_on_demand_equal_the_full_encoding_and_stay_within_the_memory_limit():
    dataset = load_image_classification_dataset("textured-shapes", num_train=40, num_test=10)["train"]
    preprocessor = ImagePreprocessor()
    full = EncodedSplit.from_dataset(dataset, preprocessor)
    per_sample = 3 * 32 * 32 * 4
    pool = EncodedOnDemand(dataset, preprocessor, batch_size=4, max_cached_bytes=6 * per_sample)
    for indices in ([7, 3, 3, 20], [1, 2, 4, 5, 6, 8, 9], [20, 39]):
        batch = pool.select(indices)
        torch.testing.assert_close(batch.pixel_values, full.pixel_values[indices], atol=0, rtol=0)
        assert torch.equal(batch.labels, full.labels[indices])
    assert sorted(pool.encoded) == [1, 2, 3, 4, 7, 20]  # the first six drawn; later ones are encoded per draw


def parameters(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_full_finetuning_changes_a_copy_and_leaves_the_original(shapes):
    train, _ = shapes
    model = build_tiny_classifier("tiny-resnet", 10)
    before = parameters(model)
    tuned = finetune(model, train, AttackSpec(steps=3))
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    changed = [n for n, p in tuned.named_parameters() if not torch.equal(p, before[n])]
    assert "classifier.1.weight" in changed and any(n.startswith("resnet.") for n in changed)


def test_batchnorm_conv_nets_are_attacked_in_channels_last_layout_and_others_not(shapes):
    train, _ = shapes
    for preset, expected in (("tiny-resnet", True), ("tiny-convnext", False), ("tiny-vit", False)):
        model = build_tiny_classifier(preset, 10)
        tuned = finetune(model, train, AttackSpec(steps=2))
        # (1x1 and depthwise kernels are contiguous in both layouts: their strides say nothing.)
        convs = [
            m.weight
            for m in tuned.modules()
            if isinstance(m, torch.nn.Conv2d) and m.weight.shape[1] > 1 and m.weight[0, 0].numel() > 1
        ]
        assert convs
        assert all(w.is_contiguous(memory_format=torch.channels_last) == expected for w in convs), preset
        assert all(p.is_contiguous() for p in model.parameters())  # the released model keeps its layout
    # The layout is a speed choice only: the same run in the default layout ends at the same weights. (SGD: Adam
    # divides by the gradient's own size, which turns float rounding on near-zero gradients into whole steps.)
    model, spec = build_tiny_classifier("tiny-resnet", 10), AttackSpec(optimizer="sgd", learning_rate=0.05, steps=3)
    with pytest.MonkeyPatch.context() as patch:  # the module, not the function the package exports
        patch.setattr(importlib.import_module("hf_ntl.attacks.finetune"), "prefers_channels_last", lambda _: False)
        plain = finetune(model, train, spec)
    channels_last = dict(finetune(model, train, spec).named_parameters())
    for name, param in plain.named_parameters():
        torch.testing.assert_close(channels_last[name], param, rtol=1e-4, atol=1e-5, msg=name)


def test_head_only_trains_only_the_head(shapes):
    train, _ = shapes
    model = build_tiny_classifier("tiny-vit", 10)
    before = parameters(model)
    tuned = finetune(model, train, AttackSpec(trainable="head", optimizer="sgd-momentum", steps=3))
    for name, param in tuned.named_parameters():
        assert torch.equal(param, before[name]) != name.startswith("classifier."), name


def test_head_reinitialisation_is_seeded(shapes):
    train, _ = shapes
    model = build_tiny_classifier("tiny-convnext", 10)
    spec = AttackSpec(reinit_head=True, trainable="head", steps=1, learning_rate=1e-9, optimizer="sgd")
    a, b = finetune(model, train, spec, seed=1), finetune(model, train, spec, seed=1)
    assert not torch.equal(a.classifier.weight, model.classifier.weight)
    assert torch.equal(a.classifier.weight, b.classifier.weight)


@pytest.mark.parametrize(
    ("preset", "expected"),
    [
        ("tiny-resnet", ["resnet.encoder.stages.3", "resnet.pooler"]),
        ("tiny-vit", ["vit.layers.3", "vit.layernorm"]),
        ("tiny-convnext", ["convnext.encoder.stages.3", "convnext.layernorm"]),
    ],
)
def test_reinit_last_stage_starts_the_last_stage_afresh_and_keeps_the_earlier_ones(shapes, preset, expected, tmp_path):
    train, _ = shapes
    model = build_tiny_classifier(preset, 10, seed=3)
    assert last_stage(model) == expected  # the stage and what follows it up to the head
    with torch.no_grad():  # trained weights everywhere, the final norms included (a fresh norm is all ones)
        for p in model.parameters():
            p.add_(0.01)
    # Loaded with from_pretrained, as an attacked checkpoint is (transformers marks its weights initialised).
    model.save_pretrained(tmp_path)
    model = load_classifier(tmp_path)
    stage = tuple(f"{name}." for name in expected)
    first = next(name for name, p in model.named_parameters() if p.ndim >= 2)
    before = parameters(model)
    # An SGD step too small to move anything: what differs was re-initialised, as the architecture initialises it.
    spec = AttackSpec(reinit_last_stage=True, steps=1, learning_rate=1e-12, optimizer="sgd")
    tuned = finetune(model, train, spec, seed=1)
    moved = {name for name, p in tuned.named_parameters() if not torch.allclose(p, before[name], atol=1e-9, rtol=0)}
    in_stage = {name for name, _ in model.named_parameters() if name.startswith(stage)}
    assert in_stage and in_stage <= moved and moved <= in_stage
    assert first not in moved  # the earlier stages are kept
    fresh = dict(scratch_copy(model, seed=1).named_parameters())
    for name in in_stage:
        torch.testing.assert_close(dict(tuned.named_parameters())[name], fresh[name], atol=1e-9, rtol=0)
    again = finetune(model, train, spec, seed=1)
    assert all(torch.equal(p, dict(again.named_parameters())[n]) for n, p in tuned.named_parameters())


def test_warm_up_starts_the_learning_rate_from_zero(shapes):
    train, _ = shapes
    model = build_tiny_classifier("tiny-resnet", 10)
    everything = len(train)  # one batch of every sample: both runs see the same batches
    warm = AttackSpec(
        steps=2, optimizer="sgd", learning_rate=0.1, batch_size=everything, lr_scheduler="cosine", warmup_ratio=0.5
    )
    plain = AttackSpec(steps=1, optimizer="sgd", learning_rate=0.1, batch_size=everything)
    # Step 1 of the warmed-up run has learning rate 0, step 2 the peak: the same weights as one plain step.
    warmed, stepped = finetune(model, train, warm), finetune(model, train, plain)
    for name, p in stepped.named_parameters():
        torch.testing.assert_close(dict(warmed.named_parameters())[name], p, rtol=1e-4, atol=1e-6)
    assert not torch.equal(stepped.classifier[1].weight, model.classifier[1].weight)
    with pytest.raises(ValueError, match="warmup_ratio must lie in"):
        AttackSpec(warmup_ratio=0.1)  # a constant schedule has no warm-up
    with pytest.raises(ValueError, match="lr_scheduler must be one of"):
        AttackSpec(lr_scheduler="one-cycle")


def test_finetuning_learns(shapes):
    train, _ = shapes
    model = build_tiny_classifier("tiny-resnet", 10)
    before = predict_accuracy(model, train.pixel_values, train.labels)
    tuned = finetune(model, train, AttackSpec(steps=60, learning_rate=3e-3))
    assert predict_accuracy(tuned, train.pixel_values, train.labels) > max(0.5, before + 0.3)


def test_same_seed_same_result(shapes):
    train, test = shapes
    model = build_tiny_classifier("tiny-resnet", 10)
    spec = AttackSpec(steps=5)
    assert finetuned_accuracy(model, train, test, spec, seed=2) == finetuned_accuracy(model, train, test, spec, seed=2)


def test_scratch_copy_is_the_same_architecture_freshly_initialised():
    model = build_tiny_classifier("tiny-resnet", 10)
    fresh = scratch_copy(model, seed=9)
    assert type(fresh) is type(model) and fresh.config.to_dict() == model.config.to_dict()
    assert not torch.equal(fresh.classifier[1].weight, model.classifier[1].weight)


def test_bad_requests(shapes):
    train, _ = shapes
    with pytest.raises(ValueError, match="empty"):
        check_counts([], 100)
    with pytest.raises(ValueError, match=r"1\.\.100"):
        check_counts([10, 500], 100)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        counts_from_fractions([0.5, 1.5], 100)
    with pytest.raises(ValueError, match="unknown optimizer"):
        AttackSpec(optimizer="lion")
    for frozen_or_pruned in ({"trainable": "lora"}, {"trainable": "head"}, {"mask": "masked"}):
        with pytest.raises(ValueError, match="reinit_last_stage needs trainable='all' and mask='dense'"):
            AttackSpec(reinit_last_stage=True, **frozen_or_pruned)
    with pytest.raises(ValueError, match="head has 3 outputs"):
        finetune(build_tiny_classifier("tiny-resnet", 3), train, AttackSpec(steps=1))


@pytest.mark.parametrize(
    ("preset", "mixed_precision"),
    [("tiny-resnet", "bf16"), ("tiny-resnet", "fp16"), ("tiny-vit", "bf16"), ("tiny-convnext", "bf16")],
)
def test_an_attack_autocast_to_half_precision_moves_like_fp32(shapes, matmul_dtypes, preset, mixed_precision):
    train, test = shapes
    model = build_tiny_classifier(preset, 10)
    start = torch.cat([p.detach().flatten() for p in model.parameters()])

    def moved(tuned):
        return torch.cat([p.detach().flatten() for p in tuned.parameters()]) - start

    # One step: the half-precision gradient points where the fp32 one does (over several steps small
    # differences grow chaotically on BatchNorm nets, in fp16 as in bf16, so a trajectory is compared by outcome).
    step = AttackSpec(optimizer="sgd", learning_rate=0.05, steps=1)
    with matmul_dtypes(model) as dtypes:  # the deep copy keeps the hooks: they see the attack's forward passes
        half = finetune(model, train, step, mixed_precision=mixed_precision)
    assert dtypes == {getattr(torch, {"bf16": "bfloat16", "fp16": "float16"}[mixed_precision])}
    full_step, half_step = moved(finetune(model, train, step)), moved(half)
    assert torch.nn.functional.cosine_similarity(full_step, half_step, dim=0) > 0.95
    assert half_step.norm().item() == pytest.approx(full_step.norm().item(), rel=0.1)  # fp16's loss scale is undone
    if mixed_precision == "fp16":
        return  # fp16 is emulated on CPU (slow); a trajectory in bf16 covers the rest of the path
    attack = AttackSpec(learning_rate=1e-3, steps=8)
    full, half = finetune(model, train, attack), finetune(model, train, attack, mixed_precision=mixed_precision)
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in half.parameters())
    accuracy = predict_accuracy(half, test.pixel_values, test.labels, mixed_precision=mixed_precision)
    assert accuracy == pytest.approx(predict_accuracy(full, test.pixel_values, test.labels), abs=0.1)
