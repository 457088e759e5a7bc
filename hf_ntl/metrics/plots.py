"""Learning-curve plots (matplotlib PNGs, log-scale sample counts) for reports and model cards."""

from __future__ import annotations

import os
from collections.abc import Mapping

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI
import matplotlib.pyplot as plt


def plot_learning_curves(
    curves: Mapping[str, Mapping[int, float]], path: str | os.PathLike, title: str, chance: float | None = None
) -> None:
    """Plot accuracy against number of target samples (log x), one line per curve label."""
    figure, axis = plt.subplots(figsize=(5.5, 3.8), dpi=120)
    for label, curve in curves.items():
        counts = sorted(curve)
        axis.plot(counts, [100 * curve[n] for n in counts], marker="o", label=label)
    if chance is not None:
        axis.axhline(100 * chance, color="grey", linestyle=":", linewidth=1, label="chance")
    axis.set_xscale("log")
    axis.set_xlabel("target training samples (log scale)")
    axis.set_ylabel("target test accuracy (%)")
    axis.set_ylim(0, 100)
    axis.set_title(title, fontsize=10)
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
