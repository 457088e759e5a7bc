"""SophonTrainer: non-fine-tunable learning for image classifiers as a `Trainer` subclass (ALGORITHMS.md §3).

One outer iteration:

1. Fine-tuning suppression (FTS), at the start of every `ntr_steps`-th optimiser step: for each of
   `environments` simulated attackers, sample a strategy (optimiser, learning rate, batch size,
   fresh head or not), copy the parameters and buffers, and fine-tune the copy for K steps on
   restricted support batches; after each step, take the gradient of the suppression loss on a
   held-out query batch w.r.t. the copy. First-order MAML: the mean of those gradients over
   steps, attackers and processes is the meta-gradient of the real parameters, clipped and
   applied by a separate Adam (lr alpha).
2. Normal-training reinforcement (NTR): `ntr_steps` ordinary `Trainer` steps on the original
   domain (lr beta), so DDP, gradient accumulation and mixed precision apply as usual.
3. Guard, at every evaluation (`guard_every` iterations): if original-domain accuracy on held-out
   samples falls below `guard_threshold`, the last state that passed is restored and training stops.

Why the inner loop is functional (`torch.func.functional_call` on the unwrapped model, with copies
of the parameters and buffers): the simulated attacker must not touch the real weights, the
model's BatchNorm running statistics (the copy of the buffers absorbs the attacker's updates, so the
real ones are untouched by construction), nor DDP's gradient buckets; and because every query
gradient is taken (`torch.autograd.grad`) as soon as its loss is computed, no graph outlives its
step and memory does not grow with K. DDP does not see this computation, so the meta-gradients
are averaged across processes explicitly before clipping.
"""

from __future__ import annotations

import json
import logging
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Dataset
from safetensors.torch import load_file, save_file
from torch.func import functional_call
from torch.nn import functional as F
from transformers import PreTrainedModel, Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from ..attacks import EncodedSplit, make_optimizer
from ..data.transforms import ImageClassificationCollator, ImagePreprocessor
from ..losses import SUPPRESSION_LOSSES
from ..metrics import compute_accuracy, predict_accuracy
from ..models import head_linear
from .sophon_config import SophonConfig

logger = logging.getLogger(__name__)

STATE_TENSORS = "sophon_state.safetensors"
STATE_JSON = "sophon_state.json"


@dataclass(frozen=True)
class SimulatedAttack:
    """One simulated attacker's fine-tuning strategy, sampled per environment."""

    optimizer: str
    learning_rate: float
    batch_size: int
    reinit_head: bool


