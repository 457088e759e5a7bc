"""Configuration of SOPHON for unconditional diffusion models (ALGORITHMS.md §3, DoS loss)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..attacks import OPTIMIZERS
from .sophon_config import SophonConfigBase


@dataclass
class SophonDiffusionConfig(SophonConfigBase):
    """Protect a `UNet2DModel` + `DDPMScheduler` so that fine-tuning it on a restricted domain gives a poor denoiser.

    FTS: each simulated attacker fine-tunes a copy of the UNet with the ordinary denoising MSE on
    restricted images, and after every step the DoS loss `||eps_theta(x_t, t)||^2` on a query batch
    is what the meta-gradient lowers. NTR: ordinary DDPM training steps on the original domain. Guard:
    the original-domain denoising MSE (fixed noise, a fixed timestep grid, held-out images) may not
    exceed `guard_max_mse_ratio` times the unprotected model's.

    The reference code trained and evaluated at timestep 1 only; here the attacker's and the DoS
    timesteps are drawn from `[timestep_min, timestep_max]`, the whole schedule by default (set both
    to 1 to reproduce the reference). Defaults are scaled for the tiny preset on CPU (the paper used
    alpha 5e-6, beta 2e-4, l_NTR 10, K 50, batch 200, 200 iterations on CIFAR-sized UNets).
    """

    # The objective.
    timestep_min: int = field(default=0, metadata={"help": "Smallest timestep of attacker/DoS noise (reference: 1)."})
    timestep_max: int | None = field(
        default=None, metadata={"help": "Largest timestep of attacker/DoS noise (default: the schedule's last)."}
    )
    guard_max_mse_ratio: float = field(
        default=1.5,
        metadata={
            "help": "The guard trips when original-domain denoising MSE exceeds this multiple of the unprotected "
            "model's; the last good state is restored."
        },
    )
    guard_timesteps: int = field(default=10, metadata={"help": "Timesteps of the guard's evaluation grid."})

    # Defaults that differ from the classifier's.
    source_dataset: str = field(default="font-digits", metadata={"help": "The owner's (original) domain."})
    suppression_learning_rate: float = field(default=5e-4, metadata={"help": "alpha: Adam lr of the FTS step."})
    learning_rate: float = field(default=5e-4, metadata={"help": "beta: AdamW lr of the NTR steps."})
    iterations: int = field(default=50, metadata={"help": "Outer iterations (one FTS step + ntr_steps each)."})
    ntr_steps: int = field(default=4, metadata={"help": "l_NTR: DDPM training steps per iteration."})
    inner_steps: int = field(default=5, metadata={"help": "K: fine-tuning steps of each simulated attacker."})
    inner_batch_sizes: list[int] = field(
        default_factory=lambda: [24, 40],
        metadata={"help": "Restricted images drawn per inner step (support + query), sampled per attacker."},
    )
    query_size: int = field(default=8, metadata={"help": "Of each inner batch, the images held out as query."})
    # The simulated attackers: one family per optimiser fine-tuning every weight (and LoRA attackers when
    # `lora_ranks` is given). Small-data attackers, LoRA and adversarial family sampling are off here until
    # measured on diffusion (the first two and the last are the classifier's defaults).
    inner_optimizers: list[str] = field(
        default_factory=lambda: ["sgd-momentum", "adam", "adamw"],
        metadata={"help": "Optimisers the simulated attackers sample from (plain SGD barely moves a UNet)."},
    )
    inner_lr_min: float = field(default=1e-4, metadata={"help": "Lower end of the log-uniform attacker lr."})
    inner_lr_max: float = field(default=3e-3, metadata={"help": "Upper end of the log-uniform attacker lr."})
    lora_ranks: list[int] = field(
        default_factory=list,
        metadata={
            "help": "Ranks of LoRA simulated attackers (AdamW on low-rank deltas of the layers the diffusion suite's "
            "LoRA attack adapts, lr as the others'): given, they join the optimiser families as family `lora`."
        },
    )
    small_data_probability: float = field(
        default=0.0, metadata={"help": "Probability that a simulated attacker owns only a few restricted images."}
    )
    adversarial_temperature: float = field(
        default=0.0, metadata={"help": "Softmax temperature of adversarial family sampling (0: uniform)."}
    )
    guard_every: int = field(default=10, metadata={"help": "Guard evaluation (and checkpoint) every N iterations."})
    guard_samples: int = field(
        default=256, metadata={"help": "Original-domain train images held out (never trained on) for the guard."}
    )
    per_device_train_batch_size: int = field(default=32, metadata={"help": "Original-domain batch per NTR step."})
    output_dir: str | None = field(
        default="runs/sophon-diffusion", metadata={"help": "Checkpoints and the protected pipeline."}
    )
    # A UNet's forward takes no labels: Trainer must not look for any.
    label_names: list[str] | None = field(default_factory=list, metadata={"help": "Keep empty: no labels."})

    def validation_checks(self) -> list[tuple[bool, str]]:
        low, high = self.timestep_min, self.timestep_max
        return [
            *super().validation_checks(),
            (
                low >= 0 and (high is None or low <= high),
                f"Need 0 <= timestep_min <= timestep_max, got {low} and {high}.",
            ),
            (
                bool(self.inner_optimizers) and all(name in OPTIMIZERS for name in self.inner_optimizers),
                f"inner_optimizers must be a non-empty subset of {OPTIMIZERS}, got {self.inner_optimizers}.",
            ),
            (
                0 < self.inner_lr_min <= self.inner_lr_max,
                f"Need 0 < inner_lr_min <= inner_lr_max, got {self.inner_lr_min} and {self.inner_lr_max}.",
            ),
            (all(rank >= 1 for rank in self.lora_ranks), f"lora_ranks must be >= 1, got {self.lora_ranks}."),
            (self.guard_max_mse_ratio >= 1, f"guard_max_mse_ratio must be >= 1, got {self.guard_max_mse_ratio}."),
            (self.guard_timesteps >= 1, f"guard_timesteps must be >= 1, got {self.guard_timesteps}."),
        ]
