import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image as PILImage
from transformers import AutoImageProcessor
from transformers.image_processing_base import ImageProcessingMixin

from hf_ntl.data import ImageClassificationCollator, ImagePreprocessor, light_augment, transforms
from hf_ntl.errors import InputError


def test_normalisation_matches_hand_computation():
    preprocessor = ImagePreprocessor(image_size=4, image_mean=(0.5, 0.25, 0.0), image_std=(0.5, 0.25, 2.0))
    white = PILImage.new("RGB", (4, 4), (255, 255, 255))
    pixels = preprocessor([white])
    assert pixels.shape == (1, 3, 4, 4)
    np.testing.assert_allclose(pixels[0, :, 0, 0].numpy(), [(1 - 0.5) / 0.5, (1 - 0.25) / 0.25, 1 / 2.0], rtol=1e-6)


def test_resizes_and_converts_to_rgb():
    grey = PILImage.new("L", (10, 6), 128)
    pixels = ImagePreprocessor(image_size=8)([grey, grey.convert("RGB")])
    assert pixels.shape == (2, 3, 8, 8)
    torch.testing.assert_close(pixels[0], pixels[1])


# Image-processor configs as Hub checkpoints ship them (the keys and values of their preprocessor_config.json).
CHECKPOINT_PROCESSORS = {
    "resnet-style": (  # microsoft/resnet-18: shortest edge 224 / crop_pct 0.875, bicubic
        {
            "image_processor_type": "ConvNextImageProcessor",
            "size": {"shortest_edge": 224},
            "crop_pct": 0.875,
            "resample": 3,
            "image_mean": [0.485, 0.456, 0.406],
            "image_std": [0.229, 0.224, 0.225],
        },
        224,
    ),
    "vit-style": (  # google/vit-base-patch16-224: squashed to 224 x 224, bilinear
        {
            "image_processor_type": "ViTImageProcessor",
            "size": {"height": 224, "width": 224},
            "resample": 2,
            "image_mean": [0.5, 0.5, 0.5],
            "image_std": [0.5, 0.5, 0.5],
        },
        224,
    ),
    "convnext-384-style": (  # facebook/convnext-*-384: no crop at 384 and above
        {
            "image_processor_type": "ConvNextImageProcessor",
            "size": {"shortest_edge": 384},
            "crop_pct": 0.875,
            "resample": 3,
            "image_mean": [0.485, 0.456, 0.406],
            "image_std": [0.229, 0.224, 0.225],
        },
        384,
    ),
    "crop-style": (  # resize the shortest edge to 256, centre-crop 224
        {
            "image_processor_type": "BitImageProcessor",
            "size": {"shortest_edge": 256},
            "do_center_crop": True,
            "crop_size": {"height": 224, "width": 224},
            "resample": 3,
        },
        224,
    ),
}


@pytest.mark.parametrize("style", sorted(CHECKPOINT_PROCESSORS))
def test_a_checkpoint_is_preprocessed_by_its_own_image_processor(tmp_path, style):
    config, side = CHECKPOINT_PROCESSORS[style]
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    rng = np.random.default_rng(0)
    images = [PILImage.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((32, 32), (300, 260))]
    ours = ImagePreprocessor.from_pretrained(tmp_path)
    theirs = AutoImageProcessor.from_pretrained(tmp_path)(images, return_tensors="pt")["pixel_values"]
    assert ours.image_size == side and ours(images).shape == (2, 3, side, side)
    torch.testing.assert_close(ours(images), theirs, atol=1e-6, rtol=0)


def test_image_size_overrides_the_output_side_keeping_the_crop_ratio(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(CHECKPOINT_PROCESSORS["crop-style"][0]))
    small = ImagePreprocessor.from_pretrained(tmp_path, image_size=64)
    assert small.image_size == 64 and small([PILImage.new("RGB", (90, 70))]).shape == (1, 3, 64, 64)
    assert small.processor.size["shortest_edge"] == round(64 * 256 / 224)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(CHECKPOINT_PROCESSORS["resnet-style"][0]))
    assert ImagePreprocessor.from_pretrained(tmp_path, image_size=32)([PILImage.new("RGB", (50, 50))]).shape[-1] == 32


def test_round_trip_and_default_without_config(tmp_path):
    original = ImagePreprocessor(image_size=24, image_mean=(0.1, 0.2, 0.3), image_std=(0.4, 0.5, 0.6))
    original.save_pretrained(tmp_path / "saved")
    assert ImagePreprocessor.from_pretrained(tmp_path / "saved").to_dict() == original.to_dict()
    (tmp_path / "empty").mkdir()
    assert ImagePreprocessor.from_pretrained(tmp_path / "empty").to_dict() == ImagePreprocessor().to_dict()


