"""The fine-tuning runner every attack and every learning-curve point goes through.

An explicit loop rather than `Trainer`: an audit runs hundreds of short, independent fine-tuning
runs on a few samples each, and each process must run its own share without DDP synchronising
it with the others (which `Trainer` would do under `accelerate launch`). The data are encoded
to tensors once per audit, so that a run costs only its optimiser steps.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Literal

import torch
from datasets import Dataset
from torch import nn
from transformers import PreTrainedModel

from ..data.transforms import ImagePreprocessor
from ..metrics import predict_accuracy
from ..models import classification_head, head_linear, reinitialise_head

OPTIMIZERS = ("sgd", "sgd-momentum", "adam", "adamw")


@dataclass(frozen=True)
class FinetuneSpec:
    """How an attacker fine-tunes: what is trained, with which optimiser, for how long.

    Args:
        name: a label for reports.
        trainable: `"all"` (full fine-tuning) or `"head"` (linear probe on frozen features).
        reinit_head: discard the released head and start from a fresh one.
        optimizer: `sgd`, `sgd-momentum` (0.9), `adam` or `adamw`.
        learning_rate / weight_decay: optimiser settings.
        steps: optimiser steps, the same whatever the number of samples (so that the model and
            the scratch baseline get exactly the same budget).
        batch_size: samples per step (all of them when fewer).
    """

    name: str = "full"
    trainable: Literal["all", "head"] = "all"
    reinit_head: bool = False
    optimizer: Literal["sgd", "sgd-momentum", "adam", "adamw"] = "adam"
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    steps: int = 150
    batch_size: int = 32

    def __post_init__(self) -> None:
        if self.trainable not in ("all", "head"):
            raise ValueError(f"trainable must be 'all' or 'head', got {self.trainable!r}.")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"Unknown optimizer {self.optimizer!r}; choose one of {OPTIMIZERS}.")
        if self.learning_rate <= 0 or self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"{self.name}: learning_rate, steps and batch_size must be positive.")


@dataclass
class EncodedSplit:
    """A split as model-ready tensors: `pixel_values` (N, 3, S, S) and `labels` (N,)."""

    pixel_values: torch.Tensor
    labels: torch.Tensor

    @classmethod
    def from_dataset(cls, dataset: Dataset, preprocessor: ImagePreprocessor, batch_size: int = 512) -> EncodedSplit:
        chunks = [
            preprocessor(dataset[start : start + batch_size]["image"]) for start in range(0, len(dataset), batch_size)
        ]
        return cls(torch.cat(chunks), torch.tensor(dataset["label"], dtype=torch.long))

    def __len__(self) -> int:
        return len(self.labels)

    def select(self, indices: torch.Tensor | list[int]) -> EncodedSplit:
        indices = torch.as_tensor(indices, dtype=torch.long)
        return EncodedSplit(self.pixel_values[indices], self.labels[indices])


def _optimizer(spec: FinetuneSpec, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    if spec.optimizer == "sgd":
        return torch.optim.SGD(params, lr=spec.learning_rate, weight_decay=spec.weight_decay)
    if spec.optimizer == "sgd-momentum":
        return torch.optim.SGD(params, lr=spec.learning_rate, momentum=0.9, weight_decay=spec.weight_decay)
    if spec.optimizer == "adam":
        return torch.optim.Adam(params, lr=spec.learning_rate, weight_decay=spec.weight_decay)
    return torch.optim.AdamW(params, lr=spec.learning_rate, weight_decay=spec.weight_decay)


def finetune(model: PreTrainedModel, train: EncodedSplit, spec: FinetuneSpec, seed: int = 0) -> PreTrainedModel:
    """Fine-tune a deep copy of `model` on `train` following `spec`; the original is untouched."""
    if len(train) == 0:
        raise ValueError("Cannot fine-tune on an empty set of samples.")
    num_outputs = head_linear(model).out_features
    if int(train.labels.max()) >= num_outputs:
        raise ValueError(
            f"Labels go up to {int(train.labels.max())} but the head has {num_outputs} outputs; "
            "load the model with the target's class count (num_labels) first."
        )
    model = copy.deepcopy(model)
    if spec.reinit_head:
        reinitialise_head(model, seed)
    if spec.trainable == "head":
        model.requires_grad_(False)
        classification_head(model).requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = _optimizer(spec, params)
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    batch_size = min(spec.batch_size, len(train))
    order = torch.empty(0, dtype=torch.long)
    model.train()
    for _ in range(spec.steps):
        if len(order) < batch_size:  # epoch-wise reshuffling: every sample seen once per epoch
            order = torch.cat([order, torch.randperm(len(train), generator=generator)])
        batch, order = order[:batch_size], order[batch_size:]
        logits = model(pixel_values=train.pixel_values[batch].to(device)).logits
        loss = nn.functional.cross_entropy(logits, train.labels[batch].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    model.eval()
    return model


def finetuned_accuracy(
    model: PreTrainedModel, train: EncodedSplit, test: EncodedSplit, spec: FinetuneSpec, seed: int = 0
) -> float:
    """Test accuracy after `finetune(model, train, spec, seed)`."""
    return predict_accuracy(finetune(model, train, spec, seed), test.pixel_values, test.labels)
