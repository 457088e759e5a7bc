import numpy as np
import pytest
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, Value
from PIL import Image as PILImage

from hf_ntl.data import (
    DatasetFormatError,
    class_names,
    load_image_classification_dataset,
    stratified_order,
    stratified_subset,
)
from hf_ntl.data.loading import standardise_image_classification


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
    with pytest.raises(DatasetFormatError, match="not an embedded domain .*font-digits.*load_dataset failed"):
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
