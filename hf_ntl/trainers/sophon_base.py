"""What every SOPHON trainer shares (ALGORITHMS.md §3): the simulated attackers, the FTS step, the guard.

One outer iteration:

1. Fine-tuning suppression (FTS), at the start of every `ntr_steps`-th optimiser step: for each of
   `environments` simulated attackers, draw a family (adversarially: the families that currently
   reach most are drawn more often) and a strategy within it (optimiser, learning rate, batch size
   and whatever else the model kind adds: a fresh classifier head, LoRA, a probe), maybe owning
   only a few samples; copy the parameters and buffers, and fine-tune the copy for K steps on
   restricted support batches with the attacker's own loss; after each step, take the gradient of
   the suppression loss on a held-out query batch w.r.t. the released parameters as the copy
   holds them. First-order MAML: the mean of those gradients over steps, attackers and processes
   is the meta-gradient of the real parameters, clipped and applied by a separate Adam (lr alpha).
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
from dataclasses import asdict, dataclass, replace
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
    """One simulated attacker's fine-tuning strategy, sampled per environment.

    Args:
        family: the kind of threat it stands for (a name of the model kind's families).
        optimizer / learning_rate: its optimiser.
        batch_size: restricted samples per inner step, support and query together.
        trainable: `"all"` (every weight), `"lora"` (low-rank deltas of the encoder's weights, and the
            head) or `"head"` (a linear probe on frozen features).
        reinit_head: starts from a fresh head instead of the released one.
        lora_rank: rank of the LoRA deltas (`trainable="lora"`).
        pool_size: a small-data attacker owns only this many restricted samples and draws its
            support batches from them, repeatedly; its query comes from the other samples.
    """

    family: str
    optimizer: str
    learning_rate: float
    batch_size: int
    trainable: str = "all"
    reinit_head: bool = False
    lora_rank: int = 0
    pool_size: int | None = None


@dataclass
class AttackerState:
    """A simulated attacker's copy of the model.

    Args:
        trainable: the tensors its optimiser updates.
        released: copies of the released parameters, by name, at which the meta-gradient is taken
            (for full fine-tuning, the attacker's current weights: first-order MAML; for LoRA and
            probes, the frozen weights the attacker builds on, which stay bit-identical).
        buffers: copies of the model's buffers (the attacker's running statistics).
        parameters: the model's parameters as the copy uses them, by name (for `functional_call`).
    """

    trainable: dict[str, torch.Tensor]
    released: dict[str, torch.Tensor]
    buffers: dict[str, torch.Tensor]
    parameters: Callable[[], dict[str, torch.Tensor]]

    def frozen(self) -> dict[str, torch.Tensor]:
        """The released tensors the attacker builds on without training them (the encoder under LoRA or a probe)."""
        trained = {id(tensor) for tensor in self.trainable.values()}
        return {name: t for name, t in self.released.items() if id(t) not in trained}

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor of the copy once, by role and name (full fine-tuning trains what it releases)."""
        return (
            {f"trainable.{name}": t for name, t in self.trainable.items()}
            | {f"released.{name}": t for name, t in self.frozen().items()}
            | {f"buffers.{name}": t for name, t in self.buffers.items()}
        )


@dataclass
class Attacker:
    """A simulated attacker in progress: its strategy, its copy, its optimiser, its sample order, and how many
    steps it has taken of the `lifetime` it is followed for."""

    attack: SimulatedAttack
    state: AttackerState
    optimizer: torch.optim.Optimizer
    order: torch.Tensor
    lifetime: int
    steps_taken: int = 0


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
        if checkpoint.is_dir():
            self.trainer.save_attackers(checkpoint)  # every process its own
            if state.is_world_process_zero:
                self.trainer.save_method_state(checkpoint)


