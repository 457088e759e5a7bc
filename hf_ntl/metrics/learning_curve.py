"""Sample-wise learning curves: target accuracy after fine-tuning on n samples, for several n.

The same curve for a randomly initialised copy of the same architecture, fine-tuned with exactly
the same `FinetuneSpec`, is the scratch baseline that SLC-AUC compares against.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from ..attacks.finetune import EncodedSplit, FinetuneSpec, finetuned_accuracy
from ..data.loading import stratified_order


@dataclass(frozen=True)
class CurvePoint:
    """One fine-tuning run: which model, which attack, how many samples, which seed, the result."""

    model: str
    attack: str
    num_samples: int
    seed: int
    accuracy: float
    steps: int
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def scratch_copy(model: PreTrainedModel, seed: int = 0) -> PreTrainedModel:
    """A randomly initialised model of the same architecture and config (the scratch baseline)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fresh = type(model)(model.config)
    return fresh.to(next(model.parameters()).device)


def check_counts(counts: Sequence[int], available: int) -> list[int]:
    """Validate a grid of sample counts: non-empty, positive, at most the samples available."""
    counts = sorted({int(n) for n in counts})
    if not counts:
        raise ValueError("The grid of sample counts is empty; give at least one count, e.g. 10 50 200.")
    if counts[0] < 1 or counts[-1] > available:
        raise ValueError(f"Sample counts must lie in 1..{available} (the target train split), got {counts}.")
    return counts


def learning_curve(
    model: PreTrainedModel,
    train: EncodedSplit,
    test: EncodedSplit,
    counts: Sequence[int],
    spec: FinetuneSpec,
    seeds: Sequence[int] = (0,),
    label: str = "model",
    progress: bool = True,
) -> list[CurvePoint]:
    """Fine-tune a fresh copy of `model` on the first n of a stratified order, for every n and seed.

    Subsets are nested (the 10 samples are among the 50) and class-stratified; each seed draws its
    own order. Nothing is selected on the test split: each run reports its final accuracy.
    """
    counts = check_counts(counts, len(train))
    points = []
    runs = [(seed, n) for seed in seeds for n in counts]
    for seed, n in tqdm(runs, desc=f"fine-tuning {label} ({spec.name})", disable=not progress, leave=False):
        order = torch.from_numpy(stratified_order(train.labels.numpy(), seed))
        start = time.perf_counter()
        accuracy = finetuned_accuracy(model, train.select(order[:n]), test, spec, seed)
        points.append(CurvePoint(label, spec.name, n, seed, accuracy, spec.steps, time.perf_counter() - start))
    return points


def mean_by_count(points: Sequence[CurvePoint]) -> dict[int, float]:
    """Mean accuracy over seeds at each sample count."""
    counts = sorted({p.num_samples for p in points})
    return {n: float(np.mean([p.accuracy for p in points if p.num_samples == n])) for n in counts}
