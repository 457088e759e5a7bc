"""Loss terms of the protection methods (ALGORITHMS.md gives the maths)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from diffusers import DDPMScheduler
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


# ----------------------------------------------------------------------------- SOPHON suppression losses
# Each is minimised on the simulated attacker's query batch; unlike -CE they are bounded below, so their
# gradients vanish as the goal (the attacker learns nothing) is reached instead of diverging.


def inverse_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """ICE, the paper's form: `-mean(log(1 - p_y))`, pushing the true class's probability to zero.

    Computed stably as `-(logsumexp_{j != y} z_j - logsumexp_j z_j)`, without forming `1 - p_y`.
    The gradient w.r.t. the logits is `p_y (onehot_y - p) / (1 - p_y)`, which vanishes as p_y -> 0.
    """
    true_class = F.one_hot(labels, logits.shape[-1]).bool()
    others = logits.masked_fill(true_class, float("-inf"))
    return -(torch.logsumexp(others, dim=-1) - torch.logsumexp(logits, dim=-1)).mean()


def inverse_cross_entropy_neg_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """ICE as the SOPHON reference code wrote it: `CE(-z, y)`, making the true class the least likely."""
    return F.cross_entropy(-logits, labels)


def kl_from_uniform(logits: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """KLU: `KL(U || softmax(z)) = -(1/C) sum_j log(C p_j)`, averaged over the batch, for any class count C.

    Drives the prediction to uniform; needs no labels. Its gradient w.r.t. the logits is `p - 1/C`.
    """
    num_classes = logits.shape[-1]
    return -(F.log_softmax(logits, dim=-1).mean(dim=-1) + math.log(num_classes)).mean()


SUPPRESSION_LOSSES = {
    "ice": inverse_cross_entropy,
    "ice_neg_logits": inverse_cross_entropy_neg_logits,
    "klu": kl_from_uniform,
}


# ----------------------------------------------------------------------------- diffusion (DDPM)


def predict_noise(
    forward: Callable[..., Any],
    scheduler: DDPMScheduler,
    images: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    min_timestep: int = 0,
    max_timestep: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The DDPM training forward: noise `images` at random timesteps, return `(eps_theta(x_t, t), eps)`.

    `forward(sample, timestep)` is a `UNet2DModel` (or a functional call of one). Timesteps are drawn
    uniformly from `[min_timestep, max_timestep]` (default: the whole schedule). With a (CPU)
    `generator` the draw is reproducible whatever the device; without one it uses the global RNG.
    """
    last = scheduler.config.num_train_timesteps - 1 if max_timestep is None else max_timestep
    count, device = images.shape[0], images.device
    if generator is None:
        noise = torch.randn_like(images)
        timesteps = torch.randint(min_timestep, last + 1, (count,), device=device)
    else:
        noise = torch.randn(images.shape, generator=generator).to(device, images.dtype)
        timesteps = torch.randint(min_timestep, last + 1, (count,), generator=generator).to(device)
    noisy = scheduler.add_noise(images, noise, timesteps)
    return forward(noisy, timesteps).sample, noise


def denial_of_service_loss(predicted_noise: torch.Tensor) -> torch.Tensor:
    """DoS, SOPHON's suppression loss for diffusion: the batch mean of `||eps_theta(x_t, t)||^2`.

    The squared L2 norm is summed over channels and pixels, then averaged over the batch; its
    gradient w.r.t. the prediction is `2 eps_theta / B`. Driving the predicted noise to zero makes
    the denoiser useless: an attacker's fine-tuning starts from a model that removes nothing.
    """
    return predicted_noise.pow(2).flatten(1).sum(dim=1).mean()
