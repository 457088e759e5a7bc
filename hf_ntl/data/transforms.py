"""Image preprocessing with PIL, numpy and torch (no torchvision), and the batch collator.

The preprocessing follows the model's own image-processor config (`preprocessor_config.json`:
`size`, `image_mean`, `image_std`), so a Hub checkpoint sees its inputs as it was trained on
them; tiny presets write the same file so that every saved model carries its preprocessing.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Dataset
from PIL import Image as PILImage
from PIL import ImageEnhance

from ..errors import InputError, missing_local_path, not_local_nor_hub
from .loading import stratified_subset

logger = logging.getLogger(__name__)

PREPROCESSOR_FILE = "preprocessor_config.json"

# What converting a PIL mode to RGB does, for the notice given the first time images of that mode are met.
_MODE_NOTES = {
    "1": "black and white",
    "L": "grayscale",
    "LA": "grayscale; transparency is dropped",
    "P": "palette",
    "RGBA": "transparency is dropped",
    "I;16": "16-bit; values above 255 are clipped",
    "I": "32-bit; values above 255 are clipped",
}
# Modes already reported: once per process is enough to know, once per batch would drown the training log.
_MODES_MENTIONED: set[str] = set()


@dataclass
class ImagePreprocessor:
    """Resize to a square and normalise, as the model's image processor would.

    Args:
        image_size: side of the square the model expects.
        image_mean / image_std: per-channel normalisation after scaling to [0, 1].
    """

    image_size: int = 32
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    def __post_init__(self) -> None:
        if self.image_size < 1:
            raise ValueError(f"image_size must be positive, got {self.image_size}.")
        if len(self.image_mean) != 3 or len(self.image_std) != 3 or min(self.image_std) <= 0:
            raise ValueError(f"Need three means and three positive stds, got {self.image_mean} / {self.image_std}.")
        self.image_mean = tuple(float(v) for v in self.image_mean)
        self.image_std = tuple(float(v) for v in self.image_std)

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, image_size: int | None = None) -> ImagePreprocessor:
        """Read size/mean/std from a checkpoint's image-processor config (Hub id or folder).

        Falls back to defaults (with a warning) when the checkpoint has no such file. `image_size`
        overrides the size (e.g. to keep 32x32 images small on a model trained at 224). Raises
        `InputError` for a path with no such folder, and for a Hub id that is no local folder and
        whose repository the Hub does not give.
        """
        from transformers.image_processing_base import ImageProcessingMixin

        if message := missing_local_path(name_or_path):
            raise InputError(message)
        local = Path(name_or_path).expanduser().exists()
        try:
            config, _ = ImageProcessingMixin.get_image_processor_dict(os.path.expanduser(name_or_path))
        except OSError as err:
            # transformers chains the Hub's error (no such repository, gated, ...) as the cause; a checkpoint that
            # only lacks the file raises without one, and gets the defaults.
            if err.__cause__ is not None and not local:
                raise InputError(not_local_nor_hub(name_or_path, err)) from err
            where = "" if local else " (not a local folder; the Hub gave none)"
            logger.warning("%s has no %s%s; using default preprocessing.", name_or_path, PREPROCESSOR_FILE, where)
            config = {}
        size = config.get("size", {})
        side = size if isinstance(size, int) else size.get("height") or size.get("shortest_edge") or cls.image_size
        if config.get("do_normalize", True):
            mean = config.get("image_mean", cls.image_mean)
            std = config.get("image_std", cls.image_std)
        else:
            mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
        return cls(image_size=image_size or int(side), image_mean=tuple(mean), image_std=tuple(std))

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write `preprocessor_config.json` in the format transformers' image processors read."""
        config: dict[str, Any] = {
            "image_processor_type": "ViTImageProcessor",
            "do_resize": True,
            "size": {"height": self.image_size, "width": self.image_size},
            "resample": int(PILImage.Resampling.BILINEAR),
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": True,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
        }
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / PREPROCESSOR_FILE).write_text(json.dumps(config, indent=2) + "\n")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load(self, images: list[PILImage.Image]) -> torch.Tensor:
        """Decode to RGB, resize, scale to [0, 1]: a float tensor of shape (B, 3, S, S)."""
        side = self.image_size
        arrays = []
        for image in images:
            image = _to_rgb(image)
            if image.size != (side, side):
                image = image.resize((side, side), PILImage.Resampling.BILINEAR)
            arrays.append(np.asarray(image))
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div_(255.0)

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalise [0, 1] pixels with the model's mean/std."""
        mean = torch.tensor(self.image_mean, dtype=pixels.dtype, device=pixels.device).view(1, 3, 1, 1)
        std = torch.tensor(self.image_std, dtype=pixels.dtype, device=pixels.device).view(1, 3, 1, 1)
        return (pixels - mean) / std

    def __call__(self, images: list[PILImage.Image]) -> torch.Tensor:
        """Model-ready `pixel_values` for a list of PIL images."""
        return self.normalise(self.load(images))


def _to_rgb(image: PILImage.Image) -> PILImage.Image:
    """`image` in RGB, saying the first time in this process that images of its mode are converted."""
    if image.mode == "RGB":
        return image
    if image.mode not in _MODES_MENTIONED:
        _MODES_MENTIONED.add(image.mode)
        note = f" ({_MODE_NOTES[image.mode]})" if image.mode in _MODE_NOTES else ""
        logger.warning("Images in PIL mode %s%s are converted to RGB for the model.", image.mode, note)
    return image.convert("RGB")


