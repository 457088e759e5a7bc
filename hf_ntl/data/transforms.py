"""Image preprocessing through the model's own transformers image processor, and the batch collator.

A Hub or folder checkpoint is read with `AutoImageProcessor` (its `preprocessor_config.json`:
resize, centre crop or `crop_pct`, resampling filter, mean/std), so a model sees its inputs as it
was trained on them. The PIL backend is used on every machine, with or without torchvision: the
torchvision backend resizes slightly differently, and a model protected on one machine and
audited on another must see the same pixels. Tiny presets get a plain square processor and save
it like any checkpoint. Hand-written code is left only for what no processor does: augmentation
and diffusion's [-1, 1] encoding.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Dataset
from PIL import Image as PILImage
from PIL import ImageEnhance, ImageOps
from transformers import AutoImageProcessor, ViTImageProcessorPil
from transformers.image_processing_base import ImageProcessingMixin
from transformers.image_processing_utils import BaseImageProcessor

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


class ImagePreprocessor:
    """PIL images in, the model's `pixel_values` out, through a transformers image processor.

    `ImagePreprocessor(image_size, image_mean, image_std)` is the square processor of the tiny
    presets (resize to `image_size` x `image_size`, normalise); `ImagePreprocessor.from_pretrained`
    reads a checkpoint's own.

    Args:
        image_size: side of the square the model takes.
        image_mean / image_std: per-channel normalisation after scaling to [0, 1].
        processor: an image processor to use instead (the other arguments are then ignored).
    """

    def __init__(
        self,
        image_size: int = 32,
        image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5),
        image_std: tuple[float, float, float] = (0.5, 0.5, 0.5),
        *,
        processor: BaseImageProcessor | None = None,
    ) -> None:
        if processor is None:
            if image_size < 1:
                raise ValueError(f"image_size must be positive, got {image_size}.")
            if len(image_mean) != 3 or len(image_std) != 3 or min(image_std) <= 0:
                raise ValueError(f"Need three means and three positive stds, got {image_mean} / {image_std}.")
            processor = ViTImageProcessorPil(
                size={"height": image_size, "width": image_size},
                image_mean=[float(v) for v in image_mean],
                image_std=[float(v) for v in image_std],
            )
        self.processor = processor
        self.image_size = _output_side(processor)

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, image_size: int | None = None) -> ImagePreprocessor:
        """The image processor of a checkpoint (Hub id or folder), PIL backend.

        Falls back to the tiny presets' square processor (with a warning) when the checkpoint has
        none. `image_size` overrides the output side (e.g. to keep 32x32 images small on a model
        trained at 224), keeping the processor's resize-then-crop ratio. Raises `InputError` for a
        path with no such folder, and for a Hub id that is no local folder and whose repository
        the Hub does not give.
        """
        if message := missing_local_path(name_or_path):
            raise InputError(message)
        path = os.path.expanduser(name_or_path)
        local = Path(path).exists()
        try:
            ImageProcessingMixin.get_image_processor_dict(path)
        except OSError as err:
            # transformers chains the Hub's error (no such repository, gated, ...) as the cause; a checkpoint that
            # only lacks the file raises without one, and gets the defaults.
            if err.__cause__ is not None and not local:
                raise InputError(not_local_nor_hub(name_or_path, err)) from err
            where = "" if local else " (not a local folder; the Hub gave none)"
            logger.warning("%s has no %s%s; using default preprocessing.", name_or_path, PREPROCESSOR_FILE, where)
            return cls(image_size=image_size) if image_size else cls()
        try:
            processor = AutoImageProcessor.from_pretrained(path, backend="pil")
        except ValueError as err:  # a config that names no processor class transformers knows
            raise InputError(f"{name_or_path}/{PREPROCESSOR_FILE} cannot be read as an image processor: {err}") from err
        if image_size is not None and image_size != _output_side(processor):
            processor = AutoImageProcessor.from_pretrained(path, backend="pil", **_resized(processor, image_size))
        return cls(processor=processor)

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write `preprocessor_config.json`, which `AutoImageProcessor` (and this class) read back."""
        self.processor.save_pretrained(folder)

    def to_dict(self) -> dict[str, Any]:
        """The processor's configuration, as saved."""
        return self.processor.to_dict()

    def __call__(self, images: list[PILImage.Image]) -> torch.Tensor:
        """Model-ready `pixel_values`, a float tensor of shape (B, 3, image_size, image_size)."""
        return self.processor([_to_rgb(image) for image in images], return_tensors="pt")["pixel_values"]


