"""Configuration of SOPHON, non-fine-tunable learning (ALGORITHMS.md §3): what every model kind shares,
and the classifier's own settings."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from transformers import TrainingArguments

from ..data.loading import AUDIT_VALIDATION_SAMPLES
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
    target_fraction: float = field(
        default=0.2, metadata={"help": "Fraction of the target train split (less the audit's validation samples) used."}
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

    # The outer loop.
    suppression_learning_rate: float = field(default=3e-4, metadata={"help": "alpha: Adam lr of the FTS step."})
    fts_max_grad_norm: float = field(default=0.5, metadata={"help": "Clip of the averaged meta-gradient norm."})
    iterations: int = field(default=150, metadata={"help": "Outer iterations (one FTS step + ntr_steps each)."})
    ntr_steps: int = field(default=1, metadata={"help": "l_NTR: normal-training steps per iteration."})

    # The simulated attackers (what each kind of attacker does is the model kind's).
    inner_steps: int = field(default=10, metadata={"help": "K: fine-tuning steps of each simulated attacker."})
    environments: int = field(default=2, metadata={"help": "Simulated attackers per iteration (per process)."})
    inner_batch_sizes: list[int] = field(
        default_factory=lambda: [48, 80],
        metadata={"help": "Restricted samples drawn per inner step (support + query), sampled per attacker."},
    )
    query_size: int = field(default=16, metadata={"help": "Of each inner batch, the samples held out as query."})
    attacker_horizon: int = field(
        default=0,
        metadata={
            "help": "Steps each simulated attacker is followed for (rounded up to whole iterations of inner_steps). "
            "Above inner_steps, an environment keeps its attacker across iterations (inner_steps more per "
            "iteration, carried onto the model's new weights) and restarts it from the current model after this "
            "many, so the suppression loss sees where a long fine-tuning run goes at the memory of a short one; "
            "0: a fresh attacker every iteration (the paper)."
        },
    )
    small_data_probability: float = field(
        default=0.25,
        metadata={
            "help": "Probability that a simulated attacker owns only a few restricted samples (see small_data_sizes), "
            "which it fine-tunes on repeatedly, as the small-n points of an audit do; its query comes from the rest."
        },
    )
    small_data_sizes: list[int] = field(
        default_factory=lambda: [10, 50],
        metadata={
            "help": "Smallest and largest sample count of a small-data attacker (uniform between; the largest is "
            "capped so that query_size others remain)."
        },
    )
    adversarial_temperature: float = field(
        default=0.25,
        metadata={
            "help": "Sample the attacker families that currently do best more often: a softmax over each family's "
            "recent success, rescaled to [0, 1] across families, at this temperature. 0 samples them uniformly."
        },
    )
    adversarial_floor: float = field(
        default=0.3,
        metadata={"help": "Share of the draws spread uniformly over the families, so every threat stays covered."},
    )

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
            (self.attacker_horizon >= 0, f"attacker_horizon must be >= 0, got {self.attacker_horizon}."),
            (
                0 <= self.small_data_probability <= 1,
                f"small_data_probability must lie in [0, 1], got {self.small_data_probability}.",
            ),
            (
                len(self.small_data_sizes) == 2 and 1 <= self.small_data_sizes[0] <= self.small_data_sizes[1],
                f"small_data_sizes is [smallest, largest] with 1 <= smallest <= largest, got {self.small_data_sizes}.",
            ),
            (
                self.adversarial_temperature >= 0,
                f"adversarial_temperature must be >= 0, got {self.adversarial_temperature}.",
            ),
            (
                0 <= self.adversarial_floor <= 1,
                f"adversarial_floor must lie in [0, 1], got {self.adversarial_floor}.",
            ),
            (self.guard_every >= 1 and self.guard_samples >= 1, "guard_every and guard_samples must be >= 1."),
            (0 < self.source_fraction <= 1 and 0 < self.target_fraction <= 1, "data fractions must lie in (0, 1]."),
            (self.audit_validation_samples >= 0, "audit_validation_samples must be >= 0."),
            (not self.remove_unused_columns, "remove_unused_columns=True would drop the columns the collator needs."),
        ]


@dataclass(frozen=True)
class AttackerFamily:
    """A kind of simulated attacker: what it trains, with which optimiser, in which learning-rate range (log-uniform).

    The ranges follow the audit's default suite (ALGORITHMS.md §4), whose strongest attacks on protected models
    are SGD+momentum at 1e-2 and 1e-1, AdamW at 1e-2 and LoRA: plain and momentum SGD up to 1e-1, the adaptive
    optimisers up to 1e-2 (beyond it they wreck any model), LoRA and the linear probe around the suite's 3e-3
    and 1e-2.
    """

    trainable: str  # "all" (full fine-tuning), "lora" (low-rank deltas + head) or "head" (a fresh linear probe)
    optimizer: str
    lr_min: float
    lr_max: float


ATTACKER_FAMILIES: dict[str, AttackerFamily] = {
    "sgd": AttackerFamily("all", "sgd", 1e-3, 1e-1),
    "sgd-momentum": AttackerFamily("all", "sgd-momentum", 1e-3, 1e-1),
    "adam": AttackerFamily("all", "adam", 1e-4, 1e-2),
    "adamw": AttackerFamily("all", "adamw", 1e-4, 1e-2),
    "lora": AttackerFamily("lora", "adam", 1e-3, 1e-2),
    "probe": AttackerFamily("head", "adam", 1e-3, 3e-2),
}


@dataclass
class SophonConfig(SophonConfigBase):
    """What to protect, against which restricted domain, and every SOPHON hyper-parameter, for image classifiers.

    Defaults follow the paper's ICE setting (alpha 3e-4, beta 5e-4, gradient clip 0.5, guard at
    80 %), scaled down in length (K, iterations, batch sizes) for the tiny presets on CPU. The
    simulated attackers span the audit's threat model rather than the paper's (plain SGD at small
    learning rates; third-party replications broke SOPHON with attackers outside it): full fine-tuning with
    four optimisers up to lr 1e-1, LoRA, linear probes, small-data attackers (`ATTACKER_FAMILIES`),
    sampled more often where the model currently suppresses them worst.
    """

    suppression_loss: str = field(
        default="ice",
        metadata={
            "help": "`ice` (paper: -log(1 - p_y)), `ice_neg_logits` (reference code: CE(-z, y)) or `klu` "
            "(KL from uniform, label-free)."
        },
    )
    attacker_horizon: int = field(
        default=100,
        metadata={
            "help": "Steps each simulated attacker is followed for (see SophonConfigBase; 0: a fresh attacker every "
            "iteration, as the paper). 100 was chosen on validation against 0 and 200 (README)."
        },
    )
    attacker_families: list[str] = field(
        default_factory=lambda: list(ATTACKER_FAMILIES),
        metadata={"help": f"Kinds of simulated attacker, from {', '.join(ATTACKER_FAMILIES)} (ranges in the docs)."},
    )
    attacker_lr_ranges: list[str] = field(
        default_factory=list,
        metadata={"help": "Learning-rate ranges other than a family's own, as FAMILY:LOW:HIGH (e.g. sgd:1e-3:3e-1)."},
    )
    lora_ranks: list[int] = field(
        default_factory=lambda: [4, 16], metadata={"help": "Ranks a LoRA attacker samples from (the suite's)."}
    )
    head_reinit_probability: float = field(
        default=0.5,
        metadata={
            "help": "Probability that a full or LoRA simulated attacker starts from a fresh head (a probe always "
            "does); must be 1 when the restricted domain's class count differs from the model's."
        },
    )
    keep_pruning_mask: bool = field(
        default=False,
        metadata={
            "help": "Protect a pruned model (e.g. from protect-ntp) and keep it pruned: its zero weights stay exactly "
            "zero after every FTS and NTR step (pruning + suppression). The simulated attackers stay dense, as a "
            "real attacker is."
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

    def family(self, name: str) -> AttackerFamily:
        """The attacker family `name`, with its learning-rate range from `attacker_lr_ranges` where given there."""
        return dataclasses.replace(ATTACKER_FAMILIES[name], **self._lr_ranges().get(name, {}))

    def _lr_ranges(self) -> dict[str, dict[str, float]]:
        ranges = {}
        for entry in self.attacker_lr_ranges:
            name, _, bounds = entry.partition(":")
            low, _, high = bounds.partition(":")
            try:
                ranges[name] = {"lr_min": float(low), "lr_max": float(high)}
            except ValueError:
                raise InputError(
                    f"attacker_lr_ranges entries are FAMILY:LOW:HIGH (e.g. sgd:1e-3:3e-1), got {entry!r}."
                ) from None
        return ranges

    def validation_checks(self) -> list[tuple[bool, str]]:
        ranges = self._lr_ranges()
        return [
            *super().validation_checks(),
            (
                set(ranges) <= set(ATTACKER_FAMILIES)
                and all(0 < bounds["lr_min"] <= bounds["lr_max"] for bounds in ranges.values()),
                f"attacker_lr_ranges names families of {list(ATTACKER_FAMILIES)} with 0 < LOW <= HIGH, "
                f"got {self.attacker_lr_ranges}.",
            ),
            (
                self.suppression_loss in SUPPRESSION_LOSSES,
                f"suppression_loss must be one of {list(SUPPRESSION_LOSSES)}, got {self.suppression_loss!r}.",
            ),
            (
                bool(self.attacker_families) and set(self.attacker_families) <= set(ATTACKER_FAMILIES),
                f"attacker_families must be a non-empty subset of {list(ATTACKER_FAMILIES)}, "
                f"got {self.attacker_families}.",
            ),
            (bool(self.lora_ranks) and min(self.lora_ranks) >= 1, f"lora_ranks must be >= 1, got {self.lora_ranks}."),
            (0 <= self.head_reinit_probability <= 1, "head_reinit_probability must lie in [0, 1]."),
            (0 <= self.guard_threshold <= 1, "guard_threshold is an accuracy and must lie in [0, 1]."),
            (
                self.guard_max_drop is None or 0 <= self.guard_max_drop <= 1,
                f"guard_max_drop is an accuracy difference and must lie in [0, 1], got {self.guard_max_drop}.",
            ),
        ]
