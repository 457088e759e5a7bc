"""SOPHON for diffusion: DoS loss, the trainer, LoRA/full attacks on UNets, pipelines on disk, the stages."""

import copy
import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, load_from_disk
from diffusers import DDPMPipeline
from huggingface_hub import ModelCard
from PIL import Image as PILImage
from torch.func import functional_call

from hf_ntl.artifacts import write_record, write_samples
from hf_ntl.attacks import DiffusionAttackSpec, finetune_unet, unet_lora_target_modules, with_lora
from hf_ntl.cards import build_card
from hf_ntl.cli import main
from hf_ntl.data import check_diffusion_images, encode_diffusion_images
from hf_ntl.data.fingerprint import SampleSet
from hf_ntl.errors import InputError
from hf_ntl.evaluation_diffusion import DiffusionEvaluateArguments, denoising_tables, run_evaluation_diffusion
from hf_ntl.leakage import TestOverlapError
from hf_ntl.losses import denial_of_service_loss, predict_noise
from hf_ntl.metrics.denoising import denoising_mse, timestep_grid
from hf_ntl.models import ModelLoadError, build_tiny_classifier, build_tiny_ddpm, load_ddpm, save_ddpm
from hf_ntl.terminal import tables_text
from hf_ntl.trainers import SophonDiffusionConfig, SophonDiffusionTrainer
from hf_ntl.trainers.sophon_base import STATE_JSON, STATE_TENSORS
from hf_ntl.tune import Objective, TuneArguments, run_tune, source_floor, tuning_tables

SIZE = 8

# ----------------------------------------------------------------------------- losses and noising


def test_dos_loss_and_its_gradient_equal_a_hand_computation():
    predicted = torch.randn(3, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    by_hand = sum(float((predicted[i].detach() ** 2).sum()) for i in range(3)) / 3
    loss = denial_of_service_loss(predicted)
    assert loss.item() == pytest.approx(by_hand, rel=1e-12)
    loss.backward()
    torch.testing.assert_close(predicted.grad, 2 * predicted.detach() / 3)
    assert denial_of_service_loss(torch.zeros(2, 3, 4, 4)).item() == 0.0


def test_predict_noise_noises_at_the_configured_timesteps_reproducibly():
    _, scheduler = build_tiny_ddpm(SIZE)
    images = torch.rand(4, 3, SIZE, SIZE) * 2 - 1
    seen = {}

    class Recorder:  # a "UNet" that returns its noisy input, so x_t can be checked by hand
        def __call__(self, sample, timestep):
            seen["t"] = timestep
            return type("Output", (), {"sample": sample})()

    def at_step_7(seed):
        generator = torch.Generator().manual_seed(seed)
        return predict_noise(Recorder(), scheduler, images, generator=generator, min_timestep=7, max_timestep=7)

    noisy, noise = at_step_7(1)
    alpha_bar = scheduler.alphas_cumprod[7]
    torch.testing.assert_close(noisy, alpha_bar.sqrt() * images + (1 - alpha_bar).sqrt() * noise)
    assert seen["t"].tolist() == [7, 7, 7, 7]
    assert torch.equal(noise, at_step_7(1)[1])
    predict_noise(Recorder(), scheduler, images, generator=torch.Generator().manual_seed(2))
    assert seen["t"].min() >= 0 and seen["t"].max() <= 999 and len(set(seen["t"].tolist())) > 1


def test_denoising_mse_is_the_same_for_the_same_model_and_zero_predictions_score_one():
    unet, scheduler = build_tiny_ddpm(SIZE)
    images = torch.rand(6, 3, SIZE, SIZE) * 2 - 1
    grid = timestep_grid(scheduler, 4)
    assert grid == [0, 333, 666, 999]
    assert denoising_mse(unet, scheduler, images, grid) == denoising_mse(unet, scheduler, images, grid)

    class Zero(torch.nn.Module):  # predicts no noise: MSE = E[eps^2], about 1
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))

        def forward(self, sample, timestep):
            return type("Output", (), {"sample": torch.zeros_like(sample)})()

    scores = denoising_mse(Zero(), scheduler, torch.zeros(200, 3, SIZE, SIZE), grid)
    assert all(abs(v - 1) < 0.02 for v in scores.values())


