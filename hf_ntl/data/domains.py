"""Embedded image domains: offline, deterministic from a seed, generated on first use and cached.

Every domain is a `datasets.DatasetDict` with `train` and `test` splits, an `image` column
(`Image`, RGB) and a `label` column (`ClassLabel` with names). They exist so that every part of
hf_ntl (protection, attacks, SLC-AUC, the demo, the tests) runs without the Hub, and so that the
source/target pairs have a real transfer benefit for a protection to remove:

- `font-digits`: digits 0-9 rendered from the TrueType fonts matplotlib ships, with random font,
  size, rotation, offset, stroke, blur, colours and background (a SYN-digits-like domain).
- `uci-digits`: the 1,797 real handwritten 8x8 digit scans that scikit-learn ships, resized.
- `textured-digits`: the handwritten scikit-learn digits blended into random patches of the real
  photographs scikit-learn ships (an MNIST-M-like domain).
- `textured-shapes`: ten geometric shapes with textured fills; a *different task* on the same
  kind of input, for "restricted task" experiments.
"""

from __future__ import annotations

import glob
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, load_from_disk
from datasets.utils.tqdm import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
from PIL import Image as PILImage
from PIL import ImageDraw, ImageFilter, ImageFont

from ..errors import InputError

logger = logging.getLogger(__name__)

# Bump when a generator changes its output, so that stale caches are not reused.
GENERATOR_VERSION = 2

DIGIT_NAMES = [str(d) for d in range(10)]
SHAPE_NAMES = [
    "circle", "ring", "triangle", "square", "pentagon",
    "hexagon", "star", "cross", "crescent", "half-disc",
]  # fmt: skip

# Fonts shipped with matplotlib that have real glyphs for the ten digits (the symbol, extension
# and "last resort" fonts draw boxes or other characters instead).
_DIGIT_FONT_PATTERNS = ("DejaVuSans*.ttf", "DejaVuSerif*.ttf", "STIXGeneral*.ttf", "cm[rbt]*10.ttf", "cmss10.ttf")


@dataclass(frozen=True)
class DomainSpec:
    """What an embedded domain is and how to make it.

    Args:
        name: the name users pass (`"font-digits"`).
        description: one line for `--help` and error messages.
        class_names: names of the `ClassLabel`.
        generate: `generate(size, seed, num_train, num_test) -> (train_images, train_labels,
            test_images, test_labels)`.
        default_num_train / default_num_test: sizes when the user asks for none; `None` when the
            domain has a fixed size (a real data set).
    """

    name: str
    description: str
    class_names: list[str]
    generate: Callable[[int, int, int | None, int | None], tuple[list, list, list, list]]
    default_num_train: int | None
    default_num_test: int | None


def default_cache_dir() -> Path:
    """Where generated domains are cached: `$HF_NTL_CACHE`, else `~/.cache/hf_ntl`."""
    return Path(os.environ.get("HF_NTL_CACHE", Path.home() / ".cache" / "hf_ntl")) / "domains"


# --------------------------------------------------------------------------------------------
# Shared drawing helpers


def _contrasting_colours(rng: np.random.Generator) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """A random foreground and background colour whose luminance differs by at least 0.3."""
    while True:
        fg, bg = rng.integers(0, 256, size=(2, 3))
        luminance = np.array([0.299, 0.587, 0.114])
        if abs(fg @ luminance - bg @ luminance) / 255.0 >= 0.3:
            return tuple(int(v) for v in fg), tuple(int(v) for v in bg)


def _background(rng: np.random.Generator, colour: tuple[int, ...], canvas: int) -> PILImage.Image:
    """A plain, gradient or noisy background around `colour`."""
    base = np.broadcast_to(np.array(colour, dtype=np.float32), (canvas, canvas, 3)).copy()
    kind = rng.integers(0, 3)
    if kind == 1:
        ramp = np.linspace(-1.0, 1.0, canvas, dtype=np.float32)
        direction = rng.uniform(0, 2 * np.pi)
        grad = np.cos(direction) * ramp[None, :] + np.sin(direction) * ramp[:, None]
        base += grad[..., None] * rng.uniform(20, 60)
    elif kind == 2:
        base += rng.normal(0, rng.uniform(5, 25), size=base.shape).astype(np.float32)
    return PILImage.fromarray(np.clip(base, 0, 255).astype(np.uint8))


