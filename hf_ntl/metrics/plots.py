"""Plots for reports and cards (matplotlib PNGs): learning curves, denoising curves, sample grids, pair heatmaps."""

from __future__ import annotations

import os
from collections.abc import Mapping

import matplotlib
import numpy as np

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


def plot_sample_grid(rows: Mapping[str, np.ndarray], path: str | os.PathLike, title: str) -> None:
    """One row of generated images `(N, H, W, C)` in [0, 1] per label: what each model draws."""
    labels = list(rows)
    columns = max(len(images) for images in rows.values())
    figure, axes = plt.subplots(
        len(labels), columns, figsize=(0.9 * columns + 2.2, 0.9 * len(labels) + 0.5), dpi=120, squeeze=False
    )
    for row, label in enumerate(labels):
        for column in range(columns):
            axis = axes[row][column]
            axis.set_xticks([])
            axis.set_yticks([])
            if column < len(rows[label]):
                image = rows[label][column]
                axis.imshow(image.squeeze(-1) if image.shape[-1] == 1 else image, cmap="gray", vmin=0, vmax=1)
            if column == 0:
                axis.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=7)
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def plot_denoising_curves(
    curves: Mapping[str, Mapping[int, float]], path: str | os.PathLike, title: str, xlabel: str
) -> None:
    """Denoising MSE against attacker samples or steps (log x), one line per label; higher is worse."""
    figure, axis = plt.subplots(figsize=(5.5, 3.8), dpi=120)
    for label, curve in curves.items():
        xs = sorted(curve)
        axis.plot(xs, [curve[x] for x in xs], marker="o", label=label)
    axis.set_xscale("log")
    axis.set_xlabel(xlabel)
    axis.set_ylabel("restricted-domain denoising MSE")
    axis.set_title(title, fontsize=10)
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def plot_pair_heatmaps(
    panels: Mapping[str, Mapping[tuple[str, str], float]],
    domains: list[str],
    path: str | os.PathLike,
    title: str,
    columns: int,
    value_label: str,
) -> None:
    """One source x target heatmap per panel (e.g. per method and protocol), on a shared colour scale centred at 0.

    `panels` maps a panel title to `{(source, target): value}`; pairs without a value (the diagonal)
    are left blank. Red: the model helps the attacker; blue: it is a worse start than scratch.
    """
    values = [v for panel in panels.values() for v in panel.values()]
    limit = max([abs(v) for v in values] + [1e-6])
    rows = -(-len(panels) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(3.3 * columns + 1.0, 3.0 * rows + 0.6), dpi=120, squeeze=False)
    for axis in axes.flat[len(panels) :]:
        axis.axis("off")
    image = None
    for axis, (name, panel) in zip(axes.flat, panels.items(), strict=False):
        grid = np.full((len(domains), len(domains)), np.nan)
        for (source, target), value in panel.items():
            grid[domains.index(source), domains.index(target)] = value
        image = axis.imshow(grid, cmap="RdBu_r", vmin=-limit, vmax=limit)
        for i, j in zip(*np.nonzero(~np.isnan(grid)), strict=True):
            colour = "white" if abs(grid[i, j]) > 0.6 * limit else "black"
            axis.text(j, i, f"{grid[i, j]:+.2f}", ha="center", va="center", fontsize=8, color=colour)
        axis.set_xticks(range(len(domains)), domains, rotation=30, ha="right", fontsize=7)
        axis.set_yticks(range(len(domains)), domains, fontsize=7)
        axis.set_xlabel("target (attacker's domain)", fontsize=7)
        axis.set_ylabel("source (owner's domain)", fontsize=7)
        axis.set_title(name, fontsize=8)
    figure.suptitle(title, fontsize=9)
    figure.tight_layout(rect=(0, 0, 0.9, 1))
    colour_axis = figure.add_axes((0.91, 0.15, 0.015, 0.7))
    figure.colorbar(image, cax=colour_axis).set_label(value_label, fontsize=7)
    figure.savefig(path)
    plt.close(figure)


