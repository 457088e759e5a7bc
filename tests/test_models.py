import logging

import pytest
import torch
from diffusers import UNet2DModel
from transformers import ResNetConfig, ResNetModel

from hf_ntl.models import (
    TINY_PRESETS,
    ModelLoadError,
    build_tiny_classifier,
    classification_head,
    classification_head_name,
    forward_with_features,
    head_linear,
    load_classifier,
    load_ddpm,
    reinitialise_head,
)

PIXELS = torch.randn(4, 3, 32, 32)


@pytest.mark.parametrize("preset", sorted(TINY_PRESETS))
def test_features_are_what_the_head_sees(preset):
    model = build_tiny_classifier(preset, num_labels=7).eval()
    logits, features = forward_with_features(model, PIXELS)
    assert logits.shape == (4, 7)
    assert features.ndim == 2 and features.shape[1] == head_linear(model).in_features
    torch.testing.assert_close(classification_head(model)(features), logits)
    assert classification_head_name(model) == "classifier"
    assert features.requires_grad  # usable inside a loss (NTP's Fisher regulariser)


def test_vit_preset_uses_eager_attention():
    assert build_tiny_classifier("tiny-vit", 3).config._attn_implementation == "eager"


@pytest.mark.parametrize("preset", sorted(TINY_PRESETS))
def test_save_and_reload_gives_identical_logits(preset, tmp_path):
    model = build_tiny_classifier(preset, num_labels=5, class_names=list("abcde"), seed=1).eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists() and not list(tmp_path.glob("*.bin"))
    # The attention kernel is a loading choice, not part of the checkpoint: ask for the same one.
    reloaded = load_classifier(tmp_path, attn_implementation=model.config._attn_implementation).eval()
    torch.testing.assert_close(reloaded(pixel_values=PIXELS).logits, model(pixel_values=PIXELS).logits, rtol=0, atol=0)
    assert reloaded.config.id2label[4] == "e"


def test_different_class_count_replaces_only_the_head(tmp_path, capfd, caplog):
    model = build_tiny_classifier("tiny-resnet", num_labels=10)
    model.save_pretrained(tmp_path)
    with caplog.at_level(logging.WARNING, logger="hf_ntl.models"):
        reloaded = load_classifier(tmp_path, class_names=["x", "y", "z"])
    # Said in one line, not with transformers' table of "mismatched" head weights.
    assert caplog.messages == [f"{tmp_path}: a new 3-way head, freshly initialised."]
    assert "LOAD REPORT" not in capfd.readouterr().err
    assert head_linear(reloaded).out_features == 3 and reloaded.config.num_labels == 3
    original = dict(model.named_parameters())
    for name, param in reloaded.named_parameters():
        if not name.startswith("classifier."):
            torch.testing.assert_close(param, original[name], rtol=0, atol=0)


def test_same_seed_same_init_and_global_rng_untouched():
    state = torch.random.get_rng_state()
    a, b = build_tiny_classifier("tiny-resnet", 4, seed=3), build_tiny_classifier("tiny-resnet", 4, seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)
    for (_, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(pa, pb)


def test_reinitialise_head_changes_only_the_head():
    model = build_tiny_classifier("tiny-convnext", 4)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    reinitialise_head(model, seed=5)
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name]) != name.startswith("classifier."), name


def test_base_model_without_head_is_refused_unless_a_head_is_asked_for(tmp_path):
    ResNetModel(ResNetConfig(embedding_size=8, hidden_sizes=[8, 8], depths=[1, 1])).save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="no trained classification head.*num_labels"):
        load_classifier(tmp_path)
    assert head_linear(load_classifier(tmp_path, num_labels=3)).out_features == 3
    with pytest.raises(ModelLoadError, match="no classification head"):
        classification_head(ResNetModel(ResNetConfig(embedding_size=8, hidden_sizes=[8], depths=[1])))


def test_unreadable_checkpoints_are_explained(tmp_path):
    corrupt = tmp_path / "corrupt"
    build_tiny_classifier("tiny-resnet", 3).save_pretrained(corrupt)
    (corrupt / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ModelLoadError, match="Could not read a classifier"):
        load_classifier(corrupt)

    pickled = tmp_path / "pickled"
    model = build_tiny_classifier("tiny-resnet", 3)
    model.config.save_pretrained(pickled)
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="does not unpickle"):
        load_classifier(pickled)

    unet = tmp_path / "unet"
    UNet2DModel(
        sample_size=8,
        block_out_channels=(8, 8),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        layers_per_block=1,
    ).save_pretrained(unet)
    with pytest.raises(ModelLoadError, match="not an image classifier"):
        load_classifier(unet)


def test_bad_label_spaces():
    with pytest.raises(ModelLoadError, match="at least two classes"):
        build_tiny_classifier("tiny-resnet", 1)
    with pytest.raises(ModelLoadError, match="2 class names given for num_labels=3"):
        load_classifier("tiny-resnet", num_labels=3, class_names=["a", "b"])
    with pytest.raises(ModelLoadError, match="Unknown tiny preset"):
        build_tiny_classifier("tiny-swin", 3)


@pytest.mark.parametrize("load", [load_classifier, load_ddpm])
def test_missing_local_paths_and_unknown_hub_ids_are_told_apart(load, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for path in (str(tmp_path / "no" / "such"), "./model", "~/no-such-model", "runs/a/model", "model/"):
        with pytest.raises(ModelLoadError, match=f"^no such folder: {path}") as caught:
            load(path)
        assert "Repo id" not in str(caught.value)
    with pytest.raises(ModelLoadError, match=r"\(looked for .*runs/a/model\)"):
        load("runs/a/model")
    # `owner/name` could be either: the Hub is tried too (offline here), and both failures are said.
    with pytest.raises(ModelLoadError, match="^someone/model is not a local folder .* loading it from the Hub failed"):
        load("someone/model")


def test_a_home_relative_path_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    build_tiny_classifier("tiny-resnet", 3, class_names=["a", "b", "c"]).save_pretrained(tmp_path / "mine")
    assert load_classifier("~/mine").config.id2label[2] == "c"