class _KeepPruned(TrainerCallback):
    """NTR steps on a pruned model: the weights re-masked after every optimiser step, before any evaluation or
    checkpoint sees them (their gradients are masked as they are computed: `keep_pruned`)."""

    def __init__(self, trainer: SophonBaseTrainer) -> None:
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer.mask_pruned()


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
        smallest_pool = min(args.small_data_sizes)
        if args.small_data_probability > 0 and smallest_pool + args.query_size > restricted_size:
            raise InputError(
                f"small-data attackers own at least {smallest_pool} samples and query {args.query_size} others, but "
                f"only {restricted_size} restricted samples were given; lower small_data_sizes (or set "
                "small_data_probability=0) or use more restricted data."
            )
        super().__init__(model=model, args=args, **kwargs)
        self.restricted_size = restricted_size
        # A small-data attacker's own samples leave at least a query's worth to score it on.
        self.largest_pool = min(max(args.small_data_sizes), restricted_size - args.query_size)
        self.suppression_optimizer = torch.optim.Adam(self.model.parameters(), lr=args.suppression_learning_rate)
        self.last_good: dict[str, torch.Tensor] = {}
        self.guard_log: dict[str, Any] = {"history": [], "last_good_step": None, "tripped_at": None}
        self.guarding = False
        self._metrics: dict[str, list[float]] = defaultdict(list)
        # What each attacker family reaches at the end of its simulated fine-tuning (the first metric
        # `suppression_loss` returns), as a moving average: shown while training, kept in the record.
        self.family_outcomes: dict[str, float] = {}
        # Persistent simulated attackers (attacker_horizon > 0), one per environment, and the weights they were
        # last carried onto.
        self.attackers: list[Attacker | None] = [None] * args.environments
        self.previous_weights: dict[str, torch.Tensor] = {}
        # Weights kept at exactly zero ({parameter name: mask of the live entries}; `keep_pruned`).
        self.pruning_masks: dict[str, torch.Tensor] = {}
        self.add_callback(_SophonSchedule(self))
        show_progress(self, "SOPHON", self._progress_status)

    def keep_pruned(self, masks: dict[str, torch.Tensor]) -> None:
        """Keep a pruned model pruned: the weights outside `masks` ({parameter name: live entries}) stay exactly
        zero through every FTS and NTR step, and no gradient reaches them."""
        self.pruning_masks = masks
        params = dict(self.model.named_parameters())
        for name, mask in masks.items():
            # NTR's backward masks the gradient as it is computed, so that Trainer's clipping and the optimiser's
            # moments see only the live weights (a callback would come after the clipping).
            params[name].register_hook(lambda gradient, mask=mask: gradient * mask)
        self.add_callback(_KeepPruned(self))

    def mask_pruned(self, gradients: bool = False) -> None:
        """Zero the pruned entries of the weights (or, with `gradients`, of their gradients)."""
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, mask in self.pruning_masks.items():
                tensor = params[name].grad if gradients else params[name]
                if tensor is not None:
                    tensor.mul_(mask)

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

    def attacker_families(self) -> list[str]:
        """The kinds of simulated attacker this run samples from (model kind)."""
        raise NotImplementedError

    def draw_attack(self, family: str, generator: torch.Generator) -> SimulatedAttack:
        """A simulated attacker of `family`: its optimiser, learning rate, batch size, ... (model kind)."""
        raise NotImplementedError

    def attacker_copy(self, attack: SimulatedAttack, generator: torch.Generator) -> AttackerState:
        """The attacker's starting state: a copy of every parameter and buffer, all fine-tuned (model kinds with
        other kinds of attacker override this)."""
        fast = {name: p.detach().clone().requires_grad_(True) for name, p in self.model.named_parameters()}
        buffers = {name: b.detach().clone() for name, b in self.model.named_buffers()}
        return AttackerState(trainable=fast, released=dict(fast), buffers=buffers, parameters=lambda: fast)

    # ------------------------------------------------------------------ which attackers, and how often

    def family_probabilities(self) -> dict[str, float]:
        """How likely each attacker family is to be drawn next: adversarial sampling.

        A family's score is its recent success (`family_outcomes`: the query accuracy it reaches, or
        minus the denoising MSE), rescaled to [0, 1] across families so that the temperature means the
        same for any metric; a family not yet drawn scores 1 (try every threat first). The draw is a
        softmax of the scores at `adversarial_temperature`, mixed with a uniform share
        `adversarial_floor`, so the meta-gradient goes mostly where the worst case is while every
        threat stays covered.
        """
        families = self.attacker_families()
        uniform = 1 / len(families)
        temperature = self.args.adversarial_temperature
        if temperature == 0:
            return dict.fromkeys(families, uniform)
        sign = 1 if self.higher_outcome_is_worse else -1
        known = [sign * self.family_outcomes[family] for family in families if family in self.family_outcomes]
        low, high = (min(known), max(known)) if known else (0.0, 0.0)
        span = high - low
        scores = [
            (sign * self.family_outcomes[family] - low) / span if family in self.family_outcomes and span > 0 else 1.0
            for family in families
        ]
        weights = [math.exp((score - 1) / temperature) for score in scores]
        floor = self.args.adversarial_floor
        return {
            family: (1 - floor) * weight / sum(weights) + floor * uniform
            for family, weight in zip(families, weights, strict=True)
        }

    def sample_attack(self, generator: torch.Generator) -> SimulatedAttack:
        """A simulated attacker: a family drawn by `family_probabilities`, then its strategy; maybe a small-data one."""
        probabilities = self.family_probabilities()
        drawn = int(torch.multinomial(torch.tensor(list(probabilities.values())), 1, generator=generator))
        attack = self.draw_attack(list(probabilities)[drawn], generator)
        config = self.args
        if float(torch.rand(1, generator=generator)) < config.small_data_probability:
            pool_size = int(
                torch.randint(min(config.small_data_sizes), self.largest_pool + 1, (1,), generator=generator)
            )
            attack = replace(attack, pool_size=pool_size)
        return attack

    def _episode_indices(
        self, attack: SimulatedAttack, order: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The (query, support) restricted indices of one inner step. `order` is a permutation of the restricted
        samples drawn once per attacker: a small-data attacker's own samples are its first `pool_size`."""
        query_size = self.args.query_size
        if attack.pool_size is None:
            chosen = order[torch.randperm(len(order), generator=generator)[: attack.batch_size]]
            return chosen[:query_size], chosen[query_size:]
        own, others = order[: attack.pool_size], order[attack.pool_size :]
        support = own[torch.randperm(len(own), generator=generator)[: attack.batch_size - query_size]]
        query = others[torch.randperm(len(others), generator=generator)[:query_size]]
        return query, support

    # ------------------------------------------------------------------ the simulated attackers

    def _generator(self, iteration: int) -> torch.Generator:
        """The episodes of an iteration depend only on (seed, process, iteration): resumable, distinct per rank."""
        entropy = np.random.SeedSequence([self.args.seed, self.args.process_index, iteration]).generate_state(1)[0]
        return torch.Generator().manual_seed(int(entropy))

    def _start_attacker(self, attack: SimulatedAttack, generator: torch.Generator, lifetime: int) -> Attacker:
        """A new simulated attacker from the current weights, followed for `lifetime` steps."""
        state = self.attacker_copy(attack, generator)
        weight_decay = 1e-2 if attack.optimizer == "adamw" else 0.0  # torch's AdamW default; 0 elsewhere
        optimizer = make_optimizer(attack.optimizer, list(state.trainable.values()), attack.learning_rate, weight_decay)
        order = torch.randperm(self.restricted_size, generator=generator)
        return Attacker(attack, state, optimizer, order, lifetime)

    def _advance(self, attacker: Attacker, generator: torch.Generator, meta_gradients: dict[str, torch.Tensor]) -> None:
        """`inner_steps` steps of `attacker`; after each, the query's suppression gradient w.r.t. the released
        parameters is added to `meta_gradients`, weighted.

        Without persistent attackers every step weighs 1 (the paper); with them, step t of an attacker's
        lifetime L weighs 2 t / (L + 1), 1 on average over its life: the later points of a trajectory, where a long
        fine-tuning run ends up, count more. An attacker that diverges (a non-finite suppression loss, e.g. SGD at
        a learning rate too large for the model) adds nothing from then on and is restarted at the next iteration.
        """
        model, config = self.model, self.args
        attack, state = attacker.attack, attacker.state

        def forward(*args: Any, **kwargs: Any) -> Any:
            # Under `--bf16` / `--fp16` (or accelerate's --mixed_precision) the attackers run autocast like the
            # NTR step; their parameters, the optimiser state and the meta-gradient sum stay fp32.
            with self.accelerator.autocast():
                return functional_call(model, (state.parameters(), state.buffers), args=args, kwargs=kwargs)

        metrics: dict[str, float] = {}
        for _ in range(config.inner_steps):
            query_indices, support_indices = self._episode_indices(attack, attacker.order, generator)
            query, support = self.restricted_batch(query_indices), self.restricted_batch(support_indices)
            model.train()
            loss = self.attacker_loss(forward, support, generator)
            gradients = torch.autograd.grad(loss, list(state.trainable.values()), allow_unused=True)
            for tensor, gradient in zip(state.trainable.values(), gradients, strict=True):
                tensor.grad = gradient
            attacker.optimizer.step()
            for tensor in state.trainable.values():
                tensor.grad = None  # a persistent attacker would otherwise hold a model-sized gradient between steps
            # The query is scored as the attacker would measure the model: in eval mode, with the
            # running statistics the attacker's own fine-tuning has accumulated so far.
            model.eval()
            suppression, metrics = self.suppression_loss(forward, query, generator)
            attacker.steps_taken += 1
            if not torch.isfinite(suppression):
                self._metrics["attackers_diverged"].append(1.0)
                attacker.steps_taken = attacker.lifetime  # restarted at the next iteration
                return
            gradients = torch.autograd.grad(suppression, list(state.released.values()), allow_unused=True)
            weight = 2 * attacker.steps_taken / (attacker.lifetime + 1) if config.attacker_horizon else 1.0
            for name, gradient in zip(state.released, gradients, strict=True):
                if gradient is not None:
                    meta_gradients[name] += weight * gradient
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

    def _carry_attackers(self) -> None:
        """Move every persistent attacker onto the weights the last FTS and NTR steps gave the model.

        An attacker's progress is its difference from the weights it started from: the released tensors it trains
        get the model's change since the last iteration added; those it builds on without training (the encoder
        under LoRA adapters or a probe) become the current weights; its adapters, its own head, its optimiser
        state and its running statistics are kept.
        """
        with torch.no_grad():
            current = {name: p.detach() for name, p in self.model.named_parameters()}
            for attacker in self.attackers:
                if attacker is None or attacker.steps_taken >= attacker.lifetime:
                    continue  # restarted from the current weights anyway
                frozen = attacker.state.frozen()
                for name, tensor in attacker.state.released.items():
                    if name in frozen:
                        tensor.copy_(current[name])
                    else:
                        tensor.add_(current[name] - self.previous_weights[name])
            self.previous_weights = {name: p.clone() for name, p in current.items()}

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
        horizon, steps = config.attacker_horizon, config.inner_steps
        if horizon:
            self._carry_attackers()
        for slot in range(config.environments):
            attacker = self.attackers[slot] if horizon else None
            if attacker is None or attacker.steps_taken >= attacker.lifetime:
                lifetime = math.ceil(horizon / steps) * steps if horizon else steps  # whole iterations
                if horizon and attacker is None:
                    # The first attackers live shorter lives, staggered per environment, so that restarts are
                    # spread over the iterations rather than all falling on the same one.
                    lifetime = max(steps, (lifetime - slot * lifetime // config.environments) // steps * steps)
                attacker = self._start_attacker(self.sample_attack(generator), generator, lifetime)
            self._advance(attacker, generator, meta_gradients)
            if horizon:
                self.attackers[slot] = attacker
        model.train(was_training)
        # Not divided by the iteration's own weights: the ramp's weights average 1 over an attacker's life, so the
        # steps late in long lives count more than early ones across iterations, as intended.
        flat /= config.environments * config.inner_steps
        # A functional inner loop is invisible to DDP: average over processes here, before clipping,
        # so every rank applies the same update and the replicas stay identical.
        if self.accelerator.num_processes > 1:
            flat.copy_(self.accelerator.reduce(flat, reduction="mean"))
        for name, gradient in meta_gradients.items():
            params[name].grad = gradient
        self.mask_pruned(gradients=True)
        norm = torch.nn.utils.clip_grad_norm_(list(params.values()), config.fts_max_grad_norm)
        self._metrics["fts_grad_norm"].append(norm.item())
        self.suppression_optimizer.step()
        self.suppression_optimizer.zero_grad(set_to_none=True)
        self.mask_pruned()

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
        """What the protection record holds about this method's outcome: the guard's log, what each simulated
        attacker family reached on its query batches at the end (moving average, averaged over processes: each
        simulates its own attackers), and how likely each family was to be drawn at the end (the main process's
        adversarial sampler: where the protection found the worst case). Called on every process."""
        outcomes: dict[str, list[float]] = defaultdict(list)
        per_process = [self.family_outcomes]
        if self.accelerator.num_processes > 1:
            per_process = gather_object(per_process)
        for process_outcomes in per_process:
            for family, value in process_outcomes.items():
                outcomes[family].append(value)
        families = {family: sum(values) / len(values) for family, values in sorted(outcomes.items())}
        return {
            "guard": self.guard_log,
            "attacker_family_outcomes": families,
            "attacker_family_probabilities": self.family_probabilities(),
        }

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
            # The main process's estimates, for a reader of the checkpoint; every process resumes from its own
            # (`save_attackers`).
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
        self.load_attackers(folder)

    def _attackers_files(self, folder: Path) -> tuple[Path, Path]:
        stem = f"sophon_attackers-{self.args.process_index}"
        return folder / f"{stem}.safetensors", folder / f"{stem}.json"

    def save_attackers(self, folder: str | Path) -> None:
        """Write what this process's simulated attackers are: the adversarial sampler's estimates
        (`family_outcomes`, each process has its own) and the persistent attackers (copies, optimiser states,
        sample orders, ages) with the weights they were last carried onto, so that a resumed run goes on with
        the same attackers."""
        tensors = {f"previous.{name}": tensor for name, tensor in self.previous_weights.items()}
        records: list[dict[str, Any] | None] = []
        for slot, attacker in enumerate(self.attackers):
            if attacker is None:
                records.append(None)
                continue
            tensors |= {f"{slot}.{key}": t.detach().contiguous() for key, t in attacker.state.tensors().items()}
            tensors[f"{slot}.order"] = attacker.order
            optimizer_state = attacker.optimizer.state_dict()
            for index, slots in optimizer_state["state"].items():
                tensors |= {
                    f"{slot}.optimizer.{index}.{name}": value.contiguous()
                    for name, value in slots.items()
                    if isinstance(value, torch.Tensor)
                }
            records.append(
                {
                    "attack": asdict(attacker.attack),
                    "lifetime": attacker.lifetime,
                    "steps_taken": attacker.steps_taken,
                    "optimizer_param_groups": optimizer_state["param_groups"],
                }
            )
        tensor_file, record_file = self._attackers_files(Path(folder))
        if any(self.attackers):
            save_file(tensors, str(tensor_file))
        payload = {"family_outcomes": self.family_outcomes, "attackers": records}
        record_file.write_text(json.dumps(payload, indent=2))

    def load_attackers(self, folder: str | Path) -> None:
        """Restore what `save_attackers` wrote for this process (nothing if it wrote nothing)."""
        tensor_file, record_file = self._attackers_files(Path(folder))
        if not record_file.is_file():
            return
        payload = json.loads(record_file.read_text())
        self.family_outcomes = payload["family_outcomes"]
        if not tensor_file.is_file():
            return
        records = payload["attackers"]
        if len(records) != self.args.environments:
            raise InputError(
                f"{folder} holds {len(records)} persistent attackers per process but environments is "
                f"{self.args.environments}: resume with the settings of the run that wrote it."
            )
        tensors = load_file(str(tensor_file), device=str(self.args.device))
        previous = {key: value for key, value in tensors.items() if key.startswith("previous.")}
        self.previous_weights = {key.removeprefix("previous."): value for key, value in previous.items()}
        for slot, record in enumerate(records):
            if record is None:
                continue
            # The copy's structure (and, for LoRA, how it is assembled) comes from the attack; its values from the file.
            attack = SimulatedAttack(**record["attack"])
            attacker = self._start_attacker(attack, torch.Generator().manual_seed(0), record["lifetime"])
            with torch.no_grad():
                for key, tensor in attacker.state.tensors().items():
                    tensor.copy_(tensors[f"{slot}.{key}"])
            attacker.order = tensors[f"{slot}.order"].cpu()
            attacker.steps_taken = record["steps_taken"]
            state: dict[int, dict[str, torch.Tensor]] = defaultdict(dict)
            prefix = f"{slot}.optimizer."
            for key, value in tensors.items():
                if key.startswith(prefix):
                    index, name = key.removeprefix(prefix).split(".", 1)
                    state[int(index)][name] = value
            attacker.optimizer.load_state_dict({"state": dict(state), "param_groups": record["optimizer_param_groups"]})
            self.attackers[slot] = attacker

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


def pick(options: list, generator: torch.Generator) -> Any:
    """One of `options`, uniformly, from `generator`."""
    return options[int(torch.randint(len(options), (1,), generator=generator))]


def log_uniform(low: float, high: float, generator: torch.Generator) -> float:
    """A learning rate drawn log-uniformly from [low, high]."""
    return math.exp(math.log(low) + (math.log(high) - math.log(low)) * float(torch.rand(1, generator=generator)))


# lora_alpha / r with lora_alpha = 2r, as the suites' LoRA attacks (classifier and diffusion) build them.
LORA_SCALE = 2.0


def lora_factors(
    weights: dict[str, torch.Tensor], names: list[str], rank: int, generator: torch.Generator
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """A simulated LoRA attacker's factors (A, B) for each weight in `names`, as `peft` initialises them: A
    kaiming-uniform with a = sqrt(5) (uniform in +-1/sqrt(fan_in)), B zero. A convolution's A spans its whole
    kernel (fan_in = in_channels x kernel area) and B is 1 x 1, as peft's convolution LoRA."""
    factors = {}
    for name in names:
        weight = weights[name]
        fan_in = weight[0].numel()
        bound = 1 / math.sqrt(fan_in)
        down = (2 * torch.rand((rank, fan_in), generator=generator) - 1) * bound
        factors[name] = (
            down.to(weight.device).requires_grad_(True),
            torch.zeros(weight.shape[0], rank, device=weight.device, requires_grad=True),
        )
    return factors


def lora_adapted(
    weights: dict[str, torch.Tensor], factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """The adapted weights W + scale B A (differentiable in W, A and B), by name."""
    return {
        name: weights[name] + LORA_SCALE * (up @ down).view_as(weights[name]) for name, (down, up) in factors.items()
    }


def lora_trainable(factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The factors by the names an attacker's state (and its checkpoint) gives them."""
    return {
        f"{name}.lora_{part}": factor
        for name, (down, up) in factors.items()
        for part, factor in (("A", down), ("B", up))
    }