def light_augment(image: PILImage.Image) -> PILImage.Image:
    """A small random shift, scale and rotation plus a brightness/contrast jitter.

    No flips: a mirrored digit is another symbol. Randomness comes from torch's global generator,
    which `Trainer` seeds, so augmented runs are reproducible.
    """
    angle, scale, dx, dy, brightness, contrast = (
        torch.empty(6).uniform_(-1, 1).mul_(torch.tensor([10.0, 0.1, 0.08, 0.08, 0.15, 0.15])).tolist()
    )
    width, height = image.size
    image = _to_rgb(image).rotate(
        angle,
        resample=PILImage.Resampling.BILINEAR,
        translate=(dx * width, dy * height),
    )
    if abs(scale) > 1e-3:
        side = max(1, round(width * (1 + scale)))
        image = image.resize((side, side), PILImage.Resampling.BILINEAR)
        image = _centre_fit(image, width, height)
    image = ImageEnhance.Brightness(image).enhance(1 + brightness)
    return ImageEnhance.Contrast(image).enhance(1 + contrast)


def _centre_fit(image: PILImage.Image, width: int, height: int) -> PILImage.Image:
    """Crop (zoomed in) or pad with the edge colour (zoomed out) back to width x height."""
    if image.size[0] >= width:
        left, top = (image.size[0] - width) // 2, (image.size[1] - height) // 2
        return image.crop((left, top, left + width, top + height))
    canvas = PILImage.new("RGB", (width, height), image.getpixel((0, 0)))
    canvas.paste(image, ((width - image.size[0]) // 2, (height - image.size[1]) // 2))
    return canvas


def augment_batch(batch: dict[str, list]) -> dict[str, list]:
    """`Dataset.with_transform` function applying `light_augment` to the `image` column."""
    return {**batch, "image": [light_augment(image) for image in batch["image"]]}


@dataclass
class ImageClassificationCollator:
    """Turn examples `{"image": PIL, "label": int}` into `{"pixel_values", "labels"}` tensors."""

    preprocessor: ImagePreprocessor

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return {
            "pixel_values": self.preprocessor([example["image"] for example in examples]),
            "labels": torch.tensor([int(example["label"]) for example in examples], dtype=torch.long),
        }


# ---------------------------------------------------------------------------------------- diffusion


def encode_diffusion_images(images: list[PILImage.Image], image_size: int, channels: int) -> torch.Tensor:
    """PIL images as `(N, channels, image_size, image_size)` floats in [-1, 1], the range DDPM works in.

    Images are resized (bicubic) to the UNet's side and converted to RGB (3 channels) or greyscale (1).
    """
    if channels not in (1, 3):
        raise InputError(f"Only 1- or 3-channel UNets take images; this one has {channels} input channels.")
    mode = "RGB" if channels == 3 else "L"
    arrays = [
        np.asarray(image.convert(mode).resize((image_size, image_size), PILImage.Resampling.BICUBIC), np.float32)
        for image in images
    ]
    pixels = torch.from_numpy(np.stack(arrays)).reshape(len(arrays), image_size, image_size, channels)
    return pixels.permute(0, 3, 1, 2).contiguous() / 127.5 - 1


def encode_diffusion_split(
    dataset: Dataset, image_size: int, channels: int, limit: int | None = None, seed: int = 0
) -> torch.Tensor:
    """`encode_diffusion_images` of a split's `image` column, of a stratified `limit`-sized subset when larger."""
    if limit is not None and len(dataset) > limit:
        dataset = stratified_subset(dataset, limit, seed=seed)
    return encode_diffusion_images(dataset["image"], image_size, channels)


class DiffusionImages(torch.utils.data.Dataset):
    """Encoded images `(N, C, H, W)` in [-1, 1] as a dataset of `{"pixel_values": image}` examples."""

    def __init__(self, pixel_values: torch.Tensor) -> None:
        self.pixel_values = pixel_values

    def __len__(self) -> int:
        return len(self.pixel_values)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.pixel_values[index]}


def check_diffusion_images(pixel_values: torch.Tensor, sample_size: int, channels: int, what: str = "images") -> None:
    """Fail early, saying how to fix it, when tensors cannot be a UNet's input (shape or value range)."""
    expected = (channels, sample_size, sample_size)
    if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != expected:
        shape = "x".join(map(str, pixel_values.shape[1:])) if pixel_values.ndim == 4 else str(tuple(pixel_values.shape))
        raise InputError(
            f"The {what} are {shape} but the UNet takes {channels}x{sample_size}x{sample_size} (channels x height x "
            f"width): encode them with encode_diffusion_images(images, image_size={sample_size}, "
            f"channels={channels}), or use a UNet made for this image size."
        )
    low, high = float(pixel_values.min()), float(pixel_values.max())
    if low < -1.001 or high > 1.001:
        raise InputError(
            f"The {what} span [{low:.3g}, {high:.3g}] but DDPM works in [-1, 1]: scale them (x / 127.5 - 1 for "
            "8-bit pixels), as encode_diffusion_images does."
        )
