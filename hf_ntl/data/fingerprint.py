"""Content fingerprints of the samples a stage used: what lets an audit prove no test image was trained on.

Every stage that trains (fit-source, protect, fit-ddpm) records, for each role its data played
(`source fit`, `protection: target`, ...), which data set and split the samples came from and a
hash of each image's pixels. `hf-ntl evaluate` compares those hashes with its test split before
any fine-tuning: a test image that a model (or its original) was trained on is found whatever seed,
subset or path produced it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

from datasets import Dataset
from PIL import Image as PILImage

from .domains import EMBEDDED_DOMAINS

# 16 hex digits (64 bits) per image: collisions between distinct images are out of reach for any
# data set hf_ntl will see, and a record of 50,000 images stays under a megabyte.
HASH_HEX_DIGITS = 16


def image_hash(image: PILImage.Image) -> str:
    """A hash of an image's RGB pixels and size."""
    rgb = image.convert("RGB")
    return hashlib.sha256(f"{rgb.width}x{rgb.height}:".encode() + rgb.tobytes()).hexdigest()[:HASH_HEX_DIGITS]


def image_hashes(dataset: Dataset, batch_size: int = 1000) -> list[str]:
    """`image_hash` of each image, in the order of `dataset` (its `image` column)."""
    hashes = []
    for start in range(0, len(dataset), batch_size):
        hashes += [image_hash(image) for image in dataset[start : start + batch_size]["image"]]
    return hashes


@dataclass
class SampleSet:
    """The samples one role of a stage used: where they came from, and a hash per image.

    Args:
        dataset: the data set as the user named it (embedded domain, folder or Hub id).
        split: the split they were drawn from (`train`, `test`).
        image_size: the side an embedded domain was rendered at (its pixels, and so its hashes,
            depend on it); `None` for stored images.
        hashes: `image_hashes` of the samples.
    """

    dataset: str
    split: str
    image_size: int | None
    hashes: list[str] = field(repr=False)

    @classmethod
    def of(cls, dataset: Dataset, name: str, split: str, image_size: int) -> SampleSet:
        """The samples of `dataset`, drawn from `split` of the data set `name` loaded at `image_size`."""
        return cls(name, split, image_size if name in EMBEDDED_DOMAINS else None, image_hashes(dataset))

    def summary(self) -> dict[str, Any]:
        """What the stage's record says of these samples: source, count and one fingerprint for all."""
        fingerprint = hashlib.sha256("".join(sorted(self.hashes)).encode()).hexdigest()[:HASH_HEX_DIGITS]
        return {
            "dataset": self.dataset,
            "split": self.split,
            "image_size": self.image_size,
            "samples": len(self.hashes),
            "fingerprint": fingerprint,
        }

    def to_dict(self) -> dict[str, Any]:
        return {**self.summary(), "hashes": self.hashes}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> SampleSet:
        return cls(values["dataset"], values["split"], values.get("image_size"), list(values["hashes"]))
