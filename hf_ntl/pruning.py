"""ADMM pruning state (Z, U, the support of Z), projections, mask enforcement and sparsity reports.

Scaled-form ADMM for `||W_prunable||_0 <= (1 - s) N`, global over all prunable tensors (ALGORITHMS.md §1):

    W-step: optimiser steps on L(W) + (rho / 2) sum_l ||W_l - Z_l + U_l||^2; W stays dense, the penalty
            (not a mask) draws it towards Z
    Z-step: Z = Proj(W + U) over ALL prunable weights: the support of Z may change from round to round
    U-step: U <- U + W - Z

Only after the last round is the mask taken, M = 1[Z != 0], and W hard-pruned to it; masked
retraining then keeps W * M. (Restricting the Z-step to the current mask while masking W after every
step would freeze the support after round 1: one-shot magnitude pruning, not ADMM.)
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import InputError
from .models import classification_head_name

STATE_TENSORS = "ntp_state.safetensors"
STATE_JSON = "ntp_state.json"


def prunable_parameter_names(model: nn.Module, patterns: list[str] | None = None) -> list[str]:
    """Names of the parameters NTP prunes.

    Default: the weights of the encoder's convolution and linear layers; norms, biases, position
    embeddings and the classification head are excluded. `patterns` (regular expressions, matched
    with `re.search` against parameter names) replace the default selection.
    """
    if patterns:
        compiled = [re.compile(p) for p in patterns]
        names = [n for n, p in model.named_parameters() if p.ndim >= 1 and any(c.search(n) for c in compiled)]
        what = f"the patterns {patterns}"
    else:
        head = classification_head_name(model)
        names = [
            f"{name}.weight"
            for name, module in model.named_modules()
            if isinstance(module, nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d)
            and not (name == head or name.startswith(f"{head}."))
        ]
        what = "the default selection (conv and linear weights outside the head)"
    if not names:
        raise InputError(f"No prunable parameters matched {what} in {type(model).__name__}.")
    return names


SPARSITY_WITH_BATCH_NORM = 0.9
SPARSITY_WITHOUT_BATCH_NORM = 0.3


def default_sparsity(model: nn.Module) -> float:
    """NTP's sparsity for `model` when none is asked for: 0.9 (the reference code's) for a network with BatchNorm,
    whose statistics rescale a layer's output once most of its weights are cut; 0.3 for one without (LayerNorm
    networks such as ConvNeXt and ViT), where the hard prune to 0.9 took tiny-convnext to 14 % source accuracy and
    0.3 kept it within 1.3 points (README, "What NTP needs without BatchNorm"). Measured on ConvNeXt; tiny-vit
    still loses about 9 points at 0.3, most of it to NTP's W-steps rather than to the pruning."""
    has_batch_norm = any(isinstance(module, nn.modules.batchnorm._BatchNorm) for module in model.modules())
    return SPARSITY_WITH_BATCH_NORM if has_batch_norm else SPARSITY_WITHOUT_BATCH_NORM


def keep_count(total: int, sparsity: float) -> int:
    """How many weights survive pruning `total` weights to `sparsity`."""
    return max(1, round((1.0 - sparsity) * total))


def project_topk(values: dict[str, torch.Tensor], keep: int) -> dict[str, torch.Tensor]:
    """Keep the `keep` largest magnitudes globally over all tensors of `values`; zero the rest."""
    scores = torch.cat([value.abs().flatten() for value in values.values()])
    if keep >= scores.numel():
        return {name: value.clone() for name, value in values.items()}
    kept = torch.zeros_like(scores, dtype=torch.bool)
    kept[torch.topk(scores, keep, sorted=False).indices] = True
    projected, offset = {}, 0
    for name, value in values.items():
        size = value.numel()
        projected[name] = value * kept[offset : offset + size].view_as(value)
        offset += size
    return projected


def soft_threshold(values: dict[str, torch.Tensor], delta: float) -> dict[str, torch.Tensor]:
    """The reference code's L1 proximal step: sign(x) max(|x| - delta, 0)."""
    return {name: torch.sign(v) * torch.clamp(v.abs() - delta, min=0) for name, v in values.items()}