def _output_side(processor: BaseImageProcessor) -> int:
    """The side of the square a processor outputs: its crop when it crops, else its resize target."""
    crop, size = getattr(processor, "crop_size", None), processor.size
    if getattr(processor, "do_center_crop", False) and crop:
        height, width = crop["height"], crop["width"]
    elif size.get("shortest_edge"):
        return int(size["shortest_edge"])  # square images stay square; crop_pct crops back to this side
    else:
        height, width = size.get("height"), size.get("width")
    if not height or height != width:
        raise InputError(f"Only processors with a square output are supported; this one gives {height}x{width}.")
    return int(height)


def _resized(processor: BaseImageProcessor, side: int) -> dict[str, Any]:
    """The `from_pretrained` overrides that make `processor` output `side` x `side` images."""
    crop = getattr(processor, "crop_size", None)
    if getattr(processor, "do_center_crop", False) and crop:
        # Keep the processor's resize-to-crop ratio (e.g. 256 -> 224 becomes 73 -> 64).
        ratio = (processor.size.get("shortest_edge") or processor.size.get("height") or crop["height"]) / crop["height"]
        resize = max(side, round(side * ratio))
        size = {"shortest_edge": resize} if processor.size.get("shortest_edge") else {"height": resize, "width": resize}
        return {"size": size, "crop_size": {"height": side, "width": side}}
    if processor.size.get("shortest_edge"):
        return {"size": {"shortest_edge": side}}
    return {"size": {"height": side, "width": side}}


def _to_rgb(image: PILImage.Image) -> PILImage.Image:
    """`image` in RGB, saying the first time in this process that images of its mode are converted."""
    if image.mode == "RGB":
        return image
    if image.mode not in _MODES_MENTIONED:
        _MODES_MENTIONED.add(image.mode)
        note = f" ({_MODE_NOTES[image.mode]})" if image.mode in _MODE_NOTES else ""
        logger.warning("Images in PIL mode %s%s are converted to RGB for the model.", image.mode, note)
    return image.convert("RGB")


def light_augment(image: PILImage.Image, invert_probability: float = 0.0) -> PILImage.Image:
    """A small random shift, scale and rotation plus a brightness/contrast jitter, and optionally colour inversion.

    No flips: a mirrored digit is another symbol. Inverting the colours (AutoAugment's Invert), with
    probability `invert_probability`, keeps the shape and swaps ink and background: it teaches a model that
    the label is in the shape, not in the colours (what tiny-vit needs to pass 95% on font-digits; see
    `SOURCE_RECIPES`). Randomness comes from torch's global generator, which `Trainer` seeds, so augmented runs
    are reproducible.
    """
    angle, scale, dx, dy, brightness, contrast = (
        torch.empty(6).uniform_(-1, 1).mul_(torch.tensor([10.0, 0.1, 0.08, 0.08, 0.15, 0.15])).tolist()
    )
    width, height = image.size
    image = _to_rgb(image)
    # What the rotation and shift uncover takes the edge colour, as a zoom-out's padding does: black wedges on a
    # coloured background are features no test image has (with them tiny-vit reached 13.8% validation accuracy on
    # font-digits after 3 epochs, without them 22.5%).
    image = image.rotate(
        angle,
        resample=PILImage.Resampling.BILINEAR,
        translate=(dx * width, dy * height),
        fillcolor=image.getpixel((0, 0)),
    )
    if abs(scale) > 1e-3:
        side = max(1, round(width * (1 + scale)))
        image = image.resize((side, side), PILImage.Resampling.BILINEAR)
        image = _centre_fit(image, width, height)
    image = ImageEnhance.Brightness(image).enhance(1 + brightness)
    image = ImageEnhance.Contrast(image).enhance(1 + contrast)
    # Drawn only when asked for, so that the other presets' random streams (and fits) stay as they were.
    if invert_probability > 0 and torch.rand(()).item() < invert_probability:
        image = ImageOps.invert(image)
    return image


def _centre_fit(image: PILImage.Image, width: int, height: int) -> PILImage.Image:
    """Crop (zoomed in) or pad with the edge colour (zoomed out) back to width x height."""
    if image.size[0] >= width:
        left, top = (image.size[0] - width) // 2, (image.size[1] - height) // 2
        return image.crop((left, top, left + width, top + height))
    canvas = PILImage.new("RGB", (width, height), image.getpixel((0, 0)))
    canvas.paste(image, ((width - image.size[0]) // 2, (height - image.size[1]) // 2))
    return canvas


def augment_batch(batch: dict[str, list], invert_probability: float = 0.0) -> dict[str, list]:
    """`Dataset.with_transform` function applying `light_augment` (with `invert_probability`) to the `image`
    column; bind the probability with `functools.partial`."""
    return {**batch, "image": [light_augment(image, invert_probability) for image in batch["image"]]}


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
