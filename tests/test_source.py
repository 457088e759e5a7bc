import json
import logging
import shutil

import numpy as np
import pytest
import torch
from datasets import Dataset, DatasetDict
from PIL import Image as PILImage

from hf_ntl.artifacts import OutputDirError, read_samples, run_identity
from hf_ntl.cli import parse
from hf_ntl.data import ImagePreprocessor, load_image_classification_dataset
from hf_ntl.data.fingerprint import image_hashes
from hf_ntl.models import build_tiny_classifier, load_classifier
from hf_ntl.source import SourceConfig, fit_source_model, run_source


def config(tmp_path, **overrides):
    values = {
        "output_dir": str(tmp_path / "source"),
        "report_to": "none",
        "disable_tqdm": True,
        "num_train_samples": 4000,
        "num_train_epochs": 6,
    }
    return SourceConfig(**{**values, **overrides})


def test_tiny_resnet_learns_font_digits_and_saves_safely(tmp_path):
    record = run_source(config(tmp_path))
    assert record["test_accuracy"] > 0.90, record
    folder = tmp_path / "source" / "model"
    assert (folder / "model.safetensors").exists() and not list(folder.glob("*.bin"))
    saved = json.loads((folder / "hf_ntl.json").read_text())
    assert saved["stage"] == "source" and saved["test_accuracy"] == record["test_accuracy"]
    assert "label_encoding" not in saved  # font-digits is labelled with class ids
    # The record names the samples it was fitted on; the hashes beside it are those of the train split.
    assert (
        saved["samples"]["source fit"]["dataset"] == "font-digits" and saved["samples"]["source fit"]["samples"] == 4000
    )
    train = load_image_classification_dataset("font-digits", num_train=4000)["train"]
    assert read_samples(folder)["source fit"].hashes == image_hashes(train)

    # The saved model reproduces the reported accuracy from disk: same weights, same preprocessing.
    model = load_classifier(folder).eval()
    preprocessor = ImagePreprocessor.from_pretrained(folder)
    test = load_image_classification_dataset("font-digits", num_train=4000)["test"]
    with torch.no_grad():
        logits = model(pixel_values=preprocessor(test["image"])).logits
    accuracy = (logits.argmax(-1) == torch.tensor(test["label"])).float().mean().item()
    assert accuracy == pytest.approx(record["test_accuracy"], abs=1e-6)


def test_an_interrupted_run_resumes_from_its_last_checkpoint(tmp_path, caplog):
    small = {"num_train_samples": 320, "per_device_train_batch_size": 32, "num_train_epochs": 2}
    straight = run_source(config(tmp_path / "straight", save_total_limit=None, **small))
    # What a crash after the first epoch's checkpoint leaves: checkpoint-10, no checkpoint-20, no model.
    interrupted = tmp_path / "interrupted"
    shutil.copytree(tmp_path / "straight", interrupted)
    shutil.rmtree(interrupted / "source" / "checkpoint-20")
    shutil.rmtree(interrupted / "source" / "model")
    with caplog.at_level(logging.INFO, logger="hf_ntl.source"):
        resumed = run_source(config(interrupted, save_total_limit=None, **small))
    assert "Resuming source training from" in caplog.text and "checkpoint-10" in caplog.text
    state = json.loads((interrupted / "source" / "checkpoint-20" / "trainer_state.json").read_text())
    assert state["global_step"] == 20
    assert resumed["test_accuracy"] == pytest.approx(straight["test_accuracy"], abs=1e-3)
    weights = dict(load_classifier(tmp_path / "straight" / "source" / "model").named_parameters())
    for name, param in load_classifier(interrupted / "source" / "model").named_parameters():
        torch.testing.assert_close(param, weights[name], rtol=1e-4, atol=1e-5)

    # A finished folder, or one whose checkpoints come from other settings, is not resumed.
    with pytest.raises(OutputDirError, match="already holds a finished result"):
        run_source(config(interrupted, save_total_limit=None, **small))
    shutil.rmtree(interrupted / "source" / "model")
    with pytest.raises(OutputDirError, match=r"another run \(differing in learning_rate\)"):
        run_source(config(interrupted, save_total_limit=None, learning_rate=1e-2, **small))


def test_the_record_says_how_string_labels_were_encoded(tmp_path):
    rng = np.random.default_rng(0)

    def split(names):
        images = [PILImage.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)) for _ in names]
        return Dataset.from_dict({"image": images, "species": names})

    DatasetDict(train=split(["dog", "cat"] * 4), test=split(["cat", "dog"])).save_to_disk(str(tmp_path / "pets"))
    quick = {"max_steps": 1, "per_device_train_batch_size": 8, "eval_strategy": "no", "save_strategy": "no"}
    record = run_source(
        config(tmp_path, dataset_name=str(tmp_path / "pets"), label_column="species", num_train_samples=None, **quick)
    )
    encoding = {"column": "species", "classes": {"0": "cat", "1": "dog"}}
    assert record["label_encoding"] == encoding
    folder = tmp_path / "source" / "model"
    assert json.loads((folder / "hf_ntl.json").read_text())["label_encoding"] == encoding
    assert load_classifier(folder).config.id2label == {0: "cat", 1: "dog"}


def test_class_count_mismatch_is_caught_before_training(tmp_path):
    dataset = load_image_classification_dataset("textured-shapes", num_train=20, num_test=10)
    with pytest.raises(ValueError, match="3 outputs but the data set has 10 classes"):
        fit_source_model(build_tiny_classifier("tiny-resnet", 3), ImagePreprocessor(), dataset, config(tmp_path))