def test_a_missing_checkpoint_is_an_error_not_default_preprocessing(tmp_path, monkeypatch, caplog):
    with pytest.raises(InputError, match=f"^no such folder: {tmp_path}/nope$"):
        ImagePreprocessor.from_pretrained(tmp_path / "nope")
    # Offline, a Hub id that is not cached gives no file: the defaults, said so.
    with caplog.at_level(logging.WARNING, logger="hf_ntl.data.transforms"):
        assert ImagePreprocessor.from_pretrained("someone/model").to_dict() == ImagePreprocessor().to_dict()
    assert "someone/model has no preprocessor_config.json (not a local folder" in caplog.text

    def no_such_repository(name):  # what transformers raises online for a repository the Hub does not have
        try:
            raise LookupError("404 Repository Not Found")
        except LookupError as err:
            raise OSError(f"{name} is not a local folder and is not a valid model identifier") from err

    monkeypatch.setattr(ImageProcessingMixin, "get_image_processor_dict", no_such_repository)
    with pytest.raises(InputError, match="^someone/model is not a local folder .* the Hub failed: .*valid model"):
        ImagePreprocessor.from_pretrained("someone/model")


def test_converting_other_modes_to_rgb_is_said_once_per_mode(monkeypatch, caplog):
    monkeypatch.setattr(transforms, "_MODES_MENTIONED", set())
    grey, rgba = PILImage.new("L", (8, 8), 128), PILImage.new("RGBA", (8, 8), (1, 2, 3, 0))
    preprocessor = ImagePreprocessor(image_size=8)
    with caplog.at_level(logging.WARNING, logger="hf_ntl.data.transforms"):
        for _ in range(3):  # three batches
            preprocessor([grey, grey, PILImage.new("RGB", (8, 8))])
        light_augment(grey)
        preprocessor([rgba])
    assert caplog.messages == [
        "Images in PIL mode L (grayscale) are converted to RGB for the model.",
        "Images in PIL mode RGBA (transparency is dropped) are converted to RGB for the model.",
    ]


def test_rejects_bad_statistics():
    with pytest.raises(ValueError, match="positive stds"):
        ImagePreprocessor(image_std=(0.5, 0.0, 0.5))


def test_collator_produces_pixel_values_and_labels():
    examples = [{"image": PILImage.new("RGB", (32, 32), (i * 40, 0, 0)), "label": i} for i in range(3)]
    batch = ImageClassificationCollator(ImagePreprocessor())(examples)
    assert batch["pixel_values"].shape == (3, 3, 32, 32) and batch["pixel_values"].dtype == torch.float32
    assert batch["labels"].tolist() == [0, 1, 2] and batch["labels"].dtype == torch.long


def test_light_augmentation_changes_pixels_reproducibly():
    rng = np.random.default_rng(0)
    image = PILImage.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
    torch.manual_seed(1)
    first = np.asarray(light_augment(image))
    torch.manual_seed(1)
    again = np.asarray(light_augment(image))
    assert first.shape == (32, 32, 3)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, np.asarray(image))


def test_colour_inversion_is_opt_in_and_leaves_the_other_presets_streams_alone():
    rng = np.random.default_rng(0)
    image = PILImage.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
    torch.manual_seed(3)
    plain = np.asarray(light_augment(image)).astype(int)
    next_draw = torch.rand(())
    torch.manual_seed(3)
    inverted = np.asarray(light_augment(image, invert_probability=1.0)).astype(int)
    np.testing.assert_array_equal(inverted, 255 - plain)  # the same geometry and jitter, ink and background swapped
    # Without inversion no extra number is drawn: a resnet fit's augmentation (and so its figures) is unchanged.
    torch.manual_seed(3)
    light_augment(image, invert_probability=0.0)
    assert torch.rand(()) == next_draw
    dark = PILImage.fromarray(rng.integers(0, 80, (32, 32, 3), dtype=np.uint8))
    torch.manual_seed(0)
    batch = transforms.augment_batch({"image": [dark] * 200, "label": [0] * 200}, invert_probability=0.5)
    inverted_share = np.mean([np.asarray(augmented).mean() > 127.5 for augmented in batch["image"]])
    assert 0.35 < inverted_share < 0.65, inverted_share


def test_light_augmentation_fills_what_it_uncovers_with_the_background_colour():
    # A digit on a coloured background: rotation and shift used to uncover black wedges no test image has.
    image = PILImage.new("RGB", (32, 32), (200, 60, 90))
    PILImage.Image.paste(image, (20, 220, 20), (12, 8, 20, 24))
    for seed in range(20):
        torch.manual_seed(seed)
        pixels = np.asarray(light_augment(image)).reshape(-1, 3).astype(int)
        # Brightness/contrast jitter scales every colour; none comes near black.
        assert pixels.sum(axis=1).min() > 150, seed