def _texture(rng: np.random.Generator, colour: tuple[int, ...], canvas: int) -> PILImage.Image:
    """A solid, striped, checkered or noisy fill in shades of `colour`."""
    yy, xx = np.mgrid[0:canvas, 0:canvas].astype(np.float32)
    kind = rng.integers(0, 4)
    period = rng.uniform(4, 12)
    if kind == 0:
        pattern = np.zeros_like(xx)
    elif kind == 1:
        angle = rng.uniform(0, np.pi)
        pattern = np.sign(np.sin((np.cos(angle) * xx + np.sin(angle) * yy) * 2 * np.pi / period))
    elif kind == 2:
        pattern = np.sign(np.sin(xx * 2 * np.pi / period) * np.sin(yy * 2 * np.pi / period))
    else:
        pattern = rng.uniform(-1, 1, size=xx.shape).astype(np.float32)
    fill = np.array(colour, dtype=np.float32)[None, None, :] + pattern[..., None] * rng.uniform(15, 45)
    return PILImage.fromarray(np.clip(fill, 0, 255).astype(np.uint8))


def _compose(mask: PILImage.Image, fg: PILImage.Image, bg: PILImage.Image, size: int) -> PILImage.Image:
    """Paint `fg` over `bg` through `mask`, then downsample the large canvas to `size`."""
    return PILImage.composite(fg, bg, mask).resize((size, size), PILImage.Resampling.LANCZOS)


def _balanced_labels(rng: np.random.Generator, count: int, num_classes: int = 10) -> np.ndarray:
    """`count` labels, every class as often as possible (exactly balanced when divisible)."""
    return rng.permutation(np.arange(count) % num_classes)


# --------------------------------------------------------------------------------------------
# font-digits


@lru_cache(maxsize=1)
def digit_font_paths() -> tuple[str, ...]:
    """Paths of the TrueType fonts matplotlib ships that draw the ten digits."""
    import matplotlib

    font_dir = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    paths = sorted({p for pattern in _DIGIT_FONT_PATTERNS for p in glob.glob(str(font_dir / pattern))})
    paths = [p for p in paths if "Display" not in p]
    if not paths:
        raise RuntimeError(f"No digit fonts found in {font_dir}; is matplotlib installed completely?")
    return tuple(paths)


@lru_cache(maxsize=512)
def _font(path: str, pixels: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(path, pixels)


def _render_font_digit(rng: np.random.Generator, digit: int, size: int) -> PILImage.Image:
    canvas = 2 * size  # draw large, then downsample: smoother strokes at small sizes
    fonts = digit_font_paths()
    font = _font(fonts[rng.integers(len(fonts))], int(canvas * rng.uniform(0.55, 0.9)))
    mask = PILImage.new("L", (canvas, canvas), 0)
    offset = rng.uniform(-0.1, 0.1, size=2) * canvas
    ImageDraw.Draw(mask).text(
        (canvas / 2 + offset[0], canvas / 2 + offset[1]),
        str(digit),
        fill=255,
        font=font,
        anchor="mm",
        stroke_width=int(rng.integers(0, 3)),
        stroke_fill=255,
    )
    mask = mask.rotate(rng.uniform(-20, 20), resample=PILImage.Resampling.BILINEAR)
    if rng.random() < 0.5:
        mask = mask.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.5)))
    fg_colour, bg_colour = _contrasting_colours(rng)
    fg = PILImage.new("RGB", (canvas, canvas), fg_colour)
    return _compose(mask, fg, _background(rng, bg_colour, canvas), size)