# ----------------------------------------------------------------------------- the trainer


def images(count, seed, low=-1.0, high=1.0):
    generator = torch.Generator().manual_seed(seed)
    return low + (high - low) * torch.rand(count, 3, SIZE, SIZE, generator=generator)


def config(tmp_path, **overrides):
    values = {
        "output_dir": str(tmp_path / "sophon"),
        "report_to": "none",
        "disable_tqdm": True,
        "use_cpu": True,
        "iterations": 4,
        "ntr_steps": 1,
        "guard_every": 2,
        "inner_steps": 2,
        "environments": 2,
        "inner_batch_sizes": [10, 14],
        "query_size": 4,
        "per_device_train_batch_size": 8,
        "guard_timesteps": 4,
        "logging_steps": 1,
    }
    return SophonDiffusionConfig(**{**values, **overrides})


def make_trainer(args, restricted=None):
    unet, scheduler = build_tiny_ddpm(SIZE)
    restricted = images(30, 2) if restricted is None else restricted
    return SophonDiffusionTrainer(unet, args, scheduler, images(40, 1), restricted, images(12, 3))


def dos_after_simulation(trainer, iteration=0):
    """The DoS loss the attackers of `iteration` reach on their queries, without changing the model."""
    generator = trainer._generator(iteration)
    meta = {name: torch.zeros_like(p) for name, p in trainer.model.named_parameters()}
    trainer._metrics.clear()
    for _ in range(trainer.args.environments):
        attacker = trainer._start_attacker(trainer.sample_attack(generator), generator, trainer.args.inner_steps)
        trainer._advance(attacker, generator, meta)
    losses = trainer._metrics["suppression_loss"]
    trainer._metrics.clear()
    return sum(losses) / len(losses)


def test_one_outer_step_lowers_the_dos_loss_the_attackers_reach(tmp_path):
    # The same episodes (same restricted batches, noise and timesteps) before and after one FTS step.
    trainer = make_trainer(config(tmp_path, inner_optimizers=["sgd"], inner_lr_min=1e-3, inner_lr_max=1e-3))
    before = dos_after_simulation(trainer)
    weights = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    trainer.suppression_step(iteration=0)
    after = dos_after_simulation(trainer)
    assert after < 0.95 * before
    assert any(not torch.equal(p, weights[n]) for n, p in trainer.model.named_parameters())
    assert all(p.grad is None for p in trainer.model.parameters())  # nothing leaks into the NTR step


def test_lora_attackers_join_the_families_and_leave_the_released_weights_bit_identical(tmp_path):
    trainer = make_trainer(config(tmp_path, lora_ranks=[4], inner_lr_min=1e-2, inner_lr_max=1e-2))
    assert trainer.attacker_families() == ["sgd-momentum", "adam", "adamw", "lora"]
    generator = torch.Generator().manual_seed(0)
    lora = [attack for attack in (trainer.sample_attack(generator) for _ in range(200)) if attack.family == "lora"]
    assert lora and all(a.trainable == "lora" and a.lora_rank == 4 and a.optimizer == "adamw" for a in lora)
    meta = {name: torch.zeros_like(p) for name, p in trainer.model.named_parameters()}
    attacker = trainer._start_attacker(lora[0], generator, trainer.args.inner_steps)
    trainer._advance(attacker, generator, meta)
    model = dict(trainer.model.named_parameters())
    assert set(attacker.state.released) == set(model)
    for name, tensor in attacker.state.released.items():
        assert torch.equal(tensor, model[name]), name  # what the attacker builds on, untouched
    assert set(attacker.state.trainable) == {f"{w}.lora_{part}" for w in trainer.lora_weights for part in "AB"}
    assert all(attacker.state.trainable[f"{w}.lora_B"].abs().sum() > 0 for w in trainer.lora_weights)
    # The DoS loss reaches the released weights through the adapters.
    assert all(meta[name].abs().sum() > 0 for name in trainer.lora_weights)
    assert make_trainer(config(tmp_path)).attacker_families() == ["sgd-momentum", "adam", "adamw"]  # off by default


