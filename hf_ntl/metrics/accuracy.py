"""Classification accuracy for `Trainer.compute_metrics` and for pre-encoded tensors."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from transformers import EvalPrediction

from ..models import autocast


def compute_accuracy(prediction: EvalPrediction) -> dict[str, float]:
    """`compute_metrics` for `Trainer`: the fraction of argmax predictions equal to the label."""
    logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
    return {"accuracy": float((np.argmax(logits, axis=-1) == prediction.label_ids).mean())}


@torch.no_grad()
def predict_accuracy(
    model: nn.Module,
    pixel_values: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int = 256,
    mixed_precision: str = "no",
) -> float:
    """Accuracy of `model` on model-ready `pixel_values` (eval mode, restored afterwards; forward passes
    autocast to `mixed_precision`)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    for start in range(0, len(labels), batch_size):
        with autocast(device, mixed_precision):
            logits = model(pixel_values=pixel_values[start : start + batch_size].to(device)).logits
        correct += (logits.argmax(-1).cpu() == labels[start : start + batch_size]).sum().item()
    model.train(was_training)
    return correct / len(labels)
