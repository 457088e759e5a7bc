"""Sample-wise learning curves: target accuracy after fine-tuning on n samples, for several n.

A curve point is one fine-tuning run. Curves are averaged over seeds per sample count; the worst
case over an attack suite takes, at each count, the best accuracy any attack reached.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from transformers import PreTrainedModel


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


def counts_from_fractions(fractions: Sequence[float], available: int) -> list[int]:
    """Turn fractions of the target train split into sample counts (at least one sample each)."""
    if not fractions:
        raise ValueError("The grid of fractions is empty; give e.g. 0.01 0.1 1.0.")
    if min(fractions) <= 0 or max(fractions) > 1:
        raise ValueError(f"Fractions must lie in (0, 1], got {list(fractions)}.")
    return sorted({max(1, round(f * available)) for f in fractions})


def mean_curve(points: Iterable[CurvePoint]) -> dict[int, float]:
    """Mean accuracy over seeds at each sample count."""
    by_count: dict[int, list[float]] = {}
    for point in points:
        by_count.setdefault(point.num_samples, []).append(point.accuracy)
    return {n: float(np.mean(by_count[n])) for n in sorted(by_count)}


def worst_case_curve(curves: Iterable[dict[int, float]]) -> dict[int, float]:
    """Pointwise maximum: at each count, the best accuracy any attack reached."""
    curves = list(curves)
    counts = sorted(set().union(*curves))
    return {n: max(curve[n] for curve in curves if n in curve) for n in counts}
