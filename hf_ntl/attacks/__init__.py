"""Attacks: fine-tune a fresh copy of a checkpoint on a few target samples, as an attacker would."""

from .diffusion import DIFFUSION_SUITE, DiffusionAttackSpec, finetune_unet, unet_lora_target_modules, with_lora
from .finetune import (
    OPTIMIZERS,
    AttackSpec,
    EncodedOnDemand,
    EncodedSplit,
    finetune,
    finetuned_accuracy,
    lora_target_modules,
    make_optimizer,
    pruning_masks,
)
from .suite import DEFAULT_SUITE, MASKED_ATTACK, QUICK_SUITE, SUITES, load_suite

__all__ = [
    "DEFAULT_SUITE",
    "DIFFUSION_SUITE",
    "MASKED_ATTACK",
    "OPTIMIZERS",
    "QUICK_SUITE",
    "SUITES",
    "AttackSpec",
    "DiffusionAttackSpec",
    "EncodedOnDemand",
    "EncodedSplit",
    "finetune",
    "finetune_unet",
    "finetuned_accuracy",
    "load_suite",
    "lora_target_modules",
    "make_optimizer",
    "pruning_masks",
    "unet_lora_target_modules",
    "with_lora",
]