def test_the_simulated_lora_attacker_on_a_unet_computes_what_peft_lora_does(tmp_path, load_into_peft):
    trainer = make_trainer(config(tmp_path, lora_ranks=[4]))
    attack = dataclasses.replace(trainer.draw_attack("lora", torch.Generator().manual_seed(0)), lora_rank=4)
    state = trainer.attacker_copy(attack, torch.Generator().manual_seed(0))
    reference = with_lora(copy.deepcopy(trainer.model), 4).eval()
    load_into_peft(state, reference, trainer.lora_weights)
    noisy, timesteps = images(4, 5), torch.tensor([3, 100, 500, 900])
    trainer.model.eval()
    simulated = functional_call(trainer.model, (state.parameters(), state.buffers), args=(noisy, timesteps)).sample
    torch.testing.assert_close(simulated, reference(noisy, timesteps).sample, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(simulated, trainer.model(noisy, timesteps).sample, atol=1e-3)


def test_training_logs_fts_and_guard_metrics_and_checkpoints_method_state(tmp_path):
    trainer = make_trainer(config(tmp_path))
    initial = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    trainer.train()
    logs = trainer.state.log_history
    keys = set().union(*logs)
    for key in ("loss", "suppression_loss", "attacker_query_denoising_mse", "fts_grad_norm", "eval_denoising_mse"):
        assert key in keys, key
    assert [h["step"] for h in trainer.guard_log["history"]] == [0, 2, 4]
    assert trainer.guard_log["initial"] == trainer.guard_log["history"][0]["denoising_mse"]
    assert any(not torch.equal(p, initial[n]) for n, p in trainer.model.named_parameters())
    checkpoint = tmp_path / "sophon" / "checkpoint-4"
    assert (checkpoint / STATE_TENSORS).is_file() and (checkpoint / STATE_JSON).is_file()
    assert (checkpoint / "model.safetensors").is_file() and not (checkpoint / "pytorch_model.bin").exists()


def test_resume_reaches_the_same_result_as_a_straight_run(tmp_path):
    straight = make_trainer(config(tmp_path / "a", save_total_limit=None))
    straight.train()
    resumed = make_trainer(config(tmp_path / "b"))
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "sophon" / "checkpoint-2"))
    final = dict(straight.model.named_parameters())
    for name, param in resumed.model.named_parameters():
        torch.testing.assert_close(param, final[name], rtol=1e-5, atol=1e-6)
    assert resumed.guard_log["history"] == straight.guard_log["history"]


def test_guard_restores_the_last_good_state_when_original_mse_rises(tmp_path, monkeypatch):
    trainer = make_trainer(config(tmp_path, guard_max_mse_ratio=1.0))
    initial = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    # Every later guard check sees an original-domain MSE above the unprotected model's.
    values = iter([1.0, 5.0])
    monkeypatch.setattr(trainer, "guard_value", lambda: next(values))
    trainer.train()
    assert trainer.guard_log["tripped_at"] == 2 and trainer.guard_log["last_good_step"] == 0
    assert trainer.state.global_step == 2  # stopped at the first failed check
    for name, param in trainer.model.named_parameters():
        assert torch.equal(param, initial[name]), name


def test_bad_inputs_are_refused_with_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="UNet takes 3x8x8"):
        make_trainer(config(tmp_path), restricted=torch.zeros(30, 1, SIZE, SIZE))
    with pytest.raises(ValueError, match="UNet takes 3x8x8"):
        make_trainer(config(tmp_path), restricted=torch.zeros(30, 3, 16, 16))
    with pytest.raises(ValueError, match=r"span \[0, 255\] but DDPM works in \[-1, 1\]"):
        make_trainer(config(tmp_path), restricted=images(30, 2, 0, 255).round())
    with pytest.raises(ValueError, match="only 30 restricted samples"):
        make_trainer(config(tmp_path, inner_batch_sizes=[40]))
    with pytest.raises(ValueError, match="timestep_min <= timestep_max"):
        config(tmp_path, timestep_min=5, timestep_max=1)
    with pytest.raises(ValueError, match="guard_max_mse_ratio"):
        config(tmp_path, guard_max_mse_ratio=0.5)
    with pytest.raises(ValueError, match="lora_ranks must be >= 1"):
        config(tmp_path, lora_ranks=[4, 0])
    with pytest.raises(ValueError, match="must be <= 999"):
        make_trainer(config(tmp_path, timestep_max=1000))
    with pytest.raises(TypeError, match="UNet2DModel"):
        SophonDiffusionTrainer(torch.nn.Linear(2, 2), config(tmp_path), None, images(4, 0), images(4, 0), images(4, 0))


