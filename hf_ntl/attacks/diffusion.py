"""Fine-tuning attacks on diffusion UNets: full fine-tuning and LoRA, judged by denoising MSE.

An attacker holds the released pipeline and n restricted-domain images and trains the UNet with
the ordinary DDPM objective (timesteps over the whole schedule). As for classifiers, the loop is
explicit: an audit runs many short independent runs, each process its own share.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from diffusers import DDPMScheduler, UNet2DModel
from peft import LoraConfig, get_peft_model
from torch import nn
from torch.nn import functional as F

from ..data.transforms import check_diffusion_images
from ..errors import InputError
from ..losses import predict_noise
from ..models import autocast
from .finetune import OPTIMIZERS, make_optimizer

# What LoRA adapts in a UNet: the attention projections and the resnet blocks' 3x3 convolutions.
UNET_LORA_SUFFIXES = ("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2")


@dataclass(frozen=True)
class DiffusionAttackSpec:
    """How an attacker fine-tunes a UNet.

    Args:
        name: the attack's name in reports.
        trainable: `"all"` (full fine-tuning) or `"lora"` (adapters on attention and resnet convs).
        optimizer / learning_rate / weight_decay: optimiser settings (`sgd`, `sgd-momentum`, `adam`, `adamw`).
        steps: optimiser steps, whatever the number of images (same budget for model and scratch).
        batch_size: images per step (all of them when fewer).
        lora_rank / lora_alpha: LoRA rank and scaling numerator (`trainable="lora"` only).
    """

    name: str = "full"
    trainable: Literal["all", "lora"] = "all"
    optimizer: Literal["sgd", "sgd-momentum", "adam", "adamw"] = "adamw"
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    steps: int = 200
    batch_size: int = 16
    lora_rank: int = 8
    lora_alpha: float | None = None

    def __post_init__(self) -> None:
        if self.trainable not in ("all", "lora"):
            raise InputError(f"{self.name}: trainable must be 'all' or 'lora' for a UNet, got {self.trainable!r}.")
        if self.optimizer not in OPTIMIZERS:
            raise InputError(f"{self.name}: unknown optimizer {self.optimizer!r}; choose one of {OPTIMIZERS}.")
        if self.learning_rate <= 0 or self.steps < 1 or self.batch_size < 1 or self.lora_rank < 1:
            raise InputError(f"{self.name}: learning_rate, steps, batch_size and lora_rank must be positive.")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def describe_attack(spec: dict[str, Any]) -> str:
    """A `DiffusionAttackSpec.to_dict()` in a few words, as cards list it."""
    trained = "all weights" if spec["trainable"] == "all" else f"LoRA r={spec['lora_rank']}"
    return f"{trained}, {spec['optimizer']} lr {spec['learning_rate']:g}, {spec['steps']} steps of {spec['batch_size']}"


DIFFUSION_SUITE = (
    DiffusionAttackSpec("full-adamw-1e-4", learning_rate=1e-4),
    DiffusionAttackSpec("full-adamw-1e-3", learning_rate=1e-3),
    DiffusionAttackSpec("lora-r8", trainable="lora", learning_rate=1e-3, lora_rank=8),
)


def unet_lora_target_modules(unet: nn.Module) -> list[str]:
    """Full names of the UNet's attention projections and resnet convs (`UNET_LORA_SUFFIXES`)."""
    names = [
        name
        for name, module in unet.named_modules()
        if isinstance(module, (nn.Linear, nn.Conv2d)) and name.endswith(UNET_LORA_SUFFIXES)
    ]
    if not names:
        raise InputError(f"{type(unet).__name__} has no attention projections or resnet convs for LoRA.")
    return names


def with_lora(unet: UNet2DModel, rank: int, alpha: float | None = None) -> nn.Module:
    """`unet` wrapped by `peft` with LoRA adapters; only the adapters are trainable.

    `UNet2DModel` has no `add_adapter`, so `get_peft_model` does the wrapping.
    """
    config = LoraConfig(r=rank, lora_alpha=alpha or 2 * rank, target_modules=unet_lora_target_modules(unet))
    with warnings.catch_warnings():  # peft probes transformers-only attributes on a diffusers model
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        return get_peft_model(unet, config)


def finetune_unet(
    unet: UNet2DModel,
    scheduler: DDPMScheduler,
    images: torch.Tensor,
    spec: DiffusionAttackSpec,
    seed: int = 0,
    *,
    probe: Callable[[nn.Module], float] | None = None,
    probe_every: int | None = None,
    mixed_precision: str = "no",
) -> tuple[UNet2DModel, dict[int, float]]:
    """Fine-tune a deep copy of `unet` on `images` following `spec`; the original is untouched.

    Returns the fine-tuned `UNet2DModel` (LoRA adapters merged into it, so it can be saved or
    sampled as a plain pipeline) and `{step: probe(model)}` recorded every `probe_every` steps and
    at the end, when a `probe` is given. Every source of randomness comes from `seed`. Forward passes
    autocast to `mixed_precision` ("no", "bf16", "fp16"; fp16 with a gradient scaler), the loss in fp32.
    """
    if len(images) == 0:
        raise ValueError("Cannot fine-tune on an empty set of images.")
    check_diffusion_images(images, unet.config.sample_size, unet.config.in_channels, "attack images")
    history: dict[int, float] = {}
    device = next(unet.parameters()).device
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model: nn.Module = copy.deepcopy(unet)
        if spec.trainable == "lora":
            model = with_lora(model, spec.lora_rank, spec.lora_alpha)
        else:
            model.requires_grad_(True)
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = make_optimizer(spec.optimizer, trainable, spec.learning_rate, spec.weight_decay)
        scaler = torch.amp.GradScaler(device.type, enabled=mixed_precision == "fp16")
        generator = torch.Generator().manual_seed(seed)
        batch_size = min(spec.batch_size, len(images))
        order = torch.empty(0, dtype=torch.long)
        model.train()
        for step in range(1, spec.steps + 1):
            if len(order) < batch_size:  # epoch-wise reshuffling: every image seen once per epoch
                order = torch.cat([order, torch.randperm(len(images), generator=generator)])
            batch, order = order[:batch_size], order[batch_size:]
            with autocast(device, mixed_precision):
                predicted, noise = predict_noise(model, scheduler, images[batch].to(device), generator=generator)
            loss = F.mse_loss(predicted.float(), noise)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            if probe is not None and (step == spec.steps or (probe_every and step % probe_every == 0)):
                history[step] = probe(model)
                model.train()
    if spec.trainable == "lora":
        model = model.merge_and_unload()
    model.eval()
    return model, history
