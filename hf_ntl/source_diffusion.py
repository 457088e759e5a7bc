"""Fit the owner's unconditional diffusion model (DDPM) with `Trainer`: the "original" SOPHON protects.

The UNet learns the ordinary DDPM objective on one domain's images (labels ignored); the result is
a `DDPMPipeline` folder (`save_pretrained`, safetensors) that `DDPMPipeline.from_pretrained` loads,
with an `hf_ntl.json` record holding the test denoising MSE.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import DDPMScheduler
from torch.nn import functional as F
from transformers import Trainer, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from .artifacts import claim_output_dir, replacing_directory, run_identity, write_record, write_samples
from .data import DiffusionImages, encode_diffusion_images, encode_diffusion_split, load_image_classification_dataset
from .data.fingerprint import SampleSet
from .data.loading import SPLIT_SEED
from .errors import InputError
from .losses import predict_noise
from .metrics.denoising import mean_denoising_mse, timestep_grid
from .models import TINY_UNET_PRESET, load_ddpm, save_ddpm
from .source import MODEL_SUBDIR
from .terminal import metric_status, show_progress


@dataclass
class DiffusionSourceConfig(TrainingArguments):
    """What to fit the owner's DDPM on, and how (every `TrainingArguments` field applies too).

    The defaults train the tiny preset from scratch on an embedded domain at 16x16 on CPU in a few
    minutes; for a Hub pipeline (e.g. google/ddpm-cifar10-32) lower `learning_rate` (1e-4).
    """

    model_name_or_path: str = field(
        default=TINY_UNET_PRESET,
        metadata={"help": f"`{TINY_UNET_PRESET}`, a DDPMPipeline folder, or a Hub id (google/ddpm-cifar10-32)."},
    )
    dataset_name: str = field(
        default="font-digits", metadata={"help": "Embedded domain, save_to_disk folder, imagefolder, or Hub id."}
    )
    image_size: int = field(default=16, metadata={"help": "Image side of the tiny preset (others: the UNet's)."})
    eval_samples: int = field(default=500, metadata={"help": "Test images for the recorded denoising MSE."})
    eval_timesteps: int = field(default=10, metadata={"help": "Timesteps of the denoising-MSE grid."})
    overwrite: bool = field(
        default=False, metadata={"help": "Start afresh in an output_dir that holds another run or a finished model."}
    )

    # Defaults that differ from TrainingArguments: a small UNet trained from scratch, on CPU.
    output_dir: str | None = field(default="runs/ddpm-source", metadata={"help": "Checkpoints and the pipeline."})
    learning_rate: float = field(default=1e-3, metadata={"help": "Peak learning rate (AdamW)."})
    num_train_epochs: float = field(default=5.0, metadata={"help": "Training epochs."})
    per_device_train_batch_size: int = field(default=64, metadata={"help": "Images per step and device."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "Learning-rate schedule."})
    warmup_steps: float = field(default=0.05, metadata={"help": "Warm-up steps (a float < 1 is a fraction)."})
    save_strategy: str = field(default="epoch", metadata={"help": "When to checkpoint (for resuming)."})
    save_total_limit: int | None = field(default=1, metadata={"help": "Checkpoints kept."})
    logging_steps: float = field(default=25, metadata={"help": "Log every N steps."})
    label_names: list[str] | None = field(default_factory=list, metadata={"help": "Keep empty: no labels."})
    # Batches are `{"pixel_values"}`, which is not a UNet forward() argument: keep it.
    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep False: the loss needs pixel_values."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if not torch.cuda.is_available():
            self.dataloader_pin_memory = False
        if self.eval_samples < 1 or self.eval_timesteps < 1:
            raise InputError("eval_samples and eval_timesteps must be >= 1.")


class DenoisingTrainer(Trainer):
    """`Trainer` on the DDPM objective: noise images at random timesteps, regress the noise (MSE)."""

    # compute_loss returns a per-batch mean: let Trainer divide it by the accumulation steps.
    loss_is_scaled_for_ga = False

    def __init__(self, *args: Any, noise_scheduler: DDPMScheduler, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.noise_scheduler = noise_scheduler

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        predicted, noise = predict_noise(model, self.noise_scheduler, inputs["pixel_values"])
        loss = F.mse_loss(predicted, noise)
        return (loss, predicted) if return_outputs else loss


def run_diffusion_source(config: DiffusionSourceConfig) -> dict[str, Any]:
    """Fit the DDPM in `config` and save `output_dir/model` as a pipeline (safetensors + record)."""
    start = time.perf_counter()
    with config.main_process_first(desc="claiming the output folder"):
        claim_output_dir(config.output_dir, run_identity("ddpm-source", config), config.overwrite)
    unet, scheduler = load_ddpm(config.model_name_or_path, image_size=config.image_size, seed=config.seed)
    size, channels = unet.config.sample_size, unet.config.in_channels
    dataset = load_image_classification_dataset(config.dataset_name, image_size=size)
    train = encode_diffusion_images(dataset["train"]["image"], size, channels)
    # The scored test subset is the data set's (SPLIT_SEED), not the run's: the same images in every stage.
    test = encode_diffusion_split(dataset["test"], size, channels, limit=config.eval_samples, seed=SPLIT_SEED)
    grid = timestep_grid(scheduler, config.eval_timesteps)
    samples = {"source fit": SampleSet.of(dataset["train"], config.dataset_name, "train", size)}
    trainer = DenoisingTrainer(model=unet, args=config, train_dataset=DiffusionImages(train), noise_scheduler=scheduler)
    show_progress(trainer, "DDPM fit", metric_status(("loss", "denoising loss {:.4f}")))
    output = Path(config.output_dir)
    checkpoint = get_last_checkpoint(str(output)) if output.is_dir() else None
    trainer.train(resume_from_checkpoint=checkpoint)
    record = {
        "stage": "ddpm-source",
        "base_model": config.model_name_or_path,
        "dataset": config.dataset_name,
        "image_size": size,
        "channels": channels,
        "train_samples": len(train),
        "test_samples": len(test),
        "epochs": config.num_train_epochs,
        "seed": config.seed,
        "samples": {role: sample_set.summary() for role, sample_set in samples.items()},
        "timestep_grid": grid,
        "test_denoising_mse": mean_denoising_mse(trainer.model, scheduler, test, grid, seed=config.seed),
        "wall_time_s": round(time.perf_counter() - start, 1),
    }
    if trainer.is_world_process_zero():
        with replacing_directory(output / MODEL_SUBDIR) as staging:
            save_ddpm(trainer.model, scheduler, staging)
            write_record(staging, record)
            write_samples(staging, samples)
    return record
