"""SLC-AUC: area under the sample-wise learning curve, relative to training from scratch.

Introduced by Non-Transferable Pruning (Ding et al., ECCV 2024). This file is both the single
implementation hf_ntl uses and an `evaluate` metric module: `evaluate.load` accepts its folder
(or, once published, its Hub id), so it only imports numpy, datasets and evaluate.

For sample counts n_1 < ... < n_m (equivalently fractions r_i = n_i / N of a target train set)
and accuracies A_i after fine-tuning on the first n_i samples:

    AUC       = sum_i (ln n_i - ln n_{i-1}) * (A_i + A_{i-1}) / 2      (trapezoid over ln n)
    SLC-AUC   = AUC_model - AUC_scratch                                 (raw, in +-ln(n_m / n_1))
    normalised = SLC-AUC / ln(n_m / n_1)                                (mean accuracy gap, in [-1, 1])

Positive: the model helps an attacker; zero: no help; negative: it is a worse start than random
initialisation. ln(n_i) - ln(n_{i-1}) = ln(r_i) - ln(r_{i-1}), so counts and fractions agree.
"""

from __future__ import annotations

from collections.abc import Sequence

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """\
SLC-AUC compares two sample-wise learning curves (target accuracy after fine-tuning on n target
samples, for several n): one fine-tuned from the model under test, one from a randomly initialised
copy of the same architecture with the same protocol. It returns the difference of their areas on
a log-n axis (raw, in +-ln(n_max/n_min)) and that difference divided by ln(n_max/n_min)
(normalised: the mean accuracy gap to scratch, in [-1, 1]).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `float`): accuracies (0..1) of the model under test, one per sample count.
    references (`list` of `float`): accuracies of the scratch baseline at the same counts.
    sample_counts (`list` of `int` or `float`): the counts (or fractions), strictly increasing, >= 2 of them.
Returns:
    slc_auc (`float`): raw SLC-AUC; slc_auc_normalized (`float`): raw / ln(n_max / n_min);
    auc_model, auc_scratch (`float`): the two areas.
Examples:
    >>> metric = evaluate.load("path/to/hf_ntl/metrics/slc_auc")
    >>> metric.compute(predictions=[0.5, 0.7], references=[0.3, 0.6], sample_counts=[10, 100])
"""

_CITATION = """\
@inproceedings{ding2024ntp,
  title={Non-transferable Pruning},
  author={Ding, Ruyi and Su, Lili and Ding, Aidong Adam and Fei, Yunsi},
  booktitle={European Conference on Computer Vision (ECCV)},
  year={2024}
}
"""


def _check_grid(sample_counts: Sequence[float], *curves: Sequence[float]) -> np.ndarray:
    counts = np.asarray(sample_counts, dtype=np.float64)
    if counts.ndim != 1 or counts.size < 2:
        raise ValueError(f"SLC-AUC needs at least two sample counts, got {list(sample_counts)}.")
    if np.any(counts <= 0) or np.any(np.diff(counts) <= 0):
        raise ValueError(f"Sample counts must be positive and strictly increasing, got {list(sample_counts)}.")
    for curve in curves:
        if len(curve) != counts.size:
            raise ValueError(f"A curve has {len(curve)} accuracies for {counts.size} sample counts.")
    return counts


def area_under_log_curve(sample_counts: Sequence[float], accuracies: Sequence[float]) -> float:
    """Trapezoid area under accuracy plotted against ln(sample count)."""
    counts = _check_grid(sample_counts, accuracies)
    accuracies = np.asarray(accuracies, dtype=np.float64)
    widths = np.diff(np.log(counts))
    return float(np.sum(widths * (accuracies[1:] + accuracies[:-1]) / 2))


def slc_auc(
    sample_counts: Sequence[float], model_accuracies: Sequence[float], scratch_accuracies: Sequence[float]
) -> dict[str, float]:
    """Raw and normalised SLC-AUC of a model's learning curve against the scratch curve."""
    counts = _check_grid(sample_counts, model_accuracies, scratch_accuracies)
    auc_model = area_under_log_curve(counts, model_accuracies)
    auc_scratch = area_under_log_curve(counts, scratch_accuracies)
    raw = auc_model - auc_scratch
    return {
        "slc_auc": raw,
        "slc_auc_normalized": raw / float(np.log(counts[-1] / counts[0])),
        "auc_model": auc_model,
        "auc_scratch": auc_scratch,
    }


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class SlcAuc(evaluate.Metric):
    """`evaluate` interface to `slc_auc`."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("float64"), "references": datasets.Value("float64")}
            ),
            reference_urls=["https://arxiv.org/abs/2410.08015"],
        )

    def _compute(self, predictions, references, sample_counts=None) -> dict[str, float]:
        if sample_counts is None:
            raise ValueError("Pass sample_counts=[...] (one per accuracy) to compute SLC-AUC.")
        return slc_auc(sample_counts, predictions, references)