@dataclass
class AdmmState:
    """Everything NTP needs besides the weights to continue a run: saved with every checkpoint.

    `masks` is the support of Z (`Z != 0`): what the hard prune will keep, and, once `pruned`, the mask
    masked retraining enforces. `history` holds one record per round (primal residual, how many mask
    entries changed, the sparsity of Z).
    """

    z: dict[str, torch.Tensor]
    u: dict[str, torch.Tensor]
    masks: dict[str, torch.Tensor]
    rho: float
    rounds_done: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    pruned: bool = False

    @classmethod
    def start(cls, params: dict[str, torch.Tensor], keep: int, rho: float) -> AdmmState:
        """Z_0 = Proj(W_0), U_0 = 0."""
        weights = {name: p.detach().clone() for name, p in params.items()}
        z = project_topk(weights, keep)
        return cls(z=z, u={n: torch.zeros_like(w) for n, w in weights.items()}, masks=_support(z), rho=rho)

    def penalty(self, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """(rho / 2) sum_l ||W_l - Z_l + U_l||_F^2 (squared, unlike the reference code)."""
        return 0.5 * self.rho * sum(((p - self.z[n] + self.u[n]) ** 2).sum() for n, p in params.items())

    @torch.no_grad()
    def update(self, params: dict[str, torch.Tensor], projection: str, keep: int, l1_delta: float) -> dict[str, float]:
        """Z- and U-steps after a W-step, over all prunable weights; returns (and keeps) the round's record."""
        weights = {name: p.detach() for name, p in params.items()}
        shifted = {name: w + self.u[name] for name, w in weights.items()}
        self.z = project_topk(shifted, keep) if projection == "topk" else soft_threshold(shifted, l1_delta)
        self.u = {name: self.u[name] + weights[name] - self.z[name] for name in weights}
        support = _support(self.z)
        changed = sum(int((support[name] != self.masks[name]).sum()) for name in support)
        self.masks = support
        self.rounds_done += 1
        record = {
            "round": self.rounds_done,
            "primal_residual": float(torch.sqrt(sum(((weights[n] - self.z[n]) ** 2).sum() for n in weights))),
            "mask_changes": changed,
            "z_sparsity": mask_sparsity(support),
        }
        self.history.append(record)
        return record

    def to(self, device: torch.device | str) -> AdmmState:
        for table in (self.z, self.u, self.masks):
            for name in table:
                table[name] = table[name].to(device)
        return self

    def save(self, folder: str | os.PathLike, extra_tensors: dict[str, torch.Tensor] | None = None) -> None:
        """Write `ntp_state.safetensors` (Z, U, masks, extras) and `ntp_state.json` (rho, rounds)."""
        tensors = {f"z/{n}": t for n, t in self.z.items()}
        tensors |= {f"u/{n}": t for n, t in self.u.items()}
        tensors |= {f"mask/{n}": t.to(torch.uint8) for n, t in self.masks.items()}
        tensors |= {f"extra/{n}": t for n, t in (extra_tensors or {}).items()}
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(Path(folder) / STATE_TENSORS))
        meta = {"rho": self.rho, "rounds_done": self.rounds_done, "history": self.history, "pruned": self.pruned}
        (Path(folder) / STATE_JSON).write_text(json.dumps(meta, indent=2) + "\n")

    @classmethod
    def load(cls, folder: str | os.PathLike) -> tuple[AdmmState, dict[str, torch.Tensor]]:
        """Read what `save` wrote; returns the state and the extra tensors."""
        folder = Path(folder)
        if not (folder / STATE_TENSORS).exists() or not (folder / STATE_JSON).exists():
            raise InputError(f"{folder} holds no NTP state ({STATE_TENSORS}, {STATE_JSON}); cannot resume NTP.")
        tensors = load_file(str(folder / STATE_TENSORS))
        meta = json.loads((folder / STATE_JSON).read_text())

        def part(prefix: str) -> dict[str, torch.Tensor]:
            return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}

        masks = {n: t.bool() for n, t in part("mask/").items()}
        state = cls(part("z/"), part("u/"), masks, meta["rho"], meta["rounds_done"], meta["history"], meta["pruned"])
        return state, part("extra/")


def _support(values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: value != 0 for name, value in values.items()}


@torch.no_grad()
def apply_masks(params: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]) -> None:
    """W <- W * M, in place: pruned weights are exactly zero again."""
    for name, param in params.items():
        param.mul_(masks[name])


def mask_sparsity(masks: dict[str, torch.Tensor]) -> float:
    """Fraction of entries a set of keep-masks removes (0 for no masks)."""
    total = sum(mask.numel() for mask in masks.values())
    return 1.0 - sum(int(mask.sum()) for mask in masks.values()) / total if total else 0.0


def sparsity_report(params: dict[str, torch.Tensor]) -> dict[str, object]:
    """Achieved sparsity overall and per tensor (fraction of exact zeros), as plain floats."""
    zeros = {name: int((p == 0).sum()) for name, p in params.items()}
    total = sum(p.numel() for p in params.values())
    return {
        "overall": sum(zeros.values()) / total,
        "prunable_weights": total,
        "nonzero_weights": total - sum(zeros.values()),
        "per_tensor": {name: zeros[name] / params[name].numel() for name in params},
    }
