"""Loss terms of the protection methods (ALGORITHMS.md gives the maths)."""

from __future__ import annotations

import torch
from torch.nn import functional as F


def capped_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, cap: float) -> torch.Tensor:
    """`min(CE(logits, labels), cap)`: the target term NTP maximises, bounded so it cannot diverge.

    Above the cap the gradient is zero: once the target loss is high enough, NTP stops pushing.
    """
    return torch.clamp(F.cross_entropy(logits, labels), max=cap)


def fisher_ratio(features: torch.Tensor, labels: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """NTP's Fisher-space regulariser R_F = S_B / (S_W + eps) on L2-normalised features.

    S_W = sum_c sum_{i in c} ||f_i - mu_c||^2 / n and S_B = sum_c (n_c / n) ||mu_c - mu||^2, over the
    classes present in the batch (any number of classes). Minimising it collapses the separability
    of the target classes in feature space.
    """
    features = F.normalize(features.flatten(1), dim=1)
    classes, inverse, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    n = features.shape[0]
    sums = torch.zeros(len(classes), features.shape[1], dtype=features.dtype, device=features.device)
    class_means = sums.index_add(0, inverse, features) / counts.unsqueeze(1).to(features.dtype)
    overall_mean = features.mean(dim=0)
    within = ((features - class_means[inverse]) ** 2).sum() / n
    between = ((counts.to(features.dtype) / n) * ((class_means - overall_mean) ** 2).sum(dim=1)).sum()
    return between / (within + eps)