class _SophonSchedule(TrainerCallback):
    """FTS before every `ntr_steps`-th optimiser step; the guard at evaluations; method state in checkpoints."""

    def __init__(self, trainer: SophonTrainer) -> None:
        self.trainer = trainer

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step % args.ntr_steps == 0:
            self.trainer.suppression_step(iteration=state.global_step // args.ntr_steps)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if self.trainer.guarding and not self.trainer.guard(metrics["eval_accuracy"]):
            control.should_training_stop = True
        return control

    def on_save(self, args, state, control, **kwargs):
        checkpoint = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if checkpoint.is_dir() and state.is_world_process_zero:
            self.trainer.save_method_state(checkpoint)


class SophonTrainer(Trainer):
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
            raise ValueError("SOPHON needs restricted-domain data (the domain to make untunable); none was given.")
        if guard_eval is None or len(guard_eval) == 0:
            raise ValueError("SOPHON's guard needs held-out original-domain samples (guard_eval); none were given.")
        outputs = head_linear(model).out_features
        source_classes = source_train.features["label"].num_classes
        target_classes = target_train.features["label"].num_classes
        if outputs != source_classes:
            raise ValueError(f"The model has {outputs} outputs but the source data has {source_classes} classes.")
        if target_classes != outputs and args.head_reinit_probability < 1:
            raise ValueError(
                f"The restricted data has {target_classes} classes but the model's head has {outputs}: simulated "
                "attackers cannot keep (share) the head; set head_reinit_probability=1 so that each starts from "
                f"a fresh {target_classes}-way head."
            )
        largest_batch = max(args.inner_batch_sizes)
        if largest_batch > len(target_train):
            raise ValueError(
                f"inner_batch_sizes go up to {largest_batch} but only {len(target_train)} restricted samples were "
                "given; lower inner_batch_sizes or use more restricted data (target_fraction)."
            )
        super().__init__(
            model=model,
            args=args,
            train_dataset=source_train,
            eval_dataset=guard_eval,
            data_collator=ImageClassificationCollator(preprocessor),
            compute_metrics=compute_accuracy,
            **kwargs,
        )
        self.restricted = EncodedSplit.from_dataset(target_train, preprocessor)
        self.guard_set = EncodedSplit.from_dataset(guard_eval, preprocessor)
        self.restricted_classes = target_classes
        self.suppression_loss = SUPPRESSION_LOSSES[args.suppression_loss]
        head = head_linear(self.model)
        self.head_names = {name for name, p in self.model.named_parameters() if any(p is q for q in head.parameters())}
        self.suppression_optimizer = torch.optim.Adam(self.model.parameters(), lr=args.suppression_learning_rate)
        self.last_good: dict[str, torch.Tensor] = {}
        self.guard_log: dict[str, Any] = {"history": [], "last_good_step": None, "tripped_at": None}
        self.guarding = False
        self._metrics: dict[str, list[float]] = defaultdict(list)
        self.add_callback(_SophonSchedule(self))

    # ------------------------------------------------------------------ the simulated attackers

    def _generator(self, iteration: int) -> torch.Generator:
        """The episodes of an iteration depend only on (seed, process, iteration): resumable, distinct per rank."""
        entropy = np.random.SeedSequence([self.args.seed, self.args.process_index, iteration]).generate_state(1)[0]
        return torch.Generator().manual_seed(int(entropy))

    def sample_attack(self, generator: torch.Generator) -> SimulatedAttack:
        config = self.args

        def pick(options: list) -> Any:
            return options[int(torch.randint(len(options), (1,), generator=generator))]

        low, high = math.log(config.inner_lr_min), math.log(config.inner_lr_max)
        return SimulatedAttack(
            optimizer=pick(config.inner_optimizers),
            learning_rate=math.exp(low + (high - low) * float(torch.rand(1, generator=generator))),
            batch_size=pick(config.inner_batch_sizes),
            reinit_head=bool(torch.rand(1, generator=generator) < config.head_reinit_probability),
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

    def _simulate(
        self, attack: SimulatedAttack, generator: torch.Generator, meta_gradients: dict[str, torch.Tensor]
    ) -> None:
        """Fine-tune a copy as `attack` does; add each query's suppression gradient to `meta_gradients`."""
        model, config, device = self.model, self.args, self.args.device
        fast = {name: p.detach().clone().requires_grad_(True) for name, p in model.named_parameters()}
        if attack.reinit_head:
            fast.update(self._fresh_head(generator))
        buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
        shared = [name for name in fast if not (attack.reinit_head and name in self.head_names)]
        weight_decay = 1e-2 if attack.optimizer == "adamw" else 0.0  # torch's AdamW default; 0 elsewhere
        optimizer = make_optimizer(attack.optimizer, list(fast.values()), attack.learning_rate, weight_decay)

        def logits(pixel_values: torch.Tensor) -> torch.Tensor:
            return functional_call(model, (fast, buffers), args=(), kwargs={"pixel_values": pixel_values}).logits

        for _ in range(config.inner_steps):
            batch = torch.randperm(len(self.restricted), generator=generator)[: attack.batch_size]
            pixels = self.restricted.pixel_values[batch].to(device)
            labels = self.restricted.labels[batch].to(device)
            support, query = slice(config.query_size, None), slice(None, config.query_size)
            model.train()
            loss = F.cross_entropy(logits(pixels[support]), labels[support])
            gradients = torch.autograd.grad(loss, list(fast.values()), allow_unused=True)
            for tensor, gradient in zip(fast.values(), gradients, strict=True):
                tensor.grad = gradient
            optimizer.step()
            # The query is scored as the attacker would measure the model: in eval mode, with the
            # running statistics the attacker's own fine-tuning has accumulated so far.
            model.eval()
            query_logits = logits(pixels[query])
            suppression = self.suppression_loss(query_logits, labels[query])
            gradients = torch.autograd.grad(suppression, [fast[name] for name in shared], allow_unused=True)
            for name, gradient in zip(shared, gradients, strict=True):
                if gradient is not None:
                    meta_gradients[name] += gradient
            self._metrics["suppression_loss"].append(suppression.item())
            self._metrics["attacker_query_accuracy"].append(
                float((query_logits.argmax(-1) == labels[query]).float().mean())
            )
        self._metrics["attacker_final_query_accuracy"].append(self._metrics["attacker_query_accuracy"][-1])
        self._metrics["attacker_support_loss"].append(loss.item())

    def suppression_step(self, iteration: int) -> None:
        """One FTS step: simulate the attackers, average their meta-gradients (over processes too), clip, apply."""
        model, config = self.model, self.args
        was_training = model.training
        generator = self._generator(iteration)
        params = dict(model.named_parameters())
        # One flat buffer, with a per-parameter view into it: accumulated in place, reduced in one call.
        sizes = [p.numel() for p in params.values()]
        flat = torch.zeros(sum(sizes), device=self.args.device)
        meta_gradients = {
            name: view.view_as(p) for (name, p), view in zip(params.items(), flat.split(sizes), strict=True)
        }
        for _ in range(config.environments):
            self._simulate(self.sample_attack(generator), generator, meta_gradients)
        model.train(was_training)
        flat /= config.environments * config.inner_steps
        # A functional inner loop is invisible to DDP: average over processes here, before clipping,
        # so every rank applies the same update and the replicas stay identical.
        if self.accelerator.num_processes > 1:
            flat.copy_(self.accelerator.reduce(flat, reduction="mean"))
        for name, gradient in meta_gradients.items():
            params[name].grad = gradient
        norm = torch.nn.utils.clip_grad_norm_(list(params.values()), config.fts_max_grad_norm)
        self._metrics["fts_grad_norm"].append(norm.item())
        self.suppression_optimizer.step()
        self.suppression_optimizer.zero_grad(set_to_none=True)

    # ------------------------------------------------------------------ the guard and method state

    def _snapshot(self) -> dict[str, torch.Tensor]:
        return {name: tensor.detach().cpu().clone() for name, tensor in self.model.state_dict().items()}

    def guard(self, accuracy: float) -> bool:
        """Keep the current state as the last good one if `accuracy` passes; otherwise restore that state."""
        step = self.state.global_step
        self.guard_log["history"].append({"step": step, "accuracy": accuracy})
        if accuracy >= self.args.guard_threshold:
            self.last_good = self._snapshot()
            self.guard_log["last_good_step"] = step
            return True
        self.model.load_state_dict(self.last_good)
        self.guard_log["tripped_at"] = step
        logger.warning(
            "Guard: original-domain accuracy %.4f < %.4f at step %d; restored step %s and stopped.",
            accuracy,
            self.args.guard_threshold,
            step,
            self.guard_log["last_good_step"],
        )
        return False

    def method_results(self) -> dict[str, Any]:
        """What the protection record holds about this method's outcome: the guard's log."""
        return {"guard": self.guard_log}

    def save_method_state(self, folder: str | Path) -> None:
        """Write the guard's last good state and log and the FTS optimiser state (safetensors + JSON)."""
        optimizer_state = self.suppression_optimizer.state_dict()
        tensors = {f"last_good.{name}": tensor for name, tensor in self.last_good.items()}
        for index, slots in optimizer_state["state"].items():
            tensors |= {f"suppression_optimizer.{index}.{slot}": value.contiguous() for slot, value in slots.items()}
        save_file(tensors, str(Path(folder) / STATE_TENSORS))
        payload = {"guard": self.guard_log, "suppression_optimizer_param_groups": optimizer_state["param_groups"]}
        (Path(folder) / STATE_JSON).write_text(json.dumps(payload, indent=2))

    def load_method_state(self, folder: str | Path) -> None:
        folder = Path(folder)
        if not (folder / STATE_TENSORS).is_file():
            raise FileNotFoundError(f"{folder} holds no SOPHON state ({STATE_TENSORS}); it is not a SOPHON checkpoint.")
        tensors = load_file(str(folder / STATE_TENSORS))
        payload = json.loads((folder / STATE_JSON).read_text())
        self.guard_log = payload["guard"]
        self.last_good = {k.removeprefix("last_good."): v for k, v in tensors.items() if k.startswith("last_good.")}
        state: dict[int, dict[str, torch.Tensor]] = defaultdict(dict)
        for key, value in tensors.items():
            if key.startswith("suppression_optimizer."):
                _, index, slot = key.split(".")
                state[int(index)][slot] = value
        self.suppression_optimizer.load_state_dict(
            {"state": dict(state), "param_groups": payload["suppression_optimizer_param_groups"]}
        )

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs: Any):
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"No checkpoint in {self.args.output_dir} to resume from.")
        if resume_from_checkpoint:
            self.load_method_state(resume_from_checkpoint)
        else:
            # Not `self.evaluate()`: evaluating before `train()` makes accelerate skip the DDP wrapping.
            accuracy = predict_accuracy(self.model, self.guard_set.pixel_values, self.guard_set.labels)
            if accuracy < self.args.guard_threshold:
                raise ValueError(
                    f"The model's original-domain accuracy is {accuracy:.4f}, already below guard_threshold "
                    f"{self.args.guard_threshold}: protect a model trained on the original domain, or lower it."
                )
            self.guard(accuracy)
        self.guarding = True
        try:
            output = super().train(resume_from_checkpoint=resume_from_checkpoint or None, **kwargs)
        finally:
            self.guarding = False
        # The last steps may not have met an evaluation: check them too, so what is returned passed the guard.
        if self.guard_log["tripped_at"] is None and self.guard_log["last_good_step"] != self.state.global_step:
            self.guard(self.evaluate()["eval_accuracy"])
        return output

    # ------------------------------------------------------------------ logging

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training log: add the FTS averages gathered since the last one
            for key, values in self._metrics.items():
                if values:
                    logs[key] = sum(values) / len(values)
            self._metrics.clear()
        super().log(logs, start_time)