# ----------------------------------------------------------------------------- pipelines on disk


def test_a_saved_pipeline_reloads_with_the_same_weights_and_samples(tmp_path):
    unet, scheduler = build_tiny_ddpm(SIZE, seed=3)
    save_ddpm(unet, scheduler, tmp_path / "pipeline")
    assert not list((tmp_path / "pipeline").rglob("*.bin"))
    pipeline = DDPMPipeline.from_pretrained(tmp_path / "pipeline", use_safetensors=True)
    for name, tensor in unet.state_dict().items():
        assert torch.equal(tensor, pipeline.unet.state_dict()[name]), name
    generator = torch.Generator().manual_seed(0)
    samples = pipeline(batch_size=2, num_inference_steps=3, generator=generator, output_type="np")
    assert samples.images.shape == (2, SIZE, SIZE, 3) and np.isfinite(samples.images).all()
    reloaded, reloaded_scheduler = load_ddpm(tmp_path / "pipeline")
    assert reloaded.config.sample_size == SIZE and reloaded_scheduler.config.num_train_timesteps == 1000


def test_loading_a_folder_that_is_not_a_ddpm_pipeline_says_so(tmp_path):
    build_tiny_classifier("tiny-resnet", 10).save_pretrained(tmp_path / "classifier")
    with pytest.raises(ModelLoadError, match="not a diffusion pipeline folder.*a classifier"):
        load_ddpm(tmp_path / "classifier")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no model_index.json"):
        load_ddpm(tmp_path / "empty")


def test_a_peft_wrapped_unet_is_refused_as_a_pipeline(tmp_path):
    unet, scheduler = build_tiny_ddpm(SIZE)
    with pytest.raises(TypeError, match="merge_and_unload"):
        save_ddpm(with_lora(unet, 2), scheduler, tmp_path / "pipeline")


# ----------------------------------------------------------------------------- attacks


def test_lora_targets_attention_and_resnet_convs_only():
    unet, _ = build_tiny_ddpm(SIZE)
    targets = unet_lora_target_modules(unet)
    assert any(t.endswith("attentions.0.to_q") for t in targets)
    assert any(t.endswith("resnets.0.conv1") for t in targets)
    assert not any(t in ("conv_in", "conv_out") or "time_emb" in t or "shortcut" in t for t in targets)