def plot_trials(
    trials: list[dict],
    path: str | os.PathLike,
    floor: float,
    title: str,
    original: float | None = None,
    source_key: str = "source_accuracy",
) -> None:
    """A study's trials: the source figure against the proxy's worst-case SLC-AUC, the Pareto front marked.

    Each trial is a `hf_ntl.tune.trial_summary`; `source_key` names its source figure: `source_accuracy` (a
    classifier's, in %) or `source_denoising_mse` (a pipeline's, lower is better: that axis is reversed). Trials that
    kept the source floor are blue points (the chosen one a star, the Pareto front a line through them); finished
    trials below the floor (the defaults may be) are grey; trials pruned for the floor before their audit are grey
    crosses along the top edge. Good trials sit bottom right: the owner keeps the source task, the attacker gains
    least. The defaults are ringed; `original` (the unprotected model's proxy worst case, which a chosen trial must
    beat) is a dashed line; `floor` (the source figure's limit) a dotted one.
    """
    accuracy = source_key == "source_accuracy"
    scale = 100 if accuracy else 1
    better = 1 if accuracy else -1  # the direction of a better source figure
    audited = [t for t in trials if t["worst_case_slc_auc"] is not None]
    kept = [t for t in audited if t["feasible"]]
    below = [t for t in audited if not t["feasible"]]
    pruned_below = [t for t in trials if t["pruned_by"] == "source floor"]

    def xy(group: list[dict]) -> tuple[list[float], list[float]]:
        return [scale * t[source_key] for t in group], [t["worst_case_slc_auc"] for t in group]

    figure, axis = plt.subplots(figsize=(5.5, 3.8), dpi=120)
    axis.scatter(*xy(kept), color="tab:blue", s=18, label="trial (kept the floor)")
    if below:
        axis.scatter(*xy(below), color="grey", s=18, label="trial below the floor")
    # The Pareto front of the trials that kept the floor: none other has both a better source figure and a lower
    # worst case.
    points = list(zip(*xy(kept), strict=True))
    front = sorted(
        (p for p in points if not any(better * q[0] >= better * p[0] and q[1] <= p[1] and q != p for q in points)),
        key=lambda p: better * p[0],
    )
    if front:
        axis.plot(*zip(*front, strict=True), color="tab:orange", drawstyle="steps-post", label="Pareto front")
        best = min(kept, key=lambda t: t["worst_case_slc_auc"])
        axis.scatter(*xy([best]), marker="*", s=160, color="tab:red", zorder=3, label="chosen")
    defaults = [t for t in audited if t["defaults"]]
    if defaults:
        axis.scatter(*xy(defaults), facecolors="none", edgecolors="black", s=90, zorder=3, label="defaults")
    if pruned_below:
        top = max((t["worst_case_slc_auc"] for t in audited), default=0.0)
        figures = [scale * t[source_key] for t in pruned_below]
        axis.scatter(figures, [top] * len(figures), marker="x", color="grey", label="pruned: below the floor")
    if floor > 0:
        axis.axvline(scale * floor, color="grey", linestyle=":", linewidth=1, label="source floor")
    if original is not None:
        axis.axhline(original, color="tab:green", linestyle="--", linewidth=1, label="unprotected original")
    axis.axhline(0, color="black", linewidth=0.6)
    if accuracy:
        axis.set_xlabel("source accuracy, validation (%)")
        axis.set_ylabel("proxy worst-case SLC-AUC, validation")
    else:
        axis.invert_xaxis()
        axis.set_xlabel("source denoising MSE, validation (reversed: better to the right)")
        axis.set_ylabel("proxy worst-case denoising SLC-AUC")
    axis.set_title(title, fontsize=10)
    axis.grid(True, alpha=0.3)
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
