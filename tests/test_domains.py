import numpy as np
import pytest
from datasets import ClassLabel, Image
from sklearn.datasets import load_digits

from hf_ntl.data import EMBEDDED_DOMAINS, load_embedded_domain
from hf_ntl.data.domains import default_cache_dir

SMALL = {"num_train": 40, "num_test": 20}


def pixels(split):
    return np.stack([np.asarray(example["image"]) for example in split])


@pytest.mark.parametrize("name", ["font-digits", "textured-digits", "textured-shapes"])
def test_same_seed_same_pixels_other_seed_other_pixels(name, tmp_path):
    first = load_embedded_domain(name, seed=3, cache_dir=tmp_path / "a", **SMALL)
    again = load_embedded_domain(name, seed=3, cache_dir=tmp_path / "b", **SMALL)
    other = load_embedded_domain(name, seed=4, cache_dir=tmp_path / "c", **SMALL)
    for split in ("train", "test"):
        np.testing.assert_array_equal(pixels(first[split]), pixels(again[split]))
        assert first[split]["label"] == again[split]["label"]
    assert not np.array_equal(pixels(first["train"]), pixels(other["train"]))


@pytest.mark.parametrize("name", sorted(EMBEDDED_DOMAINS))
def test_schema_size_and_balance(name, tmp_path):
    counts = {} if name == "uci-digits" else SMALL
    dataset = load_embedded_domain(name, image_size=24, cache_dir=tmp_path, **counts)
    assert set(dataset) == {"train", "test"}
    for split in dataset.values():
        assert isinstance(split.features["image"], Image)
        assert isinstance(split.features["label"], ClassLabel)
        assert split.features["label"].names == EMBEDDED_DOMAINS[name].class_names
        image = split[0]["image"]
        assert image.mode == "RGB" and image.size == (24, 24)
        per_class = np.bincount(split["label"], minlength=10)
        if counts:  # generated domains are exactly balanced
            assert per_class.tolist() == [len(split) // 10] * 10
    if name == "uci-digits":  # the real scans: a stratified 75/25 split of scikit-learn's 1,797
        assert (len(dataset["train"]), len(dataset["test"])) == (1347, 450)
        totals = np.bincount(load_digits().target)
        assert np.all(np.abs(np.bincount(dataset["train"]["label"]) - 0.75 * totals) <= 1)


def test_cached_on_first_use(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_NTL_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path / "domains"
    first = load_embedded_domain("textured-shapes", **SMALL)
    entries = [p for p in (tmp_path / "domains").iterdir() if not p.name.startswith(".")]
    assert len(entries) == 1 and (entries[0] / "dataset_dict.json").exists()
    # A second load reads the cache: it comes back from the cache's Arrow files.
    second = load_embedded_domain("textured-shapes", **SMALL)
    assert str(entries[0]) in second["train"].cache_files[0]["filename"]
    np.testing.assert_array_equal(pixels(first["test"]), pixels(second["test"]))


def test_bad_requests_are_explained(tmp_path):
    with pytest.raises(ValueError, match="Unknown embedded domain 'svhn'.*font-digits"):
        load_embedded_domain("svhn", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="fixed size"):
        load_embedded_domain("uci-digits", num_train=100, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="at least 8"):
        load_embedded_domain("font-digits", image_size=4, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="at least 10"):
        load_embedded_domain("font-digits", num_train=5, num_test=20, cache_dir=tmp_path)