def test_lora_attack_trains_adapters_and_leaves_base_weights_unchanged():
    unet, scheduler = build_tiny_ddpm(SIZE)
    original = {name: p.detach().clone() for name, p in unet.named_parameters()}
    wrapped = with_lora(unet, 4)
    trainable = {name for name, p in wrapped.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    optimizer = torch.optim.Adam([p for p in wrapped.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        predicted, noise = predict_noise(wrapped, scheduler, images(8, 0))
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(predicted, noise).backward()
        optimizer.step()
    lora_b = [p for name, p in wrapped.named_parameters() if "lora_B" in name]
    assert any(p.abs().sum() > 0 for p in lora_b)  # B starts at zero: the adapters did train
    for name, param in wrapped.named_parameters():
        if "lora_" not in name:
            base_name = name.removeprefix("base_model.model.").replace(".base_layer", "")
            assert torch.equal(param, original[base_name]), name


def test_finetune_unet_leaves_the_released_model_untouched_and_merges_lora():
    unet, scheduler = build_tiny_ddpm(SIZE)
    released = {name: p.detach().clone() for name, p in unet.state_dict().items()}
    spec = DiffusionAttackSpec("lora", trainable="lora", learning_rate=1e-2, steps=3, batch_size=4, lora_rank=2)
    probes = []
    attacked, history = finetune_unet(
        unet, scheduler, images(8, 0), spec, probe=lambda m: probes.append(1) or 0.5, probe_every=1
    )
    assert history == {1: 0.5, 2: 0.5, 3: 0.5} and len(probes) == 3
    assert type(attacked).__name__ == "UNet2DModel"  # merged: savable and samplable as a plain pipeline
    for name, tensor in unet.state_dict().items():
        assert torch.equal(tensor, released[name]), name
    after = attacked.state_dict()
    assert torch.equal(after["conv_in.weight"], released["conv_in.weight"])  # not a LoRA target
    assert not torch.equal(after["mid_block.attentions.0.to_q.weight"], released["mid_block.attentions.0.to_q.weight"])
    with pytest.raises(ValueError, match="UNet takes 3x8x8"):
        finetune_unet(unet, scheduler, torch.zeros(4, 3, 16, 16), spec)


def test_a_unet_attack_and_its_score_autocast_to_bf16_like_fp32(matmul_dtypes, monkeypatch):
    unet, scheduler = build_tiny_ddpm(SIZE)
    train, test, grid = images(16, 0), images(8, 1), timestep_grid(scheduler, 4)
    spec = DiffusionAttackSpec("full", learning_rate=1e-3, steps=4, batch_size=8)
    with matmul_dtypes(unet) as dtypes:  # the attack's deep copy keeps the hooks
        half, _ = finetune_unet(unet, scheduler, train, spec, mixed_precision="bf16")
    assert dtypes == {torch.bfloat16}
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in half.parameters())
    full, _ = finetune_unet(unet, scheduler, train, spec)

    def mse(model, mixed_precision="no"):
        return np.mean(list(denoising_mse(model, scheduler, test, grid, mixed_precision=mixed_precision).values()))

    assert mse(half, "bf16") == pytest.approx(mse(half), rel=0.02)  # the score itself barely moves in bf16
    assert mse(half) == pytest.approx(mse(full), rel=0.05)  # nor does what the attack reached
    assert mse(full) < mse(unet)  # while the attack itself moved it
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # what `accelerate launch --mixed_precision` sets
    assert DiffusionEvaluateArguments(model_name_or_path="x").mixed_precision == "bf16"
    with pytest.raises(ValueError, match="mixed_precision must be one of"):
        DiffusionEvaluateArguments(model_name_or_path="x", mixed_precision="fp8")


def test_encoding_images_for_a_unet():
    pictures = [PILImage.new("RGB", (20, 20), (255, 0, 0)), PILImage.new("L", (5, 5), 0)]
    encoded = encode_diffusion_images(pictures, SIZE, 3)
    assert encoded.shape == (2, 3, SIZE, SIZE)
    torch.testing.assert_close(encoded[0, :, 0, 0], torch.tensor([1.0, -1.0, -1.0]))
    assert encoded[1].eq(-1).all()
    check_diffusion_images(encoded, SIZE, 3)
    assert encode_diffusion_images(pictures, SIZE, 1).shape == (2, 1, SIZE, SIZE)


# ----------------------------------------------------------------------------- the stages end to end


def tiny_domain(folder, seed, count=48):
    """A small save_to_disk image-classification data set (random colour blocks, 4 classes)."""
    rng = np.random.default_rng(seed)

    def split(n):
        pictures = [PILImage.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)) for _ in range(n)]
        return {"image": pictures, "label": [i % 4 for i in range(n)]}

    features = Features({"image": Image(), "label": ClassLabel(names=list("abcd"))})
    DatasetDict(
        train=Dataset.from_dict(split(count), features=features),
        test=Dataset.from_dict(split(16), features=features),
    ).save_to_disk(str(folder))
    return str(folder)


