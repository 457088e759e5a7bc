"""What every SOPHON trainer shares (ALGORITHMS.md §3): the simulated attackers, the FTS step, the guard.

One outer iteration:

1. Fine-tuning suppression (FTS), at the start of every `ntr_steps`-th optimiser step: for each of
   `environments` simulated attackers, sample a strategy (optimiser, learning rate, batch size and
   whatever else the model kind adds, e.g. a fresh classifier head), copy the parameters and
   buffers, and fine-tune the copy for K steps on restricted support batches with the attacker's
   own loss; after each step, take the gradient of the suppression loss on a held-out query batch
   w.r.t. the copy. First-order MAML: the mean of those gradients over steps, attackers and
   processes is the meta-gradient of the real parameters, clipped and applied by a separate Adam
   (lr alpha).
2. Normal-training reinforcement (NTR): `ntr_steps` ordinary `Trainer` steps on the original
   domain (lr beta), so DDP, gradient accumulation and mixed precision apply as usual.
3. Guard, at every evaluation (`guard_every` iterations): if the original-domain metric fails the
   guard, the last state that passed is restored and training stops.

Why the inner loop is functional (`torch.func.functional_call` on the unwrapped model, with copies
of the parameters and buffers): the simulated attacker must not touch the real weights, the
model's running statistics (the copy of the buffers absorbs the attacker's updates, so the real
ones are untouched by construction), nor DDP's gradient buckets; and because every query gradient
is taken (`torch.autograd.grad`) as soon as its loss is computed, no graph outlives its step and
memory does not grow with K. DDP does not see this computation, so the meta-gradients are averaged
across processes explicitly before clipping.

A model kind (classifier, diffusion UNet) subclasses `SophonBaseTrainer` and says only what differs:
how a restricted batch is drawn, the attacker's loss, the suppression loss, and the guard's metric.
"""

from __future__ import annotations

import json
import logging
import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate.utils import gather_object
from safetensors.torch import load_file, save_file
from torch.func import functional_call
from transformers import Trainer, TrainerCallback, TrainerState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from ..attacks import make_optimizer
from ..errors import InputError
from ..terminal import show_progress
from .sophon_config import SophonConfigBase

logger = logging.getLogger(__name__)

STATE_TENSORS = "sophon_state.safetensors"
STATE_JSON = "sophon_state.json"

# The attacker's copy of the model, called like the model: `forward(*args, **kwargs)`.
Forward = Callable[..., Any]


@dataclass(frozen=True)
class SimulatedAttack:
    """One simulated attacker's fine-tuning strategy, sampled per environment."""

    optimizer: str
    learning_rate: float
    batch_size: int
    reinit_head: bool = False

    @property
    def family(self) -> str:
        """The kind of threat this attacker stands for (its optimiser, and a fresh head if it has one)."""
        return f"{self.optimizer}+fresh head" if self.reinit_head else self.optimizer


