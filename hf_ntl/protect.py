"""The protect stage: load the source model and data, run a protection trainer, save the result.

Classifiers (NTP, SOPHON) and diffusion pipelines (SOPHON with the DoS loss) go through the same
steps: claim the output folder, load, measure before, train (resuming from the last checkpoint),
measure after, write the model and its record atomically.

The protected model is written with `save_pretrained` (safetensors; NTP's pruned weights stored as
zeros) plus its preprocessing and an `hf_ntl.json` protection record (method, configuration, data
used, method-specific results such as NTP's sparsity or SOPHON's guard log, and source accuracy
before and after, measured on the same test split with the saved weights), into
`OUTPUT_DIR/model`, only once complete.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset, DatasetDict
from diffusers import UNet2DModel
from transformers import PreTrainedModel, Trainer
from transformers.trainer_utils import get_last_checkpoint

from .artifacts import (
    claim_output_dir,
    read_record,
    replacing_directory,
    run_identity,
    run_settings,
    write_record,
    write_samples,
)
from .attacks import EncodedSplit
from .data import (
    ImagePreprocessor,
    encode_diffusion_split,
    load_image_classification_dataset,
    stratified_order,
    stratified_subset,
)
from .data.fingerprint import SampleSet
from .data.loading import SPLIT_SEED, label_encoding, validation_split
from .errors import InputError
from .metrics import predict_accuracy
from .metrics.denoising import mean_denoising_mse, timestep_grid
from .models import head_linear, load_classifier, load_ddpm, save_ddpm
from .source import MODEL_SUBDIR
from .trainers import (
    NTPConfig,
    NTPTrainer,
    SophonConfig,
    SophonConfigBase,
    SophonDiffusionConfig,
    SophonDiffusionTrainer,
    SophonTrainer,
)

# Builds the method's trainer from (model, preprocessor, source data, target data); returns it with
# the samples each role trains on (`{"target train": Dataset, ...}`: roles starting with "target"
# come from the target data set, the others from the source), for the record.
TrainerFactory = Callable[
    [PreTrainedModel, ImagePreprocessor, DatasetDict, DatasetDict], tuple[Trainer, dict[str, Dataset]]
]

# Test images scored for the record's denoising MSE (a stratified subset when the split is larger).
DIFFUSION_TEST_IMAGES = 500


def _fraction(dataset: Dataset, fraction: float, seed: int, skip: int = 0) -> Dataset:
    """A class-stratified, seeded `fraction` of `dataset`, leaving out the first `skip` samples of that order.

    The skipped samples (SOPHON's guard set) are themselves a stratified subset, disjoint from the result.
    """
    order = stratified_order(dataset["label"], seed=seed)
    count = min(max(1, round(fraction * len(dataset))), len(dataset) - skip)
    return dataset.select(order[skip : skip + count])


def _target_pool(train: Dataset, config: NTPConfig | SophonConfigBase) -> Dataset:
    """The target train split less the `config.audit_validation_samples` an audit chooses its worst case on.

    Those are `validation_split`'s, as `evaluate` carves them: were a protection to train on them, the
    audit would pick its attacks on images the model was made to resist (the leakage guard refuses that).
    """
    reserved = config.audit_validation_samples
    if not reserved:
        return train
    if reserved >= len(train):
        raise InputError(
            f"audit_validation_samples ({reserved}) leaves nothing of {config.target_dataset}'s {len(train)} train "
            "samples to protect with: lower it (and evaluate's --validation_samples with it)."
        )
    return train.select(validation_split(train["label"], reserved)[1])


def _sample_sets(used: dict[str, Dataset], config: Any, image_size: int) -> dict[str, SampleSet]:
    """The hashes of what each role trained on: `target ...` roles come from the target, the others from the source."""
    return {
        f"protection: {role}": SampleSet.of(
            dataset, config.target_dataset if role.startswith("target") else config.source_dataset, "train", image_size
        )
        for role, dataset in used.items()
    }


def _count_key(role: str) -> str:
    """`protection: source train` -> `source_train_samples` (the record's counts, as cards show them)."""
    return role.removeprefix("protection: ").replace(" ", "_") + "_samples"


def _protect(config: NTPConfig | SophonConfig, method: str, make_trainer: TrainerFactory) -> dict[str, Any]:
    if not config.model_name_or_path:
        raise InputError("Say which model to protect: model_name_or_path (a source model folder or Hub id).")
    start = time.perf_counter()
    settings = run_settings(config)
    with config.main_process_first(desc="claiming the output folder"):
        claim_output_dir(config.output_dir, run_identity("protect", config, method), config.overwrite)
    preprocessor = ImagePreprocessor.from_pretrained(config.model_name_or_path)
    source, target = (
        load_image_classification_dataset(name, image_size=preprocessor.image_size)
        for name in (config.source_dataset, config.target_dataset)
    )
    model = load_classifier(config.model_name_or_path)
    source_classes = source["train"].features["label"].num_classes
    if head_linear(model).out_features != source_classes:
        raise InputError(
            f"{config.model_name_or_path} has a {head_linear(model).out_features}-way head but {config.source_dataset} "
            f"has {source_classes} classes: protect the model on the data it was trained for."
        )
    trainer, used = make_trainer(model, preprocessor, source, target)
    samples = _sample_sets(used, config, preprocessor.image_size)
    output = Path(config.output_dir)
    checkpoint = get_last_checkpoint(str(output)) if output.is_dir() else None
    # Source accuracy is measured directly, not with `trainer.evaluate()`: an evaluation before
    # `train()` marks the model as prepared, and accelerate then skips the DDP wrapping, leaving
    # the replicas of a multi-process run to drift apart (accelerate 1.15 / transformers 5.23).
    test = EncodedSplit.from_dataset(source["test"], preprocessor)
    before = None if checkpoint else predict_accuracy(trainer.model, test.pixel_values, test.labels)
    trainer.train(resume_from_checkpoint=checkpoint)
    after = predict_accuracy(trainer.model, test.pixel_values, test.labels)
    source_record = read_record(config.model_name_or_path) if Path(config.model_name_or_path).is_dir() else {}
    record = {
        "stage": "protected",
        "method": method,
        "base_model": source_record.get("base_model", config.model_name_or_path),
        "source_model": config.model_name_or_path,
        "dataset": config.source_dataset,
        "target_dataset": config.target_dataset,
        "config": settings,
        "data": {_count_key(role): len(sample_set.hashes) for role, sample_set in samples.items()},
        "samples": {role: sample_set.summary() for role, sample_set in samples.items()},
        "source_accuracy_before": before if before is not None else source_record.get("test_accuracy"),
        "source_accuracy_after": after,
    }
    if encoding := label_encoding(source):  # the head's classes, as the card shows them
        record["label_encoding"] = encoding
    record |= trainer.method_results()
    record["wall_time_s"] = round(time.perf_counter() - start, 1)
    if trainer.is_world_process_zero():
        with replacing_directory(output / MODEL_SUBDIR) as staging:
            trainer.model.save_pretrained(staging)
            preprocessor.save_pretrained(staging)
            write_record(staging, record)
            write_samples(staging, samples)
    return record


def run_ntp(config: NTPConfig) -> dict[str, Any]:
    """Protect `config.model_name_or_path` with NTP; returns the protection record."""

    def make_trainer(model, preprocessor, source, target):
        source_train = _fraction(source["train"], config.source_fraction, config.seed)
        target_train = _fraction(_target_pool(target["train"], config), config.target_fraction, config.seed)
        trainer = NTPTrainer(
            model, config, source_train, target_train, preprocessor=preprocessor, source_eval=source["test"]
        )
        return trainer, {"source train": source_train, "target train": target_train}

    return _protect(config, "ntp", make_trainer)


def run_sophon(config: SophonConfig) -> dict[str, Any]:
    """Protect `config.model_name_or_path` with SOPHON; returns the protection record.

    The guard's samples are held out from the original domain's train split (never trained on),
    so that the test split measures the protected model without having chosen it.
    """

    def make_trainer(model, preprocessor, source, target):
        train = source["train"]
        if config.guard_samples >= len(train):
            raise InputError(
                f"guard_samples ({config.guard_samples}) must be smaller than the {len(train)} source train samples."
            )
        guard = stratified_subset(train, config.guard_samples, seed=config.seed)
        source_train = _fraction(train, config.source_fraction, config.seed, skip=config.guard_samples)
        target_train = _fraction(_target_pool(target["train"], config), config.target_fraction, config.seed)
        trainer = SophonTrainer(model, config, source_train, target_train, preprocessor, guard_eval=guard)
        return trainer, {"source train": source_train, "guard": guard, "target train": target_train}

    return _protect(config, "sophon", make_trainer)


def diffusion_test_images(split: Dataset, unet: UNet2DModel) -> torch.Tensor:
    """The test images a diffusion protection's record scores, encoded for `unet`.

    A split larger than `DIFFUSION_TEST_IMAGES` gives a stratified subset fixed by the data set (`SPLIT_SEED`), not by
    the run: the same images in every stage.
    """
    size, channels = unet.config.sample_size, unet.config.in_channels
    return encode_diffusion_split(split, size, channels, limit=DIFFUSION_TEST_IMAGES, seed=SPLIT_SEED)


def run_sophon_diffusion(config: SophonDiffusionConfig) -> dict[str, Any]:
    """Protect the DDPM pipeline `config.model_name_or_path` with SOPHON (DoS); returns the protection record.

    The protected pipeline is written with `save_pretrained` (loadable by `DDPMPipeline.from_pretrained`)
    into `OUTPUT_DIR/model` with the record, once complete. The record holds the denoising MSE on
    the original and the restricted test images before and after protection (fixed noise, a fixed
    timestep grid), the guard's log and the wall time.
    """
    if not config.model_name_or_path:
        raise InputError("Say which model to protect: model_name_or_path (a DDPM pipeline folder or Hub id).")
    start = time.perf_counter()
    settings = run_settings(config)
    with config.main_process_first(desc="claiming the output folder"):
        identity = run_identity("protect", config, "sophon-diffusion")
        claim_output_dir(config.output_dir, identity, config.overwrite)
    unet, scheduler = load_ddpm(config.model_name_or_path)
    size, channels = unet.config.sample_size, unet.config.in_channels
    source, target = (
        load_image_classification_dataset(name, image_size=size)
        for name in (config.source_dataset, config.target_dataset)
    )
    train = source["train"]
    if config.guard_samples >= len(train):
        raise InputError(
            f"guard_samples ({config.guard_samples}) must be smaller than the {len(train)} source train samples."
        )

    def encode(dataset: Dataset) -> torch.Tensor:
        return encode_diffusion_split(dataset, size, channels)

    used = {
        "guard": stratified_subset(train, config.guard_samples, seed=config.seed),
        "source train": _fraction(train, config.source_fraction, config.seed, skip=config.guard_samples),
        "target train": _fraction(_target_pool(target["train"], config), config.target_fraction, config.seed),
    }
    samples = _sample_sets(used, config, size)
    guard, source_train, target_train = (encode(used[role]) for role in ("guard", "source train", "target train"))
    tests = {
        domain: diffusion_test_images(data["test"], unet) for domain, data in (("source", source), ("target", target))
    }
    trainer = SophonDiffusionTrainer(unet, config, scheduler, source_train, target_train, guard)
    grid = timestep_grid(scheduler, config.guard_timesteps)

    def test_mse() -> dict[str, float]:
        model, seed = trainer.model, config.seed
        return {domain: mean_denoising_mse(model, scheduler, x, grid, seed=seed) for domain, x in tests.items()}

    output = Path(config.output_dir)
    checkpoint = get_last_checkpoint(str(output)) if output.is_dir() else None
    source_record = read_record(config.model_name_or_path) if Path(config.model_name_or_path).is_dir() else {}
    before = test_mse()
    trainer.train(resume_from_checkpoint=checkpoint)
    after = test_mse()
    record = {
        "stage": "protected",
        "method": "sophon-diffusion",
        "base_model": source_record.get("base_model", config.model_name_or_path),
        "source_model": config.model_name_or_path,
        "dataset": config.source_dataset,
        "target_dataset": config.target_dataset,
        "config": settings,
        "data": {
            **{_count_key(role): len(sample_set.hashes) for role, sample_set in samples.items()},
            "test_samples": {domain: len(images) for domain, images in tests.items()},
        },
        "samples": {role: sample_set.summary() for role, sample_set in samples.items()},
        "timestep_grid": grid,
        "denoising_mse_before": before,
        "denoising_mse_after": after,
        **trainer.method_results(),
        "wall_time_s": round(time.perf_counter() - start, 1),
    }
    if trainer.is_world_process_zero():
        with replacing_directory(output / MODEL_SUBDIR) as staging:
            save_ddpm(trainer.model, scheduler, staging)
            write_record(staging, record)
            write_samples(staging, samples)
    return record


# Every classifier protection, by the name commands use (`hf-ntl demo --method`, `hf-ntl tune --method`):
# its configuration class (the options of `hf-ntl protect-NAME`) and the function that runs it. A method
# added here is offered by the demo and searchable by `hf-ntl tune` (given a search space).
PROTECTIONS: dict[str, tuple[type, Callable[..., dict[str, Any]]]] = {
    "ntp": (NTPConfig, run_ntp),
    "sophon": (SophonConfig, run_sophon),
}
# The same for diffusion pipelines (searchable by `hf-ntl tune`, audited with `evaluate-diffusion`).
DIFFUSION_PROTECTIONS: dict[str, tuple[type, Callable[..., dict[str, Any]]]] = {
    "sophon-diffusion": (SophonDiffusionConfig, run_sophon_diffusion),
}