def test_protect_and_evaluate_stages_write_a_loadable_pipeline_report_and_pictures(tmp_path, capsys):
    source, target = tiny_domain(tmp_path / "source-data", 0), tiny_domain(tmp_path / "target-data", 1)
    save_ddpm(*build_tiny_ddpm(SIZE), tmp_path / "ddpm")
    write_record(tmp_path / "ddpm", {"stage": "ddpm-source", "dataset": source})
    main([
        "protect-sophon-diffusion", "--model_name_or_path", str(tmp_path / "ddpm"), "--source_dataset", source,
        "--target_dataset", target, "--output_dir", str(tmp_path / "protected"), "--iterations", "2",
        "--guard_every", "1", "--inner_steps", "1", "--environments", "1", "--inner_batch_sizes", "10",
        "--query_size", "4", "--guard_samples", "8", "--source_fraction", "1", "--target_fraction", "1",
        "--audit_validation_samples", "12",
        "--per_device_train_batch_size", "8", "--report_to", "none", "--disable_tqdm", "true", "--use_cpu", "true",
    ])  # fmt: skip
    assert "denoising MSE, original domain" in capsys.readouterr().out
    protected = tmp_path / "protected" / "model"
    record = json.loads((protected / "hf_ntl.json").read_text())
    assert record["method"] == "sophon-diffusion" and record["data"]["guard_samples"] == 8
    assert record["data"]["target_train_samples"] == 48 - 12  # all of it but what the audit chooses on
    assert set(record["denoising_mse_after"]) == {"source", "target"}
    DDPMPipeline.from_pretrained(protected, use_safetensors=True)

    args = DiffusionEvaluateArguments(
        model_name_or_path=str(protected),
        original_model_name_or_path=str(tmp_path / "ddpm"),
        target_dataset=target,
        attacks=["full-adamw-1e-3", "lora-r8"],
        steps=2,
        counts=[4, 8],
        validation_samples=12,
        probes=2,
        eval_timesteps=3,
        sample_images=2,
        num_inference_steps=2,
        output_dir=str(tmp_path / "audit"),
    )
    report = run_evaluation_diffusion(args, progress=False)
    assert report["source_dataset"] == source  # read from the model's record
    assert len(report["points"]) == 2 * 3 * 2  # attacks x (model, original, scratch) x counts
    assert report["validation_samples"] == 12 and report["test_overlap"]["total"] == 0
    assert report["validation_overlap"]["total"] == 0 and report["validation_overlap"]["counts"]["model"]
    assert report["test_overlap"]["unrecorded"]["model"] == [str(tmp_path / "ddpm")]  # its record was written by hand
    for label in ("model", "original", "scratch"):
        # The strongest attack is the lowest validation MSE, read on the test images.
        chosen = report["strongest_attack"][label][8]
        validation = report["restricted_validation_mse"][label]
        assert validation[chosen][8] == min(validation[a][8] for a in ("full-adamw-1e-3", "lora-r8"))
        assert report["worst_case_restricted_mse"][label][8] == report["restricted_mse"][label][chosen][8]
        assert set(report["worst_case_restricted_mse_by_step"][label]) == {1, 2}
    for name in ("report.json", "denoising_curves.png", "samples.png"):
        assert (tmp_path / "audit" / name).is_file(), name
    printed = tables_text(denoising_tables(report))
    assert "Restricted denoising MSE after the attack chosen on validation" in printed
    worst, chosen = report["worst_case_restricted_mse"]["model"][8], report["strongest_attack"]["model"][8]
    assert f"{worst:.4f} ({chosen})" in printed
    with pytest.raises(ValueError, match="Unknown diffusion attacks"):
        DiffusionEvaluateArguments(model_name_or_path="x", attacks=["nope"]).attack_suite()

    # The denoising SLC-AUC: SLC-AUC of -ln(worst-case MSE) against scratch's; with two counts, normalised, the mean of
    # ln(scratch's MSE / the model's): positive when the model denoises better than scratch after the attack.
    scratch = report["worst_case_restricted_mse"]["scratch"]
    for label in ("model", "original"):
        worst_mse = report["worst_case_restricted_mse"][label]
        by_hand = np.mean([np.log(scratch[n] / worst_mse[n]) for n in (4, 8)])
        assert report["slc_auc"][label]["slc_auc_normalized"] == pytest.approx(by_hand)
        assert report["slc_auc"][label]["slc_auc"] == pytest.approx(by_hand * np.log(2))
    assert f"{report['slc_auc']['model']['slc_auc']:+.3f}" in printed

    # Its card: a diffusers pipeline card whose model-index holds the denoising SLC-AUC; the plots beside it.
    main(["card", "--model_dir", str(protected), "--report_dir", str(tmp_path / "audit")])
    card = ModelCard.load(protected / "README.md")
    assert (card.data.library_name, card.data.pipeline_tag) == ("diffusers", "unconditional-image-generation")
    results = {result.metric_name: result.metric_value for result in card.data.eval_results}
    raw = results["Worst-case denoising SLC-AUC over the suite (raw)"]
    assert raw == pytest.approx(report["slc_auc"]["model"]["slc_auc"])
    assert f"{worst:.4f} ({chosen})" in card.text and "DDPMPipeline.from_pretrained" in card.text
    assert (protected / "denoising_curves.png").is_file() and (protected / "samples.png").is_file()
    with pytest.raises(InputError, match="run `hf-ntl evaluate-diffusion"):
        build_card(protected, tmp_path / "no-audit")
    one_count = dataclasses.replace(args, counts=[8], sample_images=0, output_dir=str(tmp_path / "audit-one-count"))
    run_evaluation_diffusion(one_count, progress=False)
    with pytest.raises(InputError, match="one sample count"):
        build_card(protected, tmp_path / "audit-one-count")

    # A pipeline whose records say it was fitted on restricted test images is refused before any attack.
    leaky = tmp_path / "leaky"
    shutil.copytree(tmp_path / "ddpm", leaky)
    test_images = load_from_disk(target)["test"].select([0, 1])
    write_samples(leaky, {"source fit": SampleSet.of(test_images, target, "test", SIZE)})
    leaky_args = dataclasses.replace(args, model_name_or_path=str(leaky), output_dir=None)
    with pytest.raises(TestOverlapError, match="2 test image"):
        run_evaluation_diffusion(leaky_args, progress=False)