class _SophonSchedule(TrainerCallback):
    """FTS before every `ntr_steps`-th optimiser step; the guard at evaluations; method state in checkpoints."""

    def __init__(self, trainer: SophonBaseTrainer) -> None:
        self.trainer = trainer

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step % args.ntr_steps == 0:
            self.trainer.suppression_step(iteration=state.global_step // args.ntr_steps)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if self.trainer.guarding and not self.trainer.guard(metrics[self.trainer.guard_metric]):
            control.should_training_stop = True
        return control

    def on_save(self, args, state, control, **kwargs):
        checkpoint = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if checkpoint.is_dir() and state.is_world_process_zero:
            self.trainer.save_method_state(checkpoint)


class SophonBaseTrainer(Trainer):
    """The SOPHON loop for any model kind; subclasses fill in the hooks marked "model kind".

    Args:
        model: the model to protect (already trained on the original domain).
        args: a `SophonConfigBase` subclass.
        restricted_size: how many restricted samples `restricted_batch` draws from.
        **kwargs: passed to `Trainer` (train_dataset = the original domain for NTR, eval_dataset =
            the guard's samples, collator, ...).
    """

    # The key of `evaluate()`'s metrics the guard reads; how the progress bar shows it and what the
    # attackers reach on their query batches; whether a higher outcome is a more successful attacker
    # (accuracy) or a less successful one (denoising MSE) (model kind).
    guard_metric: str = ""
    guard_format: str = "{:.4f}"
    outcome_format: str = "{:.4f}"
    higher_outcome_is_worse: bool = False

    def __init__(self, model: torch.nn.Module, args: SophonConfigBase, restricted_size: int, **kwargs: Any) -> None:
        largest_batch = max(args.inner_batch_sizes)
        if largest_batch > restricted_size:
            raise InputError(
                f"inner_batch_sizes go up to {largest_batch} but only {restricted_size} restricted samples were "
                "given; lower inner_batch_sizes or use more restricted data (target_fraction)."
            )
        super().__init__(model=model, args=args, **kwargs)
        self.restricted_size = restricted_size
        self.suppression_optimizer = torch.optim.Adam(self.model.parameters(), lr=args.suppression_learning_rate)
        self.last_good: dict[str, torch.Tensor] = {}
        self.guard_log: dict[str, Any] = {"history": [], "last_good_step": None, "tripped_at": None}
        self.guarding = False
        self._metrics: dict[str, list[float]] = defaultdict(list)
        # What each attacker family reaches at the end of its simulated fine-tuning (the first metric
        # `suppression_loss` returns), as a moving average: shown while training, kept in the record.
        self.family_outcomes: dict[str, float] = {}
        self.add_callback(_SophonSchedule(self))
        show_progress(self, "SOPHON", self._progress_status)

    # ------------------------------------------------------------------ hooks of a model kind

    def restricted_batch(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        """The restricted samples at `indices`, on the device, as a dict of tensors (first dim = sample)."""
        raise NotImplementedError

    def attacker_loss(self, forward: Forward, batch: dict[str, torch.Tensor], generator: torch.Generator):
        """The loss a simulated attacker fine-tunes on (its support batch)."""
        raise NotImplementedError

    def suppression_loss(
        self, forward: Forward, batch: dict[str, torch.Tensor], generator: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss FTS minimises on the attacker's query batch, and metrics describing the attacker's success."""
        raise NotImplementedError

    def guard_value(self) -> float:
        """The guard's metric on its held-out samples, computed directly (not through `Trainer.evaluate`)."""
        raise NotImplementedError

    def guard_passes(self, value: float) -> bool:
        """Whether the original-domain metric `value` is acceptable."""
        raise NotImplementedError

    def check_start(self, value: float) -> None:
        """Refuse to start from a model that fails the guard already (a clear error, before any training)."""

    def sample_attack(self, generator: torch.Generator) -> SimulatedAttack:
        """A simulated attacker's strategy: optimiser, log-uniform learning rate, batch size."""
        config = self.args
        low, high = math.log(config.inner_lr_min), math.log(config.inner_lr_max)
        return SimulatedAttack(
            optimizer=_pick(config.inner_optimizers, generator),
            learning_rate=math.exp(low + (high - low) * float(torch.rand(1, generator=generator))),
            batch_size=_pick(config.inner_batch_sizes, generator),
        )

    def attacker_copy(
        self, attack: SimulatedAttack, generator: torch.Generator
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], list[str]]:
        """The attacker's starting parameters and buffers (copies), and the names of the released
        parameters it starts from (those the meta-gradient reaches)."""
        fast = {name: p.detach().clone().requires_grad_(True) for name, p in self.model.named_parameters()}
        buffers = {name: b.detach().clone() for name, b in self.model.named_buffers()}
        return fast, buffers, list(fast)

    # ------------------------------------------------------------------ the simulated attackers

    def _generator(self, iteration: int) -> torch.Generator:
        """The episodes of an iteration depend only on (seed, process, iteration): resumable, distinct per rank."""
        entropy = np.random.SeedSequence([self.args.seed, self.args.process_index, iteration]).generate_state(1)[0]
        return torch.Generator().manual_seed(int(entropy))

    def _simulate(
        self, attack: SimulatedAttack, generator: torch.Generator, meta_gradients: dict[str, torch.Tensor]
    ) -> None:
        """Fine-tune a copy as `attack` does; add each query's suppression gradient to `meta_gradients`."""
        model, config = self.model, self.args
        fast, buffers, released = self.attacker_copy(attack, generator)
        weight_decay = 1e-2 if attack.optimizer == "adamw" else 0.0  # torch's AdamW default; 0 elsewhere
        optimizer = make_optimizer(attack.optimizer, list(fast.values()), attack.learning_rate, weight_decay)

        def forward(*args: Any, **kwargs: Any) -> Any:
            # Under `--bf16` / `--fp16` (or accelerate's --mixed_precision) the attackers run autocast like the
            # NTR step; their parameters, the optimiser state and the meta-gradient sum stay fp32.
            with self.accelerator.autocast():
                return functional_call(model, (fast, buffers), args=args, kwargs=kwargs)

        for _ in range(config.inner_steps):
            indices = torch.randperm(self.restricted_size, generator=generator)[: attack.batch_size]
            batch = self.restricted_batch(indices)
            query = {key: value[: config.query_size] for key, value in batch.items()}
            support = {key: value[config.query_size :] for key, value in batch.items()}
            model.train()
            loss = self.attacker_loss(forward, support, generator)
            gradients = torch.autograd.grad(loss, list(fast.values()), allow_unused=True)
            for tensor, gradient in zip(fast.values(), gradients, strict=True):
                tensor.grad = gradient
            optimizer.step()
            # The query is scored as the attacker would measure the model: in eval mode, with the
            # running statistics the attacker's own fine-tuning has accumulated so far.
            model.eval()
            suppression, metrics = self.suppression_loss(forward, query, generator)
            gradients = torch.autograd.grad(suppression, [fast[name] for name in released], allow_unused=True)
            for name, gradient in zip(released, gradients, strict=True):
                if gradient is not None:
                    meta_gradients[name] += gradient
            self._metrics["suppression_loss"].append(suppression.item())
            for key, value in metrics.items():
                self._metrics[f"attacker_query_{key}"].append(value)
        for key, value in metrics.items():
            self._metrics[f"attacker_final_query_{key}"].append(value)
            self._metrics[f"attacker_final_query_{key}/{attack.family}"].append(value)
        outcome = next(iter(metrics.values()))
        previous = self.family_outcomes.get(attack.family, outcome)
        self.family_outcomes[attack.family] = 0.8 * previous + 0.2 * outcome
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

    def guard(self, value: float) -> bool:
        """Keep the current state as the last good one if `value` passes; otherwise restore that state."""
        step = self.state.global_step
        self.guard_log["history"].append({"step": step, self.guard_metric.removeprefix("eval_"): value})
        if self.guard_passes(value):
            self.last_good = self._snapshot()
            self.guard_log["last_good_step"] = step
            return True
        self.model.load_state_dict(self.last_good)
        self.guard_log["tripped_at"] = step
        logger.warning(
            "Guard: original-domain %s %.4f failed at step %d; restored step %s and stopped.",
            self.guard_metric,
            value,
            step,
            self.guard_log["last_good_step"],
        )
        return False

    def method_results(self) -> dict[str, Any]:
        """What the protection record holds about this method's outcome: the guard's log, and what each
        simulated attacker family reached on its query batches at the end (moving average, averaged over
        processes: each simulates its own attackers). Called on every process."""
        outcomes: dict[str, list[float]] = defaultdict(list)
        per_process = [self.family_outcomes]
        if self.accelerator.num_processes > 1:
            per_process = gather_object(per_process)
        for process_outcomes in per_process:
            for family, value in process_outcomes.items():
                outcomes[family].append(value)
        families = {family: sum(values) / len(values) for family, values in sorted(outcomes.items())}
        return {"guard": self.guard_log, "attacker_families": families}

    def save_method_state(self, folder: str | Path) -> None:
        """Write the guard's last good state and log and the FTS optimiser state (safetensors + JSON)."""
        optimizer_state = self.suppression_optimizer.state_dict()
        tensors = {f"last_good.{name}": tensor for name, tensor in self.last_good.items()}
        for index, slots in optimizer_state["state"].items():
            tensors |= {f"suppression_optimizer.{index}.{slot}": value.contiguous() for slot, value in slots.items()}
        save_file(tensors, str(Path(folder) / STATE_TENSORS))
        payload = {
            "guard": self.guard_log,
            "suppression_optimizer_param_groups": optimizer_state["param_groups"],
            # The main process's moving averages (the one that writes checkpoints): a resumed run goes on from them.
            "family_outcomes": self.family_outcomes,
        }
        (Path(folder) / STATE_JSON).write_text(json.dumps(payload, indent=2))

    def load_method_state(self, folder: str | Path) -> None:
        folder = Path(folder)
        if not (folder / STATE_TENSORS).is_file():
            raise InputError(f"{folder} holds no SOPHON state ({STATE_TENSORS}); it is not a SOPHON checkpoint.")
        tensors = load_file(str(folder / STATE_TENSORS))
        payload = json.loads((folder / STATE_JSON).read_text())
        self.guard_log = payload["guard"]
        self.family_outcomes = payload.get("family_outcomes", {})
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
                raise InputError(f"No checkpoint in {self.args.output_dir} to resume from.")
        if resume_from_checkpoint:
            self.load_method_state(resume_from_checkpoint)
        else:
            # Not `self.evaluate()`: evaluating before `train()` makes accelerate skip the DDP wrapping.
            value = self.guard_value()
            self.guard_log["initial"] = value
            self.check_start(value)
            self.guard(value)
        self.guarding = True
        try:
            output = super().train(resume_from_checkpoint=resume_from_checkpoint or None, **kwargs)
        finally:
            self.guarding = False
        # The last steps may not have met an evaluation: check them too, so what is returned passed the guard.
        if self.guard_log["tripped_at"] is None and self.guard_log["last_good_step"] != self.state.global_step:
            self.guard(self.evaluate()[self.guard_metric])
        return output

    # ------------------------------------------------------------------ logging

    def _progress_status(self, state: TrainerState, latest: dict[str, float]) -> str:
        """The progress bar's status: the outer iteration, the guard's last value, what each attacker family reaches."""
        ntr_steps = self.args.ntr_steps
        iterations = math.ceil(state.max_steps / ntr_steps)
        parts = [f"iteration {math.ceil(state.global_step / ntr_steps)}/{iterations}"]  # the ones done
        if self.guard_log["history"]:
            value = self.guard_log["history"][-1][self.guard_metric.removeprefix("eval_")]
            parts.append("guard " + self.guard_format.format(value))
        if self.family_outcomes:
            # The kinds of attacker that reach most (highest accuracy or, for diffusion, lowest MSE): the worst case.
            worse = self.higher_outcome_is_worse
            ranked = sorted(self.family_outcomes.items(), key=lambda item: item[1], reverse=worse)
            reached = ", ".join(f"{family} {self.outcome_format.format(value)}" for family, value in ranked[:3])
            parts.append(f"best attackers (of {len(ranked)} kinds) reach {reached}")
        return " · ".join(parts)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training log: add the FTS averages gathered since the last one
            for key, values in self._metrics.items():
                if values:
                    logs[key] = sum(values) / len(values)
            self._metrics.clear()
        super().log(logs, start_time)


def _pick(options: list, generator: torch.Generator) -> Any:
    return options[int(torch.randint(len(options), (1,), generator=generator))]
