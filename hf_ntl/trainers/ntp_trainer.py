"""NTPTrainer: non-transferable pruning as a `transformers.Trainer` subclass (ALGORITHMS.md §1).

Per paired batch of source (x_S, y_S) and target (x_T, y_T):

    L(W) = CE(h_S(f_W(x_S)), y_S) - alpha * min(CE(h_T(f_W(x_T)), y_T), cap) + lambda * R_F(f_W(x_T), y_T)
           + (rho / 2) sum_l ||W_l - Z_l + U_l||^2                          (ADMM rounds only)

Schedule (in optimiser steps): `admm_rounds` W-steps of `steps_per_round` on the dense weights, each
followed by the Z- and U-steps over all prunable weights (so the support of Z can move); after the
last round the hard prune to Z's support (exactly `sparsity`), then `retrain_steps` of masked training
on the same objective without the penalty (the mask applied after every optimiser step, so pruned
weights stay exactly zero). h_T is a linear probe refitted on the current features at every round
end and after the hard prune: the target terms fight the head an attacker would fit now. The ADMM
state and the probe are saved in every checkpoint and restored by `train(resume_from_checkpoint=...)`.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from torch import nn
from torch.nn import functional as F
from transformers import PreTrainedModel, Trainer, TrainerCallback, TrainerState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from ..data.paired import PairedCollator, PairedImageDataset
from ..data.transforms import ImagePreprocessor
from ..errors import InputError
from ..losses import capped_cross_entropy, fisher_ratio
from ..metrics import compute_accuracy
from ..models import forward_with_features, head_linear, running_statistics_frozen
from ..pruning import (
    AdmmState,
    apply_masks,
    default_sparsity,
    keep_count,
    mask_sparsity,
    prunable_parameter_names,
    sparsity_report,
)
from ..terminal import show_progress
from .ntp_config import NTPConfig

logger = logging.getLogger(__name__)


class _AdmmSchedule(TrainerCallback):
    """ADMM updates and a refitted probe at round ends; the hard prune; the mask once pruned; state in checkpoints."""

    def __init__(self, trainer: NTPTrainer) -> None:
        self.trainer = trainer

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self.trainer.admm.pruned:
            apply_masks(self.trainer.prunable, self.trainer.admm.masks)

    def on_step_end(self, args, state, control, **kwargs):
        step, config = state.global_step, self.trainer.args
        admm_steps = config.admm_rounds * config.steps_per_round
        if step <= admm_steps and step % config.steps_per_round == 0:
            self.trainer.admm_round_end()
            if step == admm_steps:
                self.trainer.hard_prune()
            self.trainer.refit_probe()

    def on_save(self, args, state, control, **kwargs):
        checkpoint = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if checkpoint.is_dir() and state.is_world_process_zero:
            self.trainer.admm.save(checkpoint, self.trainer.probe_tensors())


class NTPTrainer(Trainer):
    """Prune a classifier so that it keeps its source accuracy but is a bad start on the target.

    Args:
        model: an image classifier whose head matches the source classes.
        args: an `NTPConfig`.
        source_train / source_eval: standardised source splits (`image`, `label`).
        target_train: standardised target split; its classes need not match the source's unless
            `args.target_head == "shared"`.
        preprocessor: the model's preprocessing.
    """

    # compute_loss returns a per-batch mean: let Trainer divide it by the accumulation steps.
    loss_is_scaled_for_ga = False

    def __init__(
        self,
        model: PreTrainedModel,
        args: NTPConfig,
        source_train: Dataset,
        target_train: Dataset | None,
        preprocessor: ImagePreprocessor,
        source_eval: Dataset | None = None,
        **kwargs: Any,
    ) -> None:
        if target_train is None or len(target_train) == 0:
            raise InputError("NTP needs target-domain data (the domain to make non-transferable); none was given.")
        source_classes = source_train.features["label"].num_classes
        target_classes = target_train.features["label"].num_classes
        outputs = head_linear(model).out_features
        if outputs != source_classes:
            raise InputError(f"The model has {outputs} outputs but the source data has {source_classes} classes.")
        if args.target_head == "shared" and target_classes != outputs:
            raise InputError(
                f"target_head='shared' uses the model's {outputs}-way head, but the target has {target_classes} "
                "classes; use target_head='probe'."
            )
        self.target_train = target_train
        self.target_classes = target_classes
        super().__init__(
            model=model,
            args=args,
            train_dataset=PairedImageDataset(source_train, target_train, seed=args.seed),
            eval_dataset=source_eval,
            data_collator=PairedCollator(preprocessor),
            compute_metrics=compute_accuracy,
            **kwargs,
        )
        names = prunable_parameter_names(self.model, args.prunable_patterns)
        named = dict(self.model.named_parameters())
        self.prunable: dict[str, nn.Parameter] = {name: named[name] for name in names}
        self.target_sparsity = default_sparsity(self.model) if args.sparsity is None else args.sparsity
        self.keep = keep_count(sum(p.numel() for p in self.prunable.values()), self.target_sparsity)
        self.admm: AdmmState | None = None
        self.probe: nn.Linear | None = None
        self._metrics: dict[str, list[float]] = defaultdict(list)
        self._final_sparsity: float | None = None
        self.add_callback(_AdmmSchedule(self))
        show_progress(self, "NTP", self._progress_status)

    # ------------------------------------------------------------------ method state

    def probe_tensors(self) -> dict[str, torch.Tensor]:
        return {} if self.probe is None else {"probe.weight": self.probe.weight, "probe.bias": self.probe.bias}

    @torch.no_grad()
    def _fit_probe(self) -> nn.Linear:
        """A linear head on frozen target features, as an attacker's linear probe would be."""
        was_training = self.model.training
        self.model.eval()
        collate, device = self.data_collator, self.args.device
        features, labels = [], []
        for start in range(0, len(self.target_train), 256):
            batch = collate([self.target_train[i] for i in range(start, min(start + 256, len(self.target_train)))])
            features.append(forward_with_features(self.model, batch["pixel_values"].to(device))[1])
            labels.append(batch["labels"].to(device))
        self.model.train(was_training)
        features, labels = torch.cat(features), torch.cat(labels)
        with torch.random.fork_rng(devices=[]):  # the same probe whatever ran before in this process
            torch.manual_seed(self.args.seed)
            probe = nn.Linear(features.shape[1], self.target_classes).to(device)
        optimizer = torch.optim.Adam(probe.parameters(), lr=self.args.probe_learning_rate)
        with torch.enable_grad():
            for _ in range(self.args.probe_steps):
                loss = F.cross_entropy(probe(features), labels)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        probe.requires_grad_(False)
        self._metrics["probe_train_accuracy"].append(float((probe(features).argmax(-1) == labels).float().mean()))
        return probe

    def _start_or_restore(self, checkpoint: str | None) -> None:
        device = self.args.device
        if checkpoint:
            self.admm, extra = AdmmState.load(checkpoint)
            self.admm.to(device)
            if extra:
                self.probe = nn.Linear(extra["probe.weight"].shape[1], extra["probe.weight"].shape[0]).to(device)
                self.probe.load_state_dict({"weight": extra["probe.weight"], "bias": extra["probe.bias"]})
                self.probe.requires_grad_(False)
            logger.info("Restored NTP state from %s (%d rounds done)", checkpoint, self.admm.rounds_done)
            return
        self.model.to(device)
        if self.args.target_head == "probe":
            self.probe = self._fit_probe()
        self.admm = AdmmState.start(self.prunable, self.keep, self.args.rho).to(device)

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs: Any):
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise InputError(f"No checkpoint in {self.args.output_dir} to resume from.")
        self._start_or_restore(resume_from_checkpoint or None)
        return super().train(resume_from_checkpoint=resume_from_checkpoint or None, **kwargs)

    # ------------------------------------------------------------------ ADMM steps

    def admm_round_end(self) -> None:
        """Z- and U-steps over all prunable weights, then rho's growth; the round's record joins the history."""
        config = self.args
        record = self.admm.update(self.prunable, config.projection, self.keep, config.l1_lambda / self.admm.rho)
        self.admm.rho = min(self.admm.rho * config.rho_mult, config.rho_max)
        self._metrics["primal_residual"].append(record["primal_residual"])
        self._metrics["mask_changes"].append(record["mask_changes"])

    @torch.no_grad()
    def hard_prune(self) -> None:
        """W <- W * M with M = 1[Z != 0] (exactly `sparsity` for `topk`); masked training from here on."""
        apply_masks(self.prunable, self.admm.masks)
        self.admm.pruned = True
        self._final_sparsity = None

    def refit_probe(self) -> None:
        """A new target probe on the current features (ALGORITHMS.md §1: the head an attacker would fit now)."""
        if self.args.target_head == "probe":
            self.probe = self._fit_probe()
            self.admm.history[-1]["probe_train_accuracy"] = self._metrics["probe_train_accuracy"][-1]

    # ------------------------------------------------------------------ loss and logging

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if "target_pixel_values" not in inputs:  # evaluation on the source test split
            outputs = model(pixel_values=inputs["pixel_values"], labels=inputs["labels"])
            return (outputs.loss, outputs) if return_outputs else outputs.loss
        source_logits = model(pixel_values=inputs["pixel_values"]).logits
        source_ce = F.cross_entropy(source_logits, inputs["labels"])
        # Target batches are normalised with their own statistics, as in any training step, but must not move
        # the running statistics: those are the source domain's, and the released model (eval mode) uses them.
        with running_statistics_frozen(model):
            target_logits, target_features = forward_with_features(model, inputs["target_pixel_values"])
        if self.probe is not None:
            target_logits = self.probe(target_features)
        target_labels = inputs["target_labels"]
        target_term = capped_cross_entropy(target_logits, target_labels, self.args.target_ce_cap)
        fisher = fisher_ratio(target_features, target_labels)
        loss = source_ce - self.args.alpha * target_term + self.args.fisher_lambda * fisher
        in_admm = self.state.global_step < self.args.admm_rounds * self.args.steps_per_round
        if in_admm:
            penalty = self.admm.penalty(self.prunable)
            loss = loss + penalty
            self._metrics["admm_penalty"].append(penalty.item())
        self._metrics["source_ce"].append(source_ce.item())
        self._metrics["target_ce"].append(F.cross_entropy(target_logits, target_labels).item())
        self._metrics["fisher_ratio"].append(fisher.item())
        self._metrics["source_batch_accuracy"].append(
            float((source_logits.argmax(-1) == inputs["labels"]).float().mean())
        )
        return (loss, source_logits) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training log: add the averages gathered since the last one
            for key, values in self._metrics.items():
                if values:
                    logs[key] = sum(values) / len(values)
            logs["rho"] = self.admm.rho
            logs["sparsity"] = mask_sparsity(self.admm.masks)
            self._metrics.clear()
        super().log(logs, start_time)

    def _progress_status(self, state: TrainerState, latest: dict[str, float]) -> str:
        """The progress bar's status: the ADMM round and its primal residual, then masked retraining with the
        achieved sparsity; source accuracy at the last evaluation."""
        config = self.args
        if state.global_step < config.admm_rounds * config.steps_per_round:
            parts = [f"ADMM round {state.global_step // config.steps_per_round + 1}/{config.admm_rounds}"]
            if self.admm is not None and self.admm.history:
                parts.append(f"residual {self.admm.history[-1]['primal_residual']:.3g}")
        else:
            if self._final_sparsity is None:  # the mask is fixed from the hard prune on: measure it once
                self._final_sparsity = mask_sparsity(self.admm.masks)
            parts = ["masked retraining", f"sparsity {self._final_sparsity:.1%}"]
        if "eval_accuracy" in latest:
            parts.append(f"source acc {latest['eval_accuracy']:.1%}")
        return " · ".join(parts)

    def sparsity(self) -> dict[str, object]:
        """The sparsity asked for (`target`: the config's, or the model's default) and the one achieved by the
        prunable weights, overall and per tensor."""
        return {"target": self.target_sparsity} | sparsity_report({n: p.detach() for n, p in self.prunable.items()})

    def method_results(self) -> dict[str, Any]:
        """What the protection record holds about this method's outcome: the achieved sparsity, each ADMM
        round's record, and what a linear probe fitted on the released model's target features reaches."""
        results: dict[str, Any] = {"sparsity": self.sparsity(), "admm_rounds": self.admm.history}
        if self.args.target_head == "probe":
            self._fit_probe()
            results["final_probe_train_accuracy"] = self._metrics["probe_train_accuracy"][-1]
        return results