def test_tune_searches_a_diffusion_protection_and_cards_the_chosen_pipeline(tmp_path):
    """`hf-ntl tune --method sophon-diffusion`: trials judged by the proxy's denoising SLC-AUC on validation, a floor on
    the source denoising MSE, the chosen pipeline audited on test and carded."""
    source, target = tiny_domain(tmp_path / "source-data", 0, 96), tiny_domain(tmp_path / "target-data", 1, 160)
    main([
        "fit-ddpm", "--dataset_name", source, "--image_size", str(SIZE), "--output_dir", str(tmp_path / "ddpm"),
        "--num_train_epochs", "3", "--per_device_train_batch_size", "16", "--eval_samples", "16",
        "--report_to", "none", "--disable_tqdm", "true", "--use_cpu", "true",
    ])  # fmt: skip
    (tmp_path / "protect.yaml").write_text(
        "iterations: 3\nguard_every: 1\ninner_steps: 1\nenvironments: 1\ninner_batch_sizes: [10]\nquery_size: 4\n"
        "guard_samples: 8\nper_device_train_batch_size: 8\nuse_cpu: true\n"
        "target_fraction: 0.7\n"  # 28 of the 40 target images the proxy's 100 validation images leave
    )
    (tmp_path / "space.yaml").write_text("suppression_learning_rate: {choices: [5.0e-4, 3.0e-2]}\n")
    (tmp_path / "suite.yaml").write_text(
        "- {name: full, trainable: all, optimizer: adamw, learning_rate: 1.0e-3, steps: 2, batch_size: 8}\n"
        "- {name: lora, trainable: lora, optimizer: adamw, learning_rate: 1.0e-3, steps: 2, lora_rank: 2}\n"
    )
    args = TuneArguments(
        model_name_or_path=str(tmp_path / "ddpm" / "model"),
        method="sophon-diffusion",
        source_dataset=source,
        target_dataset=target,
        trials=2,
        search_space=str(tmp_path / "space.yaml"),
        protect_config=str(tmp_path / "protect.yaml"),
        max_source_mse_ratio=100.0,
        source_validation_samples=16,
        target_validation_samples=20,
        proxy_counts=[4, 8],
        suite=str(tmp_path / "suite.yaml"),
        counts=[4, 8],
        seeds=[0],
        pruner="none",
        sampler_seed=0,
        output_dir=str(tmp_path / "tune"),
    )
    summary = run_tune(args)
    out = tmp_path / "tune"
    trials = {t["params"]["suppression_learning_rate"]: t for t in summary["trials"]}
    assert set(trials) == {5e-4, 3e-2} and trials[5e-4]["defaults"]
    assert summary["source_figure"] == "source_denoising_mse"
    # Hammering the restricted denoiser (alpha 3e-2) made it a worse start than scratch; the defaults did not. Only a
    # setting that beats the unprotected original under the same proxy may be chosen.
    validation = summary["validation"]
    assert summary["best_trial"] == trials[3e-2]["number"] and validation["worst_case_slc_auc"] < 0
    original = validation["worst_case_slc_auc_original"]
    assert validation["worst_case_slc_auc"] < original < trials[5e-4]["worst_case_slc_auc"]
    for trial in summary["trials"]:
        folder = out / trial["folder"]
        record = json.loads((folder / "model" / "hf_ntl.json").read_text())
        assert record["config"]["guard_max_mse_ratio"] == 100.0  # the guard at the floor
        assert trial["source_denoising_mse"] == record["denoising_mse_after"]["source"]
        proxy = json.loads((folder / "proxy_report.json").read_text())
        assert proxy["slc_auc"]["worst_case"]["slc_auc"] == trial["worst_case_slc_auc"]
        # Trials see the validation splits held out in the study's data folders, never a test split.
        assert {role: s["dataset"] for role, s in proxy["samples"].items()} == {
            "restricted train pool": str(out / "data" / "target"),
            "restricted validation": str(out / "data" / "target"),
            "restricted test": str(out / "data" / "target"),
            "original test": str(out / "data" / "source"),
        }
    # Scratch's proxy runs were made once and shared by every trial and the original.
    assert sorted(p.name for p in (out / "proxy_scratch").iterdir()) == ["full.json", "lora.json"]
    assert len(json.loads((out / "proxy_scratch" / "full.json").read_text())) == 2  # one seed x two counts

    # The chosen pipeline, audited with the full suite on the real test splits, released with its card.
    report, released = summary["report"], out / "model"
    assert report["target"] == target and report["source_dataset"] == source
    assert summary["test"]["worst_case_slc_auc"] == report["slc_auc"]["model"]["slc_auc"]
    record = json.loads((released / "hf_ntl.json").read_text())
    assert record["dataset"] == source and record["tuning"]["best_trial"] == summary["best_trial"]
    assert record["denoising_mse_after"]["source"] == summary["test"]["source_denoising_mse"]
    DDPMPipeline.from_pretrained(released, use_safetensors=True)
    card = ModelCard.load(released / "README.md")
    assert card.data.library_name == "diffusers" and "How the settings were chosen" in card.text
    assert f"{validation['worst_case_slc_auc']:+.3f} ({validation['worst_case_slc_auc_original']:+.3f})" in card.text
    for name in ("trials.png", "denoising_curves.png", "samples.png"):
        assert (released / name).is_file(), name
    printed = tables_text(tuning_tables(summary))
    assert "source MSE (validation)" in printed and f"{validation['source_denoising_mse']:.4f}" in printed

    # The floor: a trial's source MSE against the original's, as its own protection measured both.
    strict = dataclasses.replace(args, max_source_mse_ratio=2.0)
    objective = Objective(strict, [], ["full"], original_source=0.5)
    measured = {"denoising_mse_before": {"source": 0.5}, "denoising_mse_after": {"source": 1.5}}
    assert objective.source_figure(measured) == (1.5, pytest.approx(0.5))  # 0.5 beyond the floor of 2 x 0.5
    assert source_floor(strict, 0.5) == 1.0
    # What measures the floor cannot be searched: the trials would be measured on other terms than the original.
    (tmp_path / "seeded.yaml").write_text("seed: {low: 0, high: 9}\n")
    seeded = dataclasses.replace(args, search_space=str(tmp_path / "seeded.yaml"), output_dir=str(tmp_path / "t2"))
    with pytest.raises(InputError, match="set how source denoising MSE is measured"):
        run_tune(seeded)
