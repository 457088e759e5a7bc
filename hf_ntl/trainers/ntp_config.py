"""Configuration of NTP, non-transferable pruning (ALGORITHMS.md §1)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import TrainingArguments

from ..data.loading import AUDIT_VALIDATION_SAMPLES
from ..errors import InputError


@dataclass
class NTPConfig(TrainingArguments):
    """What to protect, against which target, and every NTP hyper-parameter.

    Training length is set by the method, not by epochs: `max_steps = admm_rounds *
    steps_per_round + retrain_steps` (any `max_steps`/`num_train_epochs` given is replaced).
    alpha, fisher_lambda and the two data fractions were chosen by a sweep on validation
    (README, "Choosing NTP's defaults": the setting that kept the owner's accuracy within 2 points on
    both swept pairs with the lowest proxy worst case); the rest follow the reference code where it is
    sound (rho 0.005, cap 10, Adam lr 1e-3 with weight decay 8e-4), scaled down in length for the tiny
    presets on CPU.
    """

    # What to protect and on which data (used by `run_ntp` and the CLI).
    model_name_or_path: str | None = field(default=None, metadata={"help": "The source model: folder or Hub id."})
    source_dataset: str = field(default="font-digits", metadata={"help": "The owner's (authorised) domain."})
    target_dataset: str = field(default="uci-digits", metadata={"help": "The unauthorised target domain."})
    # All of the source split: on a tenth, 400 steps overfit it and cost textured-digits' owner 4.6-8.2 points.
    source_fraction: float = field(default=1.0, metadata={"help": "Fraction of the source train split used."})
    target_fraction: float = field(
        default=0.3, metadata={"help": "Fraction of the target train split (less the audit's validation samples) used."}
    )
    audit_validation_samples: int = field(
        default=AUDIT_VALIDATION_SAMPLES,
        metadata={
            "help": "Target train samples never trained on: the ones an audit with `evaluate --validation_samples` up "
            "to this many chooses its worst case on (fixed by the data set). 0 trains on the whole split."
        },
    )

    overwrite: bool = field(
        default=False, metadata={"help": "Start afresh in an output_dir that holds another run or a finished model."}
    )

    # Sparsity and ADMM.
    # Without BatchNorm nothing rescales a layer's output after 90 % of its weights are cut: on tiny-convnext the
    # hard prune to 0.9 left 14 % source accuracy, 0.3 kept it within 1.3 points (README, "What NTP needs without
    # BatchNorm"; chosen on a validation stand-in). tiny-vit loses about 9 points even at 0.3.
    sparsity: float | None = field(
        default=None,
        metadata={
            "help": "Target fraction of pruned weights, in (0, 1); default: 0.9 for a model with BatchNorm (ResNets), "
            "0.3 without (ConvNeXt, ViT)."
        },
    )
    rho: float = field(default=0.005, metadata={"help": "ADMM penalty weight rho."})
    rho_mult: float = field(default=1.0, metadata={"help": "rho is multiplied by this after each round (>= 1)."})
    rho_max: float = field(default=1.0, metadata={"help": "Upper bound for rho."})
    admm_rounds: int = field(default=5, metadata={"help": "Number of ADMM rounds (W-, Z-, U-steps)."})
    steps_per_round: int = field(default=60, metadata={"help": "Optimiser steps in each W-step."})
    projection: str = field(
        default="topk",
        metadata={"help": "Z-step: `topk` (exact global sparsity) or `l1` (soft threshold, as the reference code)."},
    )
    l1_lambda: float = field(default=1e-4, metadata={"help": "For `l1`: threshold delta = l1_lambda / rho."})
    prunable_patterns: list[str] | None = field(
        default=None,
        metadata={"help": "Regexes over parameter names to prune (default: conv/linear weights of the encoder)."},
    )
    retrain_steps: int = field(default=100, metadata={"help": "Masked retraining steps after the hard prune."})

    # The objective.
    alpha: float = field(default=3.0, metadata={"help": "Weight of the (capped) target cross-entropy, maximised."})
    target_ce_cap: float = field(default=10.0, metadata={"help": "Cap on the target cross-entropy term."})
    fisher_lambda: float = field(default=1.0, metadata={"help": "Weight of the Fisher ratio on target features."})
    target_head: str = field(
        default="probe",
        metadata={"help": "`probe`: a linear head fitted on frozen target features; `shared`: the model's own head."},
    )
    probe_steps: int = field(default=300, metadata={"help": "Full-batch Adam steps fitting the target probe."})
    probe_learning_rate: float = field(default=1e-2, metadata={"help": "Learning rate of the probe."})

    # Defaults that differ from TrainingArguments.
    output_dir: str | None = field(default="runs/ntp", metadata={"help": "Checkpoints and the protected model."})
    learning_rate: float = field(default=1e-3, metadata={"help": "Adam(W) learning rate of the W-steps."})
    weight_decay: float = field(default=8e-4, metadata={"help": "Weight decay (reference code: 8e-4)."})
    per_device_train_batch_size: int = field(default=64, metadata={"help": "Paired batch size per device."})
    per_device_eval_batch_size: int = field(default=256, metadata={"help": "Eval batch size (source test)."})
    lr_scheduler_type: str = field(default="constant", metadata={"help": "Constant: ADMM rounds need a live lr."})
    logging_steps: float = field(default=20, metadata={"help": "Log every N steps."})
    save_strategy: str = field(default="steps", metadata={"help": "Checkpoint at every ADMM round end."})
    save_total_limit: int | None = field(default=2, metadata={"help": "Checkpoints kept."})
    eval_strategy: str = field(default="steps", metadata={"help": "Source accuracy at every ADMM round end."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep False: target columns are needed."})

    def __post_init__(self) -> None:
        self.max_steps = self.admm_rounds * self.steps_per_round + self.retrain_steps
        # Round ends are where Z/U/masks change; checkpoints and source accuracy belong there.
        self.save_steps = self.steps_per_round
        self.eval_steps = self.steps_per_round
        super().__post_init__()
        if not torch.cuda.is_available():
            self.dataloader_pin_memory = False
        checks = [
            (self.sparsity is None or 0.0 < self.sparsity < 1.0, f"sparsity must lie in (0, 1), got {self.sparsity}."),
            (self.rho > 0, f"rho must be positive, got {self.rho}."),
            (self.rho_mult >= 1.0, f"rho_mult must be >= 1 (rho only grows), got {self.rho_mult}."),
            (self.rho_max >= self.rho, f"rho_max ({self.rho_max}) must be >= rho ({self.rho})."),
            (self.admm_rounds >= 1 and self.steps_per_round >= 1, "admm_rounds and steps_per_round must be >= 1."),
            (self.retrain_steps >= 0, "retrain_steps must be >= 0."),
            (self.projection in ("topk", "l1"), f"projection must be 'topk' or 'l1', got {self.projection!r}."),
            (self.l1_lambda > 0, "l1_lambda must be positive."),
            (self.alpha >= 0 and self.fisher_lambda >= 0, "alpha and fisher_lambda must be >= 0."),
            (self.target_ce_cap > 0, "target_ce_cap must be positive."),
            (
                self.target_head in ("probe", "shared"),
                f"target_head must be 'probe' or 'shared', got {self.target_head!r}.",
            ),
            (
                self.probe_steps >= 1 and self.probe_learning_rate > 0,
                "probe_steps and probe_learning_rate must be positive.",
            ),
            (0 < self.source_fraction <= 1 and 0 < self.target_fraction <= 1, "data fractions must lie in (0, 1]."),
            (self.audit_validation_samples >= 0, "audit_validation_samples must be >= 0."),
            (not self.remove_unused_columns, "remove_unused_columns=True would drop the target columns NTP needs."),
        ]
        for ok, message in checks:
            if not ok:
                raise InputError(message)
