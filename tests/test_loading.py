import numpy as np
import pytest
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, Value, load_from_disk
from PIL import Image as PILImage

from hf_ntl.data import (
    DatasetFormatError,
    class_names,
    load_image_classification_dataset,
    stratified_order,
    stratified_subset,
)
from hf_ntl.data.domains import EMBEDDED_DOMAINS
from hf_ntl.data.fingerprint import image_hashes
from hf_ntl.data.loading import SPLIT_SEED, label_encoding, standardise_image_classification, validation_split


def tiny_images(count, size=8):
    rng = np.random.default_rng(0)
    return [PILImage.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(count)]


def custom_dataset(labels_train=(0, 1, 2, 0, 1, 2), labels_test=(0, 1, 2), label_feature=None):
    """A data set as a user might have it: other column names, an extra column."""
    features = Features(
        {"img": Image(), "fine": label_feature or ClassLabel(names=["a", "b", "c"]), "id": Value("int64")}
    )

    def split(labels):
        data = {"img": tiny_images(len(labels)), "fine": list(labels), "id": list(range(len(labels)))}
        return Dataset.from_dict(data, features=features)

    return DatasetDict(train=split(labels_train), test=split(labels_test))


def assert_standard(dataset, names):
    assert set(dataset) == {"train", "test"}
    for split in dataset.values():
        assert split.column_names == ["image", "label"]
    assert class_names(dataset) == names


def test_embedded_domain():
    dataset = load_image_classification_dataset("textured-shapes", num_train=20, num_test=10)
    assert_standard(dataset, class_names(dataset))
    assert len(class_names(dataset)) == 10


def test_save_to_disk_folder_with_detected_and_named_columns(tmp_path):
    custom_dataset().save_to_disk(str(tmp_path / "saved"))
    detected = load_image_classification_dataset(str(tmp_path / "saved"))
    named = load_image_classification_dataset(str(tmp_path / "saved"), image_column="img", label_column="fine")
    for dataset in (detected, named):
        assert_standard(dataset, ["a", "b", "c"])
        assert dataset["train"]["label"] == [0, 1, 2, 0, 1, 2]


def test_hub_id_path_through_a_local_repository_folder(tmp_path):
    # A Hub dataset repository is parquet files under data/; load_dataset(path) is the very call
    # a Hub id goes through, so this exercises the Hub branch offline.
    repo = tmp_path / "user__digits"
    (repo / "data").mkdir(parents=True)
    for name, split in custom_dataset().items():
        split.to_parquet(str(repo / "data" / f"{name}-00000-of-00001.parquet"))
    dataset = load_image_classification_dataset(str(repo))
    assert_standard(dataset, ["a", "b", "c"])
    assert len(dataset["train"]) == 6 and len(dataset["test"]) == 3


def test_imagefolder(tmp_path):
    for split, per_class in (("train", 4), ("test", 2)):
        for name in ("cat", "dog"):
            folder = tmp_path / "pets" / split / name
            folder.mkdir(parents=True)
            for i, image in enumerate(tiny_images(per_class)):
                image.save(folder / f"{i}.png")
    dataset = load_image_classification_dataset(str(tmp_path / "pets"))
    assert_standard(dataset, ["cat", "dog"])
    assert sorted(dataset["train"]["label"]) == [0, 0, 0, 0, 1, 1, 1, 1]


def _pixels(split):
    return np.stack([np.asarray(image.convert("RGB")) for image in split["image"]])


@pytest.mark.parametrize("domain", sorted(EMBEDDED_DOMAINS))
def test_an_embedded_domain_has_one_split_whatever_seed_a_run_uses(domain, tmp_path):
    # Sizes small enough to generate quickly; uci-digits is a real data set of fixed size.
    sizes = {} if domain == "uci-digits" else {"num_train": 40, "num_test": 20}
    splits = []
    for run_seed in (0, 42):  # what fit-source / protect / evaluate seed their runs with
        np.random.seed(run_seed)
        torch.manual_seed(run_seed)
        # Generated afresh each time (no shared cache): the split is a function of the data set alone.
        cache = tmp_path / f"cache-{run_seed}"
        splits.append(load_image_classification_dataset(domain, image_size=16, cache_dir=cache, **sizes))
    for name in ("train", "test"):
        np.testing.assert_array_equal(_pixels(splits[0][name]), _pixels(splits[1][name]))
    # Train and test share no image.
    assert not set(image_hashes(splits[0]["train"])) & set(image_hashes(splits[0]["test"]))
    # The generation seed is part of the data set's identity: another one is another data set.
    other = load_image_classification_dataset(domain, image_size=16, generation_seed=1, cache_dir=tmp_path, **sizes)
    assert not np.array_equal(_pixels(other["test"]), _pixels(splits[0]["test"]))


def test_validation_split_is_fixed_stratified_and_disjoint_from_the_pool():
    labels = np.repeat(np.arange(4), 25)
    validation, pool = validation_split(labels, 20)
    assert len(validation) == 20 and len(pool) == 80 and not set(validation) & set(pool)
    assert sorted(np.bincount(labels[validation])) == [5, 5, 5, 5]
    again, _ = validation_split(labels, 20)
    np.testing.assert_array_equal(validation, again)
    np.testing.assert_array_equal(np.sort(validation), np.sort(stratified_order(labels, seed=SPLIT_SEED)[:20]))
    with pytest.raises(ValueError, match="cannot be carved from a train split of 100"):
        validation_split(labels, 100)


def test_missing_test_split_is_held_out_the_same_in_every_stage(tmp_path):
    train_only = DatasetDict(train=custom_dataset(labels_train=(0, 1, 2) * 10)["train"])
    train_only.save_to_disk(str(tmp_path / "train_only"))
    held_out = []
    for run_seed in (0, 42):
        np.random.seed(run_seed)
        held_out.append(load_image_classification_dataset(str(tmp_path / "train_only"))["test"])
    assert image_hashes(held_out[0]) == image_hashes(held_out[1])
    assert held_out[0]["label"] == held_out[1]["label"]


def test_missing_test_split_is_held_out_stratified(tmp_path):
    train_only = DatasetDict(train=custom_dataset(labels_train=(0, 1, 2) * 10)["train"])
    train_only.save_to_disk(str(tmp_path / "train_only"))
    dataset = load_image_classification_dataset(str(tmp_path / "train_only"), test_size=0.2)
    assert len(dataset["test"]) == 6
    assert sorted(dataset["test"]["label"]) == [0, 0, 1, 1, 2, 2]


def test_integer_labels_become_a_class_label(tmp_path):
    custom_dataset(label_feature=Value("int64")).save_to_disk(str(tmp_path / "ints"))
    dataset = load_image_classification_dataset(str(tmp_path / "ints"), label_column="fine")
    assert_standard(dataset, ["0", "1", "2"])


def string_labelled(train, test):
    """A data set labelled with class names, in a column the loader cannot guess."""

    def split(names):
        return Dataset.from_dict({"picture": tiny_images(len(names)), "species": list(names)})

    return DatasetDict(train=split(train), test=split(test))


def test_string_labels_are_class_encoded_alike_in_every_split(tmp_path):
    # The test split lacks "bird": encoded on its own it would number cat 0 and dog 1.
    string_labelled(["dog", "cat", "bird", "cat", "dog", "bird"], ["cat", "dog"]).save_to_disk(str(tmp_path / "s"))
    dataset = load_image_classification_dataset(str(tmp_path / "s"), label_column="species")
    assert_standard(dataset, ["bird", "cat", "dog"])
    assert dataset["train"]["label"] == [2, 1, 0, 1, 2, 0]
    assert dataset["test"]["label"] == [1, 2]
    encoding = {"column": "species", "classes": {"0": "bird", "1": "cat", "2": "dog"}}
    assert label_encoding(dataset) == encoding
    # It travels with the label column: a split, a subset, a save_to_disk round trip.
    dataset.save_to_disk(str(tmp_path / "standard"))
    assert label_encoding(load_from_disk(str(tmp_path / "standard"))["test"].select([0])) == encoding
    # Labels that were class ids already have no encoding to report.
    assert label_encoding(standardise_image_classification(custom_dataset())) is None


def test_a_class_name_train_never_has_is_refused(tmp_path):
    string_labelled(["cat", "dog", "cat", "dog"], ["cat", "zebra"]).save_to_disk(str(tmp_path / "s"))
    with pytest.raises(DatasetFormatError, match=r"\[test\]: 1 class name\(s\) never seen in train: 'zebra'"):
        load_image_classification_dataset(str(tmp_path / "s"), label_column="species")


def test_integer_labels_numbered_from_one_are_refused_with_the_fix(tmp_path):
    custom_dataset(labels_train=(1, 2, 3, 1, 2, 3), labels_test=(1, 2, 3), label_feature=Value("int64")).save_to_disk(
        str(tmp_path / "from_one")
    )
    with pytest.raises(DatasetFormatError, match=r"run 1\.\.3, so class 0 would be empty.*x\['fine'\] - 1"):
        load_image_classification_dataset(str(tmp_path / "from_one"), label_column="fine")


def test_missing_local_paths_and_unknown_hub_ids_are_told_apart(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for path in (str(tmp_path / "no" / "such"), "./data", "runs/a/data", "data/"):
        with pytest.raises(DatasetFormatError, match=f"^no such folder: {path}") as caught:
            load_image_classification_dataset(path)
        assert "Repo id" not in str(caught.value)
    with pytest.raises(DatasetFormatError, match=r"\(looked for .*runs/a/data\)"):
        load_image_classification_dataset("runs/a/data")
    with pytest.raises(DatasetFormatError, match=r"^someone/data is not an embedded domain .* nor a local folder"):
        load_image_classification_dataset("someone/data")


def test_wrong_column_name(tmp_path):
    custom_dataset().save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(DatasetFormatError, match=r"no column 'pixels'.*\['img', 'fine', 'id'\]"):
        load_image_classification_dataset(str(tmp_path / "saved"), image_column="pixels")


def test_labels_out_of_range(tmp_path):
    # Test labels the train split never declared (integer labels).
    custom_dataset(labels_test=(0, 1, 7), label_feature=Value("int64")).save_to_disk(str(tmp_path / "a"))
    with pytest.raises(DatasetFormatError, match=r"outside 0\.\.2 \(e\.g\. 7\)"):
        load_image_classification_dataset(str(tmp_path / "a"), label_column="fine")
    # Unlabelled rows stored as -1, as on some Hub test splits.
    custom_dataset(labels_test=(0, -1, 2)).save_to_disk(str(tmp_path / "b"))
    with pytest.raises(DatasetFormatError, match="outside 0..2"):
        load_image_classification_dataset(str(tmp_path / "b"))


def test_empty_split_and_single_class(tmp_path):
    # (datasets itself cannot reload an empty split it saved, so this one stays in memory.)
    empty_test = custom_dataset()
    empty_test["test"] = empty_test["test"].select([])
    with pytest.raises(DatasetFormatError, match=r"\[test\] is empty"):
        standardise_image_classification(empty_test)
    custom_dataset(labels_train=(1, 1, 1)).save_to_disk(str(tmp_path / "one"))
    with pytest.raises(DatasetFormatError, match="at least two"):
        load_image_classification_dataset(str(tmp_path / "one"))


def test_unknown_name_is_explained():
    with pytest.raises(
        DatasetFormatError, match=r"not an embedded domain .*font-digits.* nor a local folder \(no such folder\), and "
    ):
        load_image_classification_dataset("no-such-domain")


def test_stratified_subsets_are_nested_stratified_and_seeded():
    labels = np.repeat(np.arange(10), 100)
    order = stratified_order(labels, seed=0)
    assert sorted(order.tolist()) == list(range(1000))  # a permutation
    for n in (10, 50, 200):
        assert np.bincount(labels[order[:n]], minlength=10).tolist() == [n // 10] * 10
    assert set(order[:10]) <= set(order[:50]) <= set(order[:200])
    assert not np.array_equal(order[:50], stratified_order(labels, seed=1)[:50])
    np.testing.assert_array_equal(order, stratified_order(labels, seed=0))


def test_stratified_subsets_follow_class_proportions():
    labels = np.array([0] * 600 + [1] * 300 + [2] * 100)
    order = stratified_order(labels, seed=0)
    for n in (7, 20, 55, 333):
        expected = n * np.array([0.6, 0.3, 0.1])
        assert np.all(np.abs(np.bincount(labels[order[:n]], minlength=3) - expected) <= 1)


def test_stratified_subset_bounds():
    dataset = standardise_image_classification(custom_dataset())["train"]
    assert sorted(stratified_subset(dataset, 3, seed=0)["label"]) == [0, 1, 2]
    with pytest.raises(ValueError, match="1..6"):
        stratified_subset(dataset, 7)