def test_each_preset_takes_its_own_recipe_unless_told_otherwise(tmp_path):
    convnext = config(tmp_path, model_name_or_path="tiny-convnext", num_train_epochs=None)
    assert (convnext.learning_rate, convnext.num_train_epochs) == (3e-3, 10.0)
    vit = config(tmp_path, model_name_or_path="tiny-vit", num_train_epochs=None, learning_rate=5e-4)
    assert (vit.learning_rate, vit.num_train_epochs) == (5e-4, 40.0)  # what the user gives wins
    assert (vit.weight_decay, vit.warmup_steps, vit.invert_probability) == (0.05, 0.1, 0.5)
    assert convnext.invert_probability == 0.0  # colour inversion is ViT's alone
    checkpoint = config(tmp_path, model_name_or_path=str(tmp_path / "folder"), num_train_epochs=None)
    tiny_resnets = (3e-3, 5.0, 0.0)
    assert (checkpoint.learning_rate, checkpoint.num_train_epochs, checkpoint.invert_probability) == tiny_resnets
    (parsed,) = parse([SourceConfig], ["--model_name_or_path", "tiny-convnext", "--output_dir", str(tmp_path)], "x")
    assert parsed.num_train_epochs == 10.0  # on the command line too


def test_the_configs_colour_inversion_reaches_the_train_images(tmp_path):
    dataset = load_image_classification_dataset("font-digits", num_train=20, num_test=10)
    first_images = {}
    for probability in (0.0, 1.0):
        fit = config(tmp_path / str(probability), invert_probability=probability, max_steps=1, save_strategy="no")
        trainer, _ = fit_source_model(build_tiny_classifier("tiny-resnet", 10), ImagePreprocessor(), dataset, fit)
        torch.manual_seed(0)
        first_images[probability] = np.asarray(trainer.train_dataset[0]["image"]).astype(int)
    np.testing.assert_array_equal(first_images[1.0], 255 - first_images[0.0])


def test_a_run_recorded_before_colour_inversion_existed_is_still_the_same_run(tmp_path):
    # Without inversion the identity is what it was before the setting existed: older demo/bench runs are reused.
    assert "invert_probability" not in run_identity("source", config(tmp_path))
    vit = run_identity("source", config(tmp_path, model_name_or_path="tiny-vit", num_train_epochs=None))
    assert vit["invert_probability"] == 0.5 and vit["num_train_epochs"] == 40.0
    # Likewise a fit on the whole train split, and a fit that leaves validation images out is another run.
    assert "validation_samples" not in run_identity("source", config(tmp_path))
    assert run_identity("source", config(tmp_path, validation_samples=1000))["validation_samples"] == 1000


def test_config_validation(tmp_path):
    with pytest.raises(ValueError, match="remove_unused_columns"):
        config(tmp_path, remove_unused_columns=True)
    with pytest.raises(ValueError, match="at least 8"):
        config(tmp_path, image_size=4)
    for probability in (1.5, -0.1):
        with pytest.raises(ValueError, match="invert_probability must be in"):
            config(tmp_path, invert_probability=probability)


def test_a_checkpoint_is_fitted_on_the_images_later_stages_render_for_it(tmp_path):
    # A folder checkpoint whose processor resizes to 46 and centre-crops 40: the source fit must render
    # the domain at 40 px, as protect and evaluate do from the saved processor, not at the tiny default.
    checkpoint = tmp_path / "checkpoint"
    build_tiny_classifier("tiny-resnet", 10).save_pretrained(checkpoint)
    crop = {"size": {"shortest_edge": 46}, "do_center_crop": True, "crop_size": {"height": 40, "width": 40}}
    (checkpoint / "preprocessor_config.json").write_text(
        json.dumps({"image_processor_type": "BitImageProcessor", **crop})
    )
    run_source(config(tmp_path, model_name_or_path=str(checkpoint), num_train_samples=64, num_train_epochs=1))

    saved = tmp_path / "source" / "model"
    preprocessor = ImagePreprocessor.from_pretrained(saved)  # what protect and evaluate read
    assert (
        preprocessor.image_size == 40
        and preprocessor.to_dict() == ImagePreprocessor.from_pretrained(checkpoint).to_dict()
    )
    later = load_image_classification_dataset("font-digits", image_size=preprocessor.image_size, num_train=64)["train"]
    fitted = read_samples(saved)["source fit"]
    assert fitted.image_size == 40 and fitted.hashes == image_hashes(later)


def test_the_convnext_preset_learns_font_digits(tmp_path):
    # Built with Hub-default initialisation it sat at chance (loss ln 10) for the whole default fit; a short fit
    # must now get well above chance.
    dataset = load_image_classification_dataset("font-digits", num_train=4000)
    fit = config(tmp_path, num_train_epochs=5, save_strategy="no", eval_strategy="no")
    _, metrics = fit_source_model(build_tiny_classifier("tiny-convnext", 10), ImagePreprocessor(), dataset, fit)
    assert metrics["test_accuracy"] > 0.5, metrics


def test_the_vit_preset_learns_font_digits(tmp_path):
    # Built with Hub-default initialisation it sat at chance too. With its recipe it stays near chance for some hundred
    # steps, longer with augmentation (13.8% after 1,250 augmented steps of 8 images; 11.0% after the 40-epoch fit's
    # first epoch), so this short fit is unaugmented: 6 epochs of 4,000 images, 750 steps, measured at 40.1%.
    dataset = load_image_classification_dataset("font-digits", num_train=4000)
    fit = config(tmp_path, model_name_or_path="tiny-vit", num_train_epochs=6, save_strategy="no", eval_strategy="no")
    model = build_tiny_classifier("tiny-vit", 10)
    _, metrics = fit_source_model(model, ImagePreprocessor(), dataset, fit, augment=False)
    assert metrics["test_accuracy"] > 0.3, metrics