def _generate_balanced(
    render: Callable[[np.random.Generator, int, int], PILImage.Image],
    size: int,
    seed: int,
    num_train: int,
    num_test: int,
):
    """Train and test splits of exactly balanced labels, each rendered from its own seeded stream."""
    out = []
    for split_seed, count in ((seed, num_train), (seed + 1_000_003, num_test)):
        rng = np.random.default_rng(split_seed)
        labels = _balanced_labels(rng, count)
        out.append(([render(rng, int(label), size) for label in labels], labels.tolist()))
    return out[0][0], out[0][1], out[1][0], out[1][1]


def _generate_font_digits(size: int, seed: int, num_train: int | None, num_test: int | None):
    return _generate_balanced(_render_font_digit, size, seed, num_train, num_test)


# --------------------------------------------------------------------------------------------
# uci-digits and textured-digits (both from the scikit-learn scans)


def _uci_split(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The scikit-learn digit scans (values 0..1), split 75/25, stratified, from `seed`."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    scans = digits.images.astype(np.float32) / 16.0
    return train_test_split(scans, digits.target, test_size=0.25, stratify=digits.target, random_state=seed)


def _scan_to_image(scan: np.ndarray, size: int) -> PILImage.Image:
    # Centred with a black margin, as MNIST centres its digits in a 20x20 box of 28x28: the scans
    # are cropped tight to the digit, which no other digit domain is.
    inner = round(0.75 * size)
    grey = PILImage.fromarray((scan * 255).astype(np.uint8)).resize((inner, inner), PILImage.Resampling.BICUBIC)
    canvas = PILImage.new("L", (size, size), 0)
    canvas.paste(grey, ((size - inner) // 2, (size - inner) // 2))
    return canvas.convert("RGB")


def _generate_uci_digits(size: int, seed: int, num_train: int | None, num_test: int | None):
    if num_train is not None or num_test is not None:
        raise InputError("uci-digits is a real data set of fixed size (1,347 train / 450 test); do not set counts.")
    train_x, test_x, train_y, test_y = _uci_split(seed)
    return (
        [_scan_to_image(s, size) for s in train_x],
        train_y.tolist(),
        [_scan_to_image(s, size) for s in test_x],
        test_y.tolist(),
    )


@lru_cache(maxsize=1)
def _photographs() -> tuple[np.ndarray, ...]:
    from sklearn.datasets import load_sample_images

    return tuple(np.asarray(img) for img in load_sample_images().images)


def _textured_digit(rng: np.random.Generator, scan: np.ndarray, size: int) -> PILImage.Image:
    canvas = 2 * size
    scale = rng.uniform(0.75, 1.0)
    glyph = PILImage.fromarray((scan * 255).astype(np.uint8)).resize(
        (int(canvas * scale),) * 2, PILImage.Resampling.BICUBIC
    )
    mask = PILImage.new("L", (canvas, canvas), 0)
    corner = rng.integers(0, canvas - glyph.size[0] + 1, size=2)
    mask.paste(glyph, (int(corner[0]), int(corner[1])))
    mask = mask.rotate(rng.uniform(-12, 12), resample=PILImage.Resampling.BILINEAR)
    photo = _photographs()[rng.integers(len(_photographs()))]
    crop = int(rng.integers(64, 200))
    top, left = rng.integers(0, photo.shape[0] - crop), rng.integers(0, photo.shape[1] - crop)
    patch = PILImage.fromarray(photo[top : top + crop, left : left + crop]).resize((canvas, canvas))
    # MNIST-M's blend: |patch - digit|, so the digit is the photograph's colour negative.
    blended = np.abs(np.asarray(patch, dtype=np.int16) - np.asarray(mask, dtype=np.int16)[..., None])
    return PILImage.fromarray(blended.astype(np.uint8)).resize((size, size), PILImage.Resampling.LANCZOS)


def _generate_textured_digits(size: int, seed: int, num_train: int | None, num_test: int | None):
    # Train images use only the uci-digits train scans and test images only its test scans,
    # so no handwritten digit appears on both sides of the split.
    train_x, test_x, train_y, test_y = _uci_split(seed)
    out = []
    for split_seed, count, scans, targets in (
        (seed, num_train, train_x, train_y),
        (seed + 1_000_003, num_test, test_x, test_y),
    ):
        rng = np.random.default_rng(split_seed)
        labels = _balanced_labels(rng, count)
        by_class = [np.flatnonzero(targets == c) for c in range(10)]
        picks = [by_class[c][rng.integers(len(by_class[c]))] for c in labels]
        out.append(([_textured_digit(rng, scans[i], size) for i in picks], labels.tolist()))
    return out[0][0], out[0][1], out[1][0], out[1][1]


# --------------------------------------------------------------------------------------------
# textured-shapes


def _regular_polygon(centre: np.ndarray, radius: float, sides: int, angle: float) -> list[tuple[float, float]]:
    thetas = angle + 2 * np.pi * np.arange(sides) / sides
    return [(float(centre[0] + radius * np.cos(t)), float(centre[1] + radius * np.sin(t))) for t in thetas]


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, centre: np.ndarray, r: float, angle: float) -> None:
    box = [centre[0] - r, centre[1] - r, centre[0] + r, centre[1] + r]
    if shape == "circle":
        draw.ellipse(box, fill=255)
    elif shape == "ring":
        draw.ellipse(box, fill=255)
        inner = 0.55 * r
        draw.ellipse([centre[0] - inner, centre[1] - inner, centre[0] + inner, centre[1] + inner], fill=0)
    elif shape in ("triangle", "square", "pentagon", "hexagon"):
        sides = {"triangle": 3, "square": 4, "pentagon": 5, "hexagon": 6}[shape]
        draw.polygon(_regular_polygon(centre, r, sides, angle), fill=255)
    elif shape == "star":
        outer = _regular_polygon(centre, r, 5, angle)
        inner = _regular_polygon(centre, 0.4 * r, 5, angle + np.pi / 5)
        draw.polygon([p for pair in zip(outer, inner, strict=True) for p in pair], fill=255)
    elif shape == "cross":
        arm = 0.33 * r
        c, s = np.cos(angle), np.sin(angle)
        for dx, dy in ((r, arm), (arm, r)):
            corners = [(-dx, -dy), (dx, -dy), (dx, dy), (-dx, dy)]
            draw.polygon([(centre[0] + c * x - s * y, centre[1] + s * x + c * y) for x, y in corners], fill=255)
    elif shape == "crescent":
        draw.ellipse(box, fill=255)
        shift = 0.45 * r * np.array([np.cos(angle), np.sin(angle)])
        draw.ellipse([box[0] + shift[0], box[1] + shift[1], box[2] + shift[0], box[3] + shift[1]], fill=0)
    elif shape == "half-disc":
        start = np.degrees(angle)
        draw.pieslice(box, start, start + 180, fill=255)
    else:  # pragma: no cover - SHAPE_NAMES and this function are kept in step
        raise ValueError(shape)


def _render_shape(rng: np.random.Generator, label: int, size: int) -> PILImage.Image:
    canvas = 2 * size
    mask = PILImage.new("L", (canvas, canvas), 0)
    radius = canvas * rng.uniform(0.25, 0.42)
    centre = canvas / 2 + rng.uniform(-0.08, 0.08, size=2) * canvas
    _draw_shape(ImageDraw.Draw(mask), SHAPE_NAMES[label], centre, radius, rng.uniform(0, 2 * np.pi))
    fg_colour, bg_colour = _contrasting_colours(rng)
    return _compose(mask, _texture(rng, fg_colour, canvas), _background(rng, bg_colour, canvas), size)


def _generate_shapes(size: int, seed: int, num_train: int | None, num_test: int | None):
    return _generate_balanced(_render_shape, size, seed, num_train, num_test)


# --------------------------------------------------------------------------------------------
# Registry and the cached loader

EMBEDDED_DOMAINS: dict[str, DomainSpec] = {
    spec.name: spec
    for spec in (
        DomainSpec(
            "font-digits",
            "digits rendered from matplotlib's fonts with random style and background (SYN-digits-like)",
            DIGIT_NAMES,
            _generate_font_digits,
            10_000,
            2_000,
        ),
        DomainSpec(
            "uci-digits",
            "the 1,797 real handwritten 8x8 digit scans shipped with scikit-learn, resized",
            DIGIT_NAMES,
            _generate_uci_digits,
            None,
            None,
        ),
        DomainSpec(
            "textured-digits",
            "scikit-learn's handwritten digits blended into photograph patches (MNIST-M-like)",
            DIGIT_NAMES,
            _generate_textured_digits,
            5_000,
            1_000,
        ),
        DomainSpec(
            "textured-shapes",
            "ten geometric shapes with textured fills: a different task on similar images",
            SHAPE_NAMES,
            _generate_shapes,
            5_000,
            1_000,
        ),
    )
}


@contextmanager
def _quiet_datasets() -> Iterator[None]:
    were_disabled = are_progress_bars_disabled()
    disable_progress_bars()
    try:
        yield
    finally:
        if not were_disabled:
            enable_progress_bars()


def load_embedded_domain(
    name: str,
    *,
    image_size: int = 32,
    seed: int = 0,
    num_train: int | None = None,
    num_test: int | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> DatasetDict:
    """Load an embedded domain, generating and caching it on first use.

    Args:
        name: one of `EMBEDDED_DOMAINS` (`font-digits`, `uci-digits`, `textured-digits`,
            `textured-shapes`).
        image_size: side of the square RGB images.
        seed: the same seed gives the same pixels, on any machine with the same package versions.
        num_train / num_test: numbers of generated samples (default: the domain's own); not
            allowed for `uci-digits`, which is a real data set of fixed size.
        cache_dir: where to keep generated domains (default `$HF_NTL_CACHE/domains` or
            `~/.cache/hf_ntl/domains`).

    Returns:
        A `DatasetDict` with `train` and `test`, columns `image` (`Image`) and `label` (`ClassLabel`).
    """
    if name not in EMBEDDED_DOMAINS:
        raise InputError(f"Unknown embedded domain {name!r}; choose one of {sorted(EMBEDDED_DOMAINS)}.")
    spec = EMBEDDED_DOMAINS[name]
    if image_size < 8:
        raise InputError(f"image_size must be at least 8 pixels, got {image_size}.")
    if spec.default_num_train is not None:
        num_train = spec.default_num_train if num_train is None else num_train
        num_test = spec.default_num_test if num_test is None else num_test
        if num_train < 10 or num_test < 10:
            raise InputError(f"{name} needs at least 10 train and 10 test samples (one per class).")

    cache_root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = f"{name}-v{GENERATOR_VERSION}-size{image_size}-seed{seed}-train{num_train}-test{num_test}"
    target = cache_root / key
    if (target / "dataset_dict.json").exists():
        return load_from_disk(str(target))

    logger.info("Generating embedded domain %s (%s); cached at %s", name, spec.description, target)
    train_images, train_labels, test_images, test_labels = spec.generate(image_size, seed, num_train, num_test)
    features = Features({"image": Image(), "label": ClassLabel(names=spec.class_names)})
    dataset = DatasetDict(
        train=Dataset.from_dict({"image": train_images, "label": train_labels}, features=features),
        test=Dataset.from_dict({"image": test_images, "label": test_labels}, features=features),
    )
    # Write beside the target and rename, so that an interrupted or concurrent generation never
    # leaves a half-written cache entry that a later run would trust.
    cache_root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=cache_root))
    try:
        with _quiet_datasets():  # writing a few MB takes no time: a progress bar would be noise
            dataset.save_to_disk(str(staging / "data"))
        os.replace(staging / "data", target)
    except OSError:
        if not (target / "dataset_dict.json").exists():
            raise  # a real write failure, not another process that finished first
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return load_from_disk(str(target))
