"""Source/target pairs for protection training: each example carries one image of each domain.

Pairing inside the dataset (rather than drawing target batches on the side) lets `Trainer`'s
sampler, gradient accumulation and distributed sharding handle both domains at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from datasets import Dataset

from .transforms import ImageClassificationCollator


class PairedImageDataset(torch.utils.data.Dataset):
    """Example i = source[i] with a target example; the target is reused cyclically in a seeded order."""

    def __init__(self, source: Dataset, target: Dataset, seed: int = 0) -> None:
        if len(source) == 0 or len(target) == 0:
            raise ValueError("Both the source and the target data must hold at least one example.")
        self.source, self.target = source, target
        order = np.random.default_rng(seed).permutation(len(target))
        self.target_index = order[np.arange(len(source)) % len(target)]

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        source, target = self.source[int(index)], self.target[int(self.target_index[index])]
        return {
            "image": source["image"],
            "label": source["label"],
            "target_image": target["image"],
            "target_label": target["label"],
        }


@dataclass
class PairedCollator(ImageClassificationCollator):
    """`pixel_values`/`labels` (source) plus `target_pixel_values`/`target_labels` when present."""

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = super().__call__(examples)
        if "target_image" in examples[0]:
            targets = [{"image": e["target_image"], "label": e["target_label"]} for e in examples]
            target_batch = super().__call__(targets)
            batch["target_pixel_values"] = target_batch["pixel_values"]
            batch["target_labels"] = target_batch["labels"]
        return batch
