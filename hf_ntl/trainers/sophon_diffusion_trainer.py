"""SophonDiffusionTrainer: non-fine-tunable learning for unconditional diffusion UNets (ALGORITHMS.md §3).

The loop is `SophonBaseTrainer`'s, the same as for classifiers. What is particular to diffusion:
the simulated attacker fine-tunes with the ordinary denoising MSE `||eps_theta(x_t, t) - eps||^2`;
the suppression loss on its query batch is DoS, `||eps_theta(x_t, t)||^2`; NTR steps are ordinary
DDPM training steps; the guard reads the original-domain denoising MSE on fixed noise.

Why a `Trainer` subclass works here (where the diffusers examples write an explicit accelerate
loop): NTR is a plain training step on one loss, which `compute_loss` expresses, and FTS/guard
live in hooks and callbacks, so DDP, gradient accumulation, mixed precision, checkpointing and
resuming come from `Trainer`. Two things `Trainer` cannot do for a diffusers model are done here:
`evaluate()` is replaced by the deterministic denoising MSE (Trainer's loop would score random
noise and expects labels or a `return_loss` argument), and the final model is saved as a pipeline
with `save_pretrained` by the protect stage (Trainer's own save writes a bare state dict, which is
what its checkpoints need for resuming).
"""

from __future__ import annotations

from typing import Any

import torch
from accelerate.utils import extract_model_from_parallel
from diffusers import DDPMScheduler, UNet2DModel
from torch.nn import functional as F

from ..attacks import unet_lora_target_modules
from ..data.transforms import DiffusionImages, check_diffusion_images
from ..errors import InputError
from ..losses import denial_of_service_loss, predict_noise
from ..metrics.denoising import mean_denoising_mse, timestep_grid
from .sophon_base import (
    AttackerState,
    Forward,
    SimulatedAttack,
    SophonBaseTrainer,
    log_uniform,
    lora_adapted,
    lora_factors,
    lora_trainable,
    pick,
)
from .sophon_diffusion_config import SophonDiffusionConfig


