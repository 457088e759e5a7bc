"""Configuration of SOPHON, non-fine-tunable learning (ALGORITHMS.md §3): what every model kind shares,
and the classifier's own settings."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import TrainingArguments

from ..attacks import OPTIMIZERS
from ..errors import InputError
from ..losses import SUPPRESSION_LOSSES


@dataclass
class SophonConfigBase(TrainingArguments):
    """The SOPHON settings every model kind shares: data, the outer loop, the simulated attackers, the guard's cadence.

    One outer iteration is one fine-tuning-suppression (FTS) step followed by `ntr_steps` normal-
    training (NTR) steps on the original domain. `Trainer` runs the NTR steps (its optimiser,
    `learning_rate` = beta, its data loader over the original domain); the FTS step has its own Adam
    with `suppression_learning_rate` = alpha. Training length is `max_steps = iterations * ntr_steps`
    (any `max_steps`/`num_train_epochs` given is replaced); the guard evaluates, and a checkpoint is
    written, every `guard_every` iterations.
    """

    # What to protect and on which data (used by the protect stage and the CLI).
    model_name_or_path: str | None = field(default=None, metadata={"help": "The source model: folder or Hub id."})
    source_dataset: str = field(default="font-digits", metadata={"help": "The owner's (original) domain."})
    target_dataset: str = field(default="uci-digits", metadata={"help": "The restricted domain to make untunable."})
    source_fraction: float = field(default=0.2, metadata={"help": "Fraction of the source train split used."})
    target_fraction: float = field(default=0.2, metadata={"help": "Fraction of the target train split used."})

    overwrite: bool = field(
        default=False, metadata={"help": "Start afresh in an output_dir that holds another run or a finished model."}
    )

    # The outer loop.
    suppression_learning_rate: float = field(default=3e-4, metadata={"help": "alpha: Adam lr of the FTS step."})
    fts_max_grad_norm: float = field(default=0.5, metadata={"help": "Clip of the averaged meta-gradient norm."})
    iterations: int = field(default=150, metadata={"help": "Outer iterations (one FTS step + ntr_steps each)."})
    ntr_steps: int = field(default=1, metadata={"help": "l_NTR: normal-training steps per iteration."})

    # The simulated attackers.
    inner_steps: int = field(default=10, metadata={"help": "K: fine-tuning steps of each simulated attacker."})
    environments: int = field(default=2, metadata={"help": "Simulated attackers per iteration (per process)."})
    inner_batch_sizes: list[int] = field(
        default_factory=lambda: [48, 80],
        metadata={"help": "Restricted samples drawn per inner step (support + query), sampled per attacker."},
    )
    query_size: int = field(default=16, metadata={"help": "Of each inner batch, the samples held out as query."})
    inner_optimizers: list[str] = field(
        default_factory=lambda: list(OPTIMIZERS),
        metadata={"help": f"Optimisers the simulated attackers sample from: {', '.join(OPTIMIZERS)}."},
    )
    inner_lr_min: float = field(default=1e-4, metadata={"help": "Lower end of the log-uniform attacker lr."})
    inner_lr_max: float = field(default=1e-2, metadata={"help": "Upper end of the log-uniform attacker lr."})

    # The guard's cadence (what it checks is the model kind's).
    guard_every: int = field(default=25, metadata={"help": "Guard evaluation (and checkpoint) every N iterations."})
    guard_samples: int = field(
        default=500, metadata={"help": "Original-domain train samples held out (never trained on) for the guard."}
    )

    # Defaults that differ from TrainingArguments.
    output_dir: str | None = field(default="runs/sophon", metadata={"help": "Checkpoints and the protected model."})
    learning_rate: float = field(default=5e-4, metadata={"help": "beta: Adam(W) lr of the NTR steps."})
    weight_decay: float = field(default=0.0, metadata={"help": "Weight decay of the NTR steps."})
    per_device_train_batch_size: int = field(default=64, metadata={"help": "Original-domain batch per NTR step."})
    per_device_eval_batch_size: int = field(default=256, metadata={"help": "Batch size of guard evaluations."})
    lr_scheduler_type: str = field(default="constant", metadata={"help": "NTR learning-rate schedule."})
    logging_steps: float = field(default=5, metadata={"help": "Log every N NTR steps."})
    save_strategy: str = field(default="steps", metadata={"help": "Checkpoint at every guard evaluation."})
    save_total_limit: int | None = field(default=2, metadata={"help": "Checkpoints kept."})
    eval_strategy: str = field(default="steps", metadata={"help": "Guard evaluations (set by guard_every)."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep False: the collator needs them."})

    def __post_init__(self) -> None:
        self.max_steps = self.iterations * self.ntr_steps
        # The guard is a Trainer evaluation; checkpoints follow it so that a saved state passed the guard.
        self.eval_steps = self.guard_every * self.ntr_steps
        self.save_steps = self.eval_steps
        super().__post_init__()
        if not torch.cuda.is_available():
            self.dataloader_pin_memory = False
        for ok, message in self.validation_checks():
            if not ok:
                raise InputError(message)

    def validation_checks(self) -> list[tuple[bool, str]]:
        """(condition, error message) pairs checked at construction; model kinds add their own."""
        smallest_batch = min(self.inner_batch_sizes, default=0)
        return [
            (self.suppression_learning_rate > 0, "suppression_learning_rate (alpha) must be positive."),
            (self.fts_max_grad_norm > 0, "fts_max_grad_norm must be positive."),
            (self.iterations >= 1 and self.ntr_steps >= 1, "iterations and ntr_steps must be >= 1."),
            (self.inner_steps >= 1, f"inner_steps (K) must be >= 1, got {self.inner_steps}."),
            (self.environments >= 1, f"environments must be >= 1, got {self.environments}."),
            (self.query_size >= 1, f"query_size must be >= 1, got {self.query_size}."),
            (
                smallest_batch > self.query_size,
                f"Every inner batch must be larger than query_size ({self.query_size}) to leave a support set; "
                f"got inner_batch_sizes={self.inner_batch_sizes}.",
            ),
            (
                bool(self.inner_optimizers) and all(name in OPTIMIZERS for name in self.inner_optimizers),
                f"inner_optimizers must be a non-empty subset of {OPTIMIZERS}, got {self.inner_optimizers}.",
            ),
            (
                0 < self.inner_lr_min <= self.inner_lr_max,
                f"Need 0 < inner_lr_min <= inner_lr_max, got {self.inner_lr_min} and {self.inner_lr_max}.",
            ),
            (self.guard_every >= 1 and self.guard_samples >= 1, "guard_every and guard_samples must be >= 1."),
            (0 < self.source_fraction <= 1 and 0 < self.target_fraction <= 1, "data fractions must lie in (0, 1]."),
            (not self.remove_unused_columns, "remove_unused_columns=True would drop the columns the collator needs."),
        ]


@dataclass
class SophonConfig(SophonConfigBase):
    """What to protect, against which restricted domain, and every SOPHON hyper-parameter, for image classifiers.

    Defaults follow the paper's ICE setting (alpha 3e-4, beta 5e-4, gradient clip 0.5, guard at
    80 %), scaled down in length (K, iterations, batch sizes) for the tiny presets on CPU, and sample
    adaptive optimisers in the simulated attacks, which the reference code did not (plain SGD only)
    and to which third-party replications found SOPHON vulnerable.
    """

    suppression_loss: str = field(
        default="ice",
        metadata={
            "help": "`ice` (paper: -log(1 - p_y)), `ice_neg_logits` (reference code: CE(-z, y)) or `klu` "
            "(KL from uniform, label-free)."
        },
    )
    head_reinit_probability: float = field(
        default=0.5,
        metadata={
            "help": "Probability that a simulated attacker starts from a fresh head; must be 1 when the restricted "
            "domain's class count differs from the model's."
        },
    )
    guard_threshold: float = field(
        default=0.8, metadata={"help": "Minimum original-domain accuracy; below it the last good state is restored."}
    )
    guard_max_drop: float | None = field(
        default=None,
        metadata={
            "help": "Also restore the last good state when original-domain accuracy falls more than this below the "
            "model's own at the start (0.02 = 2 points), on the same guard samples: a floor relative to the model."
        },
    )

    def validation_checks(self) -> list[tuple[bool, str]]:
        return [
            *super().validation_checks(),
            (
                self.suppression_loss in SUPPRESSION_LOSSES,
                f"suppression_loss must be one of {list(SUPPRESSION_LOSSES)}, got {self.suppression_loss!r}.",
            ),
            (0 <= self.head_reinit_probability <= 1, "head_reinit_probability must lie in [0, 1]."),
            (0 <= self.guard_threshold <= 1, "guard_threshold is an accuracy and must lie in [0, 1]."),
            (
                self.guard_max_drop is None or 0 <= self.guard_max_drop <= 1,
                f"guard_max_drop is an accuracy difference and must lie in [0, 1], got {self.guard_max_drop}.",
            ),
        ]
