"""SophonTrainer: non-fine-tunable learning for image classifiers as a `Trainer` subclass (ALGORITHMS.md §3).

The loop (FTS with simulated attackers, NTR as ordinary `Trainer` steps, the guard, method state
in checkpoints) is `SophonBaseTrainer`'s; this file says what is particular to classifiers: the
attacker fine-tunes with cross-entropy and may start from a fresh head, the suppression loss is
ICE or KLU on the attacker's query logits, and the guard reads original-domain accuracy.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from datasets import Dataset
from torch.nn import functional as F
from transformers import PreTrainedModel

from ..attacks import EncodedOnDemand, EncodedSplit, lora_target_modules, pruning_masks
from ..data.transforms import ImageClassificationCollator, ImagePreprocessor
from ..errors import InputError
from ..losses import SUPPRESSION_LOSSES
from ..metrics import compute_accuracy, predict_accuracy
from ..models import head_linear
from .sophon_base import (
    STATE_JSON,
    STATE_TENSORS,
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
from .sophon_config import SophonConfig

__all__ = ["STATE_JSON", "STATE_TENSORS", "SimulatedAttack", "SophonTrainer"]


class SophonTrainer(SophonBaseTrainer):
    """Make a classifier keep its original task but resist fine-tuning on a restricted domain.

    Args:
        model: an image classifier whose head matches the original domain's classes.
        args: a `SophonConfig`.
        source_train: the original domain's training split (standardised: `image`, `label`), for NTR.
        target_train: the restricted domain's samples the simulated attackers fine-tune on. Its class
            count may differ from the model's only if every simulated attacker uses a fresh head
            (`head_reinit_probability=1`).
        preprocessor: the model's preprocessing.
        guard_eval: original-domain samples never trained on, for the guard (and `evaluate()`).
    """

    guard_metric = "eval_accuracy"
    guard_format = "{:.1%}"
    outcome_format = "{:.0%}"
    higher_outcome_is_worse = True  # an attacker's query accuracy

    def __init__(
        self,
        model: PreTrainedModel,
        args: SophonConfig,
        source_train: Dataset,
        target_train: Dataset | None,
        preprocessor: ImagePreprocessor,
        guard_eval: Dataset | None = None,
        **kwargs: Any,
    ) -> None:
        if target_train is None or len(target_train) == 0:
            raise InputError("SOPHON needs restricted-domain data (the domain to make untunable); none was given.")
        if guard_eval is None or len(guard_eval) == 0:
            raise InputError("SOPHON's guard needs held-out original-domain samples (guard_eval); none were given.")
        outputs = head_linear(model).out_features
        source_classes = source_train.features["label"].num_classes
        target_classes = target_train.features["label"].num_classes
        if outputs != source_classes:
            raise InputError(f"The model has {outputs} outputs but the source data has {source_classes} classes.")
        if target_classes != outputs and args.head_reinit_probability < 1:
            raise InputError(
                f"The restricted data has {target_classes} classes but the model's head has {outputs}: simulated "
                "attackers cannot keep (share) the head; set head_reinit_probability=1 so that each starts from "
                f"a fresh {target_classes}-way head."
            )
        super().__init__(
            model,
            args,
            restricted_size=len(target_train),
            train_dataset=source_train,
            eval_dataset=guard_eval,
            data_collator=ImageClassificationCollator(preprocessor),
            compute_metrics=compute_accuracy,
            **kwargs,
        )
        self.restricted = EncodedOnDemand(target_train, preprocessor)
        self.guard_set = EncodedSplit.from_dataset(guard_eval, preprocessor)
        self.restricted_classes = target_classes
        self.suppression = SUPPRESSION_LOSSES[args.suppression_loss]
        head = head_linear(self.model)
        self.head_names = {name for name, p in self.model.named_parameters() if any(p is q for q in head.parameters())}
        # The weights a LoRA attacker adapts: those of the layers the audit's LoRA attack targets.
        self.lora_weights = [f"{module}.weight" for module in lora_target_modules(self.model)]
        if args.keep_pruning_mask:
            masks = pruning_masks(self.model)
            if not masks:
                raise InputError(
                    "keep_pruning_mask is set but the model holds no pruned (exactly zero) weights: protect a pruned "
                    "model, e.g. one from protect-ntp, or leave keep_pruning_mask off."
                )
            self.keep_pruned(masks)

    # ------------------------------------------------------------------ the simulated attackers

    def attacker_families(self) -> list[str]:
        return list(self.args.attacker_families)

    def draw_attack(self, family: str, generator: torch.Generator) -> SimulatedAttack:
        config = self.args
        kind = config.family(family)
        # A probe is always a fresh head (fitting the released one on frozen features is the model itself).
        fresh_draw = float(torch.rand(1, generator=generator)) < config.head_reinit_probability
        reinit_head = kind.trainable == "head" or fresh_draw
        return SimulatedAttack(
            family=family,
            optimizer=kind.optimizer,
            learning_rate=log_uniform(kind.lr_min, kind.lr_max, generator),
            batch_size=pick(config.inner_batch_sizes, generator),
            trainable=kind.trainable,
            reinit_head=reinit_head,
            lora_rank=pick(config.lora_ranks, generator) if kind.trainable == "lora" else 0,
        )

    def attacker_copy(self, attack: SimulatedAttack, generator: torch.Generator) -> AttackerState:
        """The attacker's copy: the encoder's weights, the head (released or fresh) and, for LoRA, the low-rank factors.

        Full fine-tuning trains every copy and the meta-gradient is taken at the attacker's current weights
        (first-order MAML). LoRA and probe attackers leave the encoder's copies as released, and the
        meta-gradient is the suppression loss's gradient w.r.t. them through the attacker's current adapters
        or probe (first-order too: held fixed, not differentiated through the attacker's steps). A fresh head
        is the attacker's own, not released: no meta-gradient for the real head.
        """
        copies = {name: p.detach().clone().requires_grad_(True) for name, p in self.model.named_parameters()}
        encoder = {name: copy for name, copy in copies.items() if name not in self.head_names}
        head = self._fresh_head(generator) if attack.reinit_head else {name: copies[name] for name in self.head_names}
        buffers = {name: b.detach().clone() for name, b in self.model.named_buffers()}
        released = encoder | ({} if attack.reinit_head else head)
        trainable = head | (encoder if attack.trainable == "all" else {})
        if attack.trainable != "lora":
            return AttackerState(trainable, released, buffers, parameters=lambda: encoder | head)

        # LoRA as `peft` builds it for the LoRA attack: W + (alpha / r) B A on every linear and non-grouped conv
        # weight of the encoder.
        factors = lora_factors(encoder, self.lora_weights, attack.lora_rank, generator)
        return AttackerState(
            trainable | lora_trainable(factors),
            released,
            buffers,
            parameters=lambda: encoder | lora_adapted(encoder, factors) | head,
        )

    def _fresh_head(self, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """A new `restricted_classes`-way head, initialised like `nn.Linear` (uniform in +-1/sqrt(fan_in))."""
        head = head_linear(self.model)
        bound = 1 / math.sqrt(head.in_features)
        fresh = {}
        for name in self.head_names:
            shape = (self.restricted_classes, head.in_features)[: 2 if name.endswith("weight") else 1]
            values = (2 * torch.rand(shape, generator=generator) - 1) * bound
            fresh[name] = values.to(self.args.device).requires_grad_(True)
        return fresh

    def restricted_batch(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        batch = self.restricted.select(indices)
        return {"pixel_values": batch.pixel_values.to(self.args.device), "labels": batch.labels.to(self.args.device)}

    def attacker_loss(self, forward: Forward, batch: dict[str, torch.Tensor], generator: torch.Generator):
        return F.cross_entropy(forward(pixel_values=batch["pixel_values"]).logits, batch["labels"])

    def suppression_loss(self, forward: Forward, batch: dict[str, torch.Tensor], generator: torch.Generator):
        logits = forward(pixel_values=batch["pixel_values"]).logits
        accuracy = float((logits.argmax(-1) == batch["labels"]).float().mean())
        return self.suppression(logits, batch["labels"]), {"accuracy": accuracy}

    # ------------------------------------------------------------------ the guard

    def guard_value(self) -> float:
        return predict_accuracy(self.model, self.guard_set.pixel_values, self.guard_set.labels)

    def guard_passes(self, value: float) -> bool:
        # `initial` is the model's own accuracy before any step (kept in checkpoints, so a resumed run has it). A drop
        # of exactly guard_max_drop passes: accuracies are fractions, and the subtraction must not round it out.
        relative = (
            self.args.guard_max_drop is None or value >= self.guard_log["initial"] - self.args.guard_max_drop - 1e-9
        )
        return value >= self.args.guard_threshold and relative

    def check_start(self, value: float) -> None:
        if not self.guard_passes(value):
            raise InputError(
                f"The model's original-domain accuracy is {value:.4f}, already below guard_threshold "
                f"{self.args.guard_threshold}: protect a model trained on the original domain, or lower it."
            )