class SophonDiffusionTrainer(SophonBaseTrainer):
    """Make a DDPM UNet keep denoising its original domain but resist fine-tuning on a restricted one.

    Args:
        model: the `UNet2DModel`, trained on the original domain.
        args: a `SophonDiffusionConfig`.
        noise_scheduler: its `DDPMScheduler` (the forward noising process).
        source_images: original-domain training images for NTR, encoded `(N, C, H, W)` in [-1, 1].
        restricted_images: restricted-domain images the simulated attackers fine-tune on.
        guard_images: original-domain images never trained on, for the guard.
    """

    guard_metric = "eval_denoising_mse"
    # compute_loss returns a per-batch mean: let Trainer divide it by the accumulation steps.
    loss_is_scaled_for_ga = False

    def __init__(
        self,
        model: UNet2DModel,
        args: SophonDiffusionConfig,
        noise_scheduler: DDPMScheduler,
        source_images: torch.Tensor,
        restricted_images: torch.Tensor,
        guard_images: torch.Tensor,
        **kwargs: Any,
    ) -> None:
        if not isinstance(model, UNet2DModel):
            raise TypeError(f"SophonDiffusionTrainer protects a diffusers UNet2DModel, got {type(model).__name__}.")
        size, channels = model.config.sample_size, model.config.in_channels
        for images, what in (
            (source_images, "original-domain training images"),
            (restricted_images, "restricted-domain images"),
            (guard_images, "guard images"),
        ):
            if len(images) == 0:
                raise ValueError(f"SOPHON needs {what}; none were given.")
            check_diffusion_images(images, size, channels, what)
        last = noise_scheduler.config.num_train_timesteps - 1
        if (args.timestep_max or 0) > last or args.timestep_min > last:
            raise InputError(f"timestep_min/timestep_max must be <= {last}, the schedule's last timestep.")
        super().__init__(
            model,
            args,
            restricted_size=len(restricted_images),
            train_dataset=DiffusionImages(source_images),
            eval_dataset=DiffusionImages(guard_images),
            **kwargs,
        )
        self.noise_scheduler = noise_scheduler
        self.restricted = restricted_images
        self.guard_images = guard_images
        self.guard_grid = timestep_grid(noise_scheduler, args.guard_timesteps)
        # The weights a LoRA attacker adapts: those of the layers the diffusion suite's LoRA attack targets.
        self.lora_weights = [f"{module}.weight" for module in unet_lora_target_modules(model)]

    # ------------------------------------------------------------------ NTR: ordinary DDPM training

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        predicted, noise = predict_noise(model, self.noise_scheduler, inputs["pixel_values"])
        loss = F.mse_loss(predicted, noise)
        return (loss, predicted) if return_outputs else loss

    # ------------------------------------------------------------------ the simulated attackers

    def attacker_families(self) -> list[str]:
        # A full fine-tuning attacker's optimiser is its kind; LoRA attackers are one more, when asked for.
        return list(self.args.inner_optimizers) + (["lora"] if self.args.lora_ranks else [])

    def draw_attack(self, family: str, generator: torch.Generator) -> SimulatedAttack:
        config = self.args
        lora = family == "lora"
        return SimulatedAttack(
            family=family,
            optimizer="adamw" if lora else family,  # the diffusion suite's LoRA attack trains with AdamW
            learning_rate=log_uniform(config.inner_lr_min, config.inner_lr_max, generator),
            batch_size=pick(config.inner_batch_sizes, generator),
            trainable="lora" if lora else "all",
            lora_rank=pick(config.lora_ranks, generator) if lora else 0,
        )

    def attacker_copy(self, attack: SimulatedAttack, generator: torch.Generator) -> AttackerState:
        """A LoRA attacker's copy: the UNet's weights as released (its meta-gradient is taken there, through the
        attacker's current adapters, first-order) and low-rank factors on the layers `with_lora` adapts; a full
        fine-tuning attacker's is the base class's."""
        if attack.trainable != "lora":
            return super().attacker_copy(attack, generator)
        weights = {name: p.detach().clone().requires_grad_(True) for name, p in self.model.named_parameters()}
        buffers = {name: b.detach().clone() for name, b in self.model.named_buffers()}
        factors = lora_factors(weights, self.lora_weights, attack.lora_rank, generator)
        return AttackerState(
            lora_trainable(factors), weights, buffers, parameters=lambda: weights | lora_adapted(weights, factors)
        )

    def restricted_batch(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.restricted[indices].to(self.args.device)}

    def _noise_prediction(self, forward: Forward, batch: dict[str, torch.Tensor], generator: torch.Generator):
        return predict_noise(
            forward,
            self.noise_scheduler,
            batch["pixel_values"],
            generator=generator,
            min_timestep=self.args.timestep_min,
            max_timestep=self.args.timestep_max,
        )

    def attacker_loss(self, forward: Forward, batch: dict[str, torch.Tensor], generator: torch.Generator):
        predicted, noise = self._noise_prediction(forward, batch, generator)
        return F.mse_loss(predicted, noise)

    def suppression_loss(self, forward: Forward, batch: dict[str, torch.Tensor], generator: torch.Generator):
        predicted, noise = self._noise_prediction(forward, batch, generator)
        return denial_of_service_loss(predicted), {"denoising_mse": F.mse_loss(predicted, noise).item()}

    # ------------------------------------------------------------------ the guard

    def guard_value(self) -> float:
        unet = extract_model_from_parallel(self.model)
        return mean_denoising_mse(unet, self.noise_scheduler, self.guard_images, self.guard_grid, seed=self.args.seed)

    def guard_passes(self, value: float) -> bool:
        return value <= self.args.guard_max_mse_ratio * self.guard_log["initial"]

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """The guard's metric: original-domain denoising MSE on fixed noise over the timestep grid.

        Deterministic and computed in full on every process (identical replicas give identical
        values), so every rank's guard takes the same decision.
        """
        metrics = {f"{metric_key_prefix}_denoising_mse": self.guard_value()}
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics
