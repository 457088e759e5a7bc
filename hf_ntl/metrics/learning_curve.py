"""Sample-wise learning curves: target accuracy after fine-tuning on n samples, for several n.

A curve point is one fine-tuning run, scored on a validation split (carved from the target train
split) and on the test split. Curves are averaged over seeds per sample count. The worst case over
an attack suite is the attack an informed attacker would pick at each count: the one with the best
*validation* accuracy, reported with its *test* accuracy (choose on validation, report on test).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from ..errors import InputError


@dataclass(frozen=True)
class CurvePoint:
    """One fine-tuning run: which model, which attack, how many samples, which seed, the results.

    `accuracy` is on the test split, `validation_accuracy` on the validation split (what selection uses).
    """

    model: str
    attack: str
    num_samples: int
    seed: int
    accuracy: float
    validation_accuracy: float
    steps: int
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def check_counts(counts: Sequence[int], available: int, what: str = "the target train split") -> list[int]:
    """Validate a grid of sample counts: non-empty, positive, at most the `available` samples of `what`."""
    counts = sorted({int(n) for n in counts})
    if not counts:
        raise InputError("The grid of sample counts is empty; give at least one count, e.g. 10 50 200.")
    if counts[0] < 1 or counts[-1] > available:
        raise InputError(f"Sample counts must lie in 1..{available} ({what}), got {counts}.")
    return counts


def counts_from_fractions(fractions: Sequence[float], available: int) -> list[int]:
    """Turn fractions of the target train split into sample counts (at least one sample each)."""
    if not fractions:
        raise InputError("The grid of fractions is empty; give e.g. 0.01 0.1 1.0.")
    if min(fractions) <= 0 or max(fractions) > 1:
        raise InputError(f"Fractions must lie in (0, 1], got {list(fractions)}.")
    return sorted({max(1, round(f * available)) for f in fractions})


def mean_curve(points: Iterable[CurvePoint], key: str = "accuracy") -> dict[int, float]:
    """Mean over seeds at each sample count of `key` (`accuracy`: test; `validation_accuracy`)."""
    by_count: dict[int, list[float]] = {}
    for point in points:
        by_count.setdefault(point.num_samples, []).append(getattr(point, key))
    return {n: float(np.mean(by_count[n])) for n in sorted(by_count)}


def selected_curve(
    test_curves: dict[str, dict[int, float]], validation_curves: dict[str, dict[int, float]]
) -> tuple[dict[int, float], dict[int, str]]:
    """The worst case over attacks: at each count the attack with the best validation accuracy.

    Args:
        test_curves / validation_curves: `{attack: {n: mean accuracy}}` on each split.

    Returns:
        (`{n: test accuracy of the chosen attack}`, `{n: chosen attack}`). Ties go to the attack
        listed first, so the choice never depends on the test split.
    """
    counts = sorted(set().union(*validation_curves.values()))
    chosen = {n: max(validation_curves, key=lambda attack: validation_curves[attack].get(n, -1.0)) for n in counts}
    return {n: test_curves[chosen[n]][n] for n in counts}, chosen
