"""One way in for every image-classification data set, and the nested subsets learning curves use.

`load_image_classification_dataset` accepts an embedded domain name, a local `save_to_disk`
folder, an `imagefolder` directory, or a Hub dataset id, and returns the uniform form the rest
of hf_ntl relies on: a `DatasetDict` with `train` and `test`, an `image` column (`Image`) and a
`label` column (`ClassLabel`), validated before any training starts. Labels given as class names
(strings) are encoded into class ids, and `label_encoding` says how.

A data set's splits belong to the data set, never to a training run: an embedded domain is generated
from its own `generation_seed` (0 unless asked otherwise), and a test split held out of a data set
that has none is drawn with `SPLIT_SEED`, so that every stage (fit-source, protect, evaluate, the
bench), whatever seed it trains with, sees the same train, validation and test samples. A run's seed
only orders and subsamples the train split.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from datasets import ClassLabel, Dataset, DatasetDict, Image, Value, load_dataset, load_from_disk

from ..errors import InputError, missing_local_path
from .domains import EMBEDDED_DOMAINS, load_embedded_domain

logger = logging.getLogger(__name__)

_LABEL_COLUMN_GUESSES = ("label", "labels", "fine_label", "class", "target")

# The `id` of a `label` ClassLabel whose names were class-encoded from a column of strings, before the column's
# name: the one piece of a feature that travels with the column through select, map, casts and save_to_disk.
_ENCODED_FROM_STRINGS = "hf_ntl:encoded-from-strings:"

# Fixed by the data set, not by any run: the held-out test split of a data set without one, and the
# validation split `validation_split` carves out of train. Changing either changes every data set.
SPLIT_SEED = 0


class DatasetFormatError(InputError):
    """A data set that cannot be used as an image-classification data set, and why."""


def load_image_classification_dataset(
    source: str,
    *,
    image_column: str | None = None,
    label_column: str | None = None,
    config_name: str | None = None,
    revision: str | None = None,
    train_split: str = "train",
    test_split: str = "test",
    test_size: float = 0.2,
    image_size: int = 32,
    generation_seed: int = 0,
    num_train: int | None = None,
    num_test: int | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> DatasetDict:
    """Load and validate an image-classification data set from any supported source.

    Args:
        source: an embedded domain (`font-digits`, `uci-digits`, `textured-digits`,
            `textured-shapes`), a folder written by `save_to_disk`, an `imagefolder` directory
            (one sub-folder per class), or a Hub dataset id such as `"uoft-cs/cifar10"`.
        image_column / label_column: the columns to use; detected when not given (the only
            `Image` column; the only `ClassLabel` column, else a column called `label`, ...). The label
            column holds class ids (a `ClassLabel` or integers from 0) or class names (strings): names are
            encoded as the sorted names of the train split (see `label_encoding`).
        config_name / revision: passed to `datasets.load_dataset` for Hub ids.
        train_split / test_split: split names. When the test split is missing, a stratified
            `test_size` fraction of the train split is held out with `SPLIT_SEED`: the same
            samples in every stage, whatever seed that stage trains with.
        image_size / generation_seed / num_train / num_test / cache_dir: for embedded domains only;
            they are part of the domain's identity (a different generation seed is a different
            data set), never a training run's seed.

    Returns:
        `DatasetDict(train=..., test=...)` with exactly the columns `image` and `label`.

    Raises:
        DatasetFormatError: the source cannot be loaded (a path with no such folder), a named column or
            split is missing, labels fall outside the class range, integer labels start above 0 (numbered
            1..K, class 0 would be empty), a split names a class train does not have, fewer than two
            classes, or an empty split.
    """
    if source in EMBEDDED_DOMAINS:
        raw = load_embedded_domain(
            source,
            image_size=image_size,
            seed=generation_seed,
            num_train=num_train,
            num_test=num_test,
            cache_dir=cache_dir,
        )
    else:
        if num_train is not None or num_test is not None:
            raise DatasetFormatError("num_train/num_test only apply to embedded domains; use subsets for real data.")
        raw = _load_external(source, config_name=config_name, revision=revision)
    return standardise_image_classification(
        raw,
        source=source,
        image_column=image_column,
        label_column=label_column,
        train_split=train_split,
        test_split=test_split,
        test_size=test_size,
    )


def _load_external(source: str, *, config_name: str | None, revision: str | None) -> DatasetDict:
    if message := missing_local_path(source):
        raise DatasetFormatError(message)
    path = Path(source).expanduser()
    if path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "state.json").exists()):
        loaded = load_from_disk(str(path))
        return loaded if isinstance(loaded, DatasetDict) else DatasetDict(train=loaded)
    try:
        # A Hub id and a local folder of data files or class sub-folders go through the same call:
        # `load_dataset` picks the builder (parquet, imagefolder, ...) from what it finds.
        loaded = load_dataset(str(path) if path.is_dir() else source, config_name, revision=revision)
    except Exception as err:  # datasets raises many types (FileNotFoundError, HfHubHTTPError, ...)
        if not path.exists():
            raise DatasetFormatError(
                f"{source} is not an embedded domain ({', '.join(sorted(EMBEDDED_DOMAINS))}) nor a local folder "
                f"(no such folder), and loading it from the Hub failed: {type(err).__name__}: {err}"
            ) from err
        raise DatasetFormatError(
            f"Could not load data set {source!r}: it is not a save_to_disk folder, and loading it with "
            f"datasets.load_dataset failed: {type(err).__name__}: {err}"
        ) from err
    if not isinstance(loaded, DatasetDict):
        raise DatasetFormatError(f"{source!r} loaded as {type(loaded).__name__}; expected splits (a DatasetDict).")
    return loaded


def standardise_image_classification(
    raw: DatasetDict,
    *,
    source: str = "dataset",
    image_column: str | None = None,
    label_column: str | None = None,
    train_split: str = "train",
    test_split: str = "test",
    test_size: float = 0.2,
) -> DatasetDict:
    """Select, rename and validate columns and splits (see `load_image_classification_dataset`)."""
    if train_split not in raw:
        raise DatasetFormatError(f"{source}: no split {train_split!r}; available splits: {sorted(raw)}.")
    train = raw[train_split]
    image_column = image_column or _detect_image_column(train, source)
    label_column = label_column or _detect_label_column(train, source)
    for column in (image_column, label_column):
        if column not in train.column_names:
            raise DatasetFormatError(
                f"{source}: no column {column!r}; available columns: {train.column_names}. "
                "Pass image_column=/label_column= with the right names."
            )
    if image_column == label_column:
        raise DatasetFormatError(f"{source}: image and label column are both {image_column!r}.")

    splits = {"train": _select_columns(train, image_column, label_column, f"{source}[train]")}
    if test_split in raw:
        splits["test"] = _select_columns(raw[test_split], image_column, label_column, f"{source}[test]")
    else:
        logger.warning(
            "%s has no %r split: holding out %.0f%% of train as test (the same samples in every stage).",
            source,
            test_split,
            100 * test_size,
        )

    # The train split defines the label space; every split is checked against it before casting.
    train_feature = splits["train"].features["label"]
    if _holds_strings(train_feature):
        # The sorted names Dataset.class_encode_column would give, cast rather than mapped: a map rewrites the
        # image column too, and one ClassLabel encodes every split alike. Its id says where the names came from.
        names = sorted(_names_in(splits["train"], f"{source}[train]"))
        class_label = ClassLabel(names=names, id=f"{_ENCODED_FROM_STRINGS}{label_column}")
    elif isinstance(train_feature, ClassLabel):
        class_label = train_feature
    else:
        class_label = _integer_class_label(splits["train"], label_column, f"{source}[train]")
    for name, split in splits.items():
        where = f"{source}[{name}]"
        feature = split.features["label"]
        if _holds_strings(feature) != _holds_strings(train_feature):
            raise DatasetFormatError(f"{where}: its labels are {feature} but train's are {train_feature}.")
        if isinstance(feature, ClassLabel) and feature.names != class_label.names:
            raise DatasetFormatError(f"{where}: its classes {feature.names} differ from train's {class_label.names}.")
        if _holds_strings(feature):
            _check_names(split, class_label, where)
        else:
            _check_labels(split, class_label, where)
        if not isinstance(feature, ClassLabel):
            splits[name] = split.cast_column("label", class_label)

    if "test" not in splits:
        held_out = splits["train"].train_test_split(test_size=test_size, stratify_by_column="label", seed=SPLIT_SEED)
        splits = {"train": held_out["train"], "test": held_out["test"]}
    present = np.unique(np.asarray(splits["train"]["label"]))
    if present.size < 2:
        raise DatasetFormatError(f"{source}: the train split holds {present.size} class(es); at least two are needed.")
    return DatasetDict(splits)


def _detect_image_column(dataset: Dataset, source: str) -> str:
    candidates = [name for name, feature in dataset.features.items() if isinstance(feature, Image)]
    if len(candidates) == 1:
        return candidates[0]
    if not candidates and "image" in dataset.column_names:
        return "image"
    raise DatasetFormatError(
        f"{source}: cannot tell which column holds the images (Image columns: {candidates}; all columns: "
        f"{dataset.column_names}). Pass image_column=."
    )


def _detect_label_column(dataset: Dataset, source: str) -> str:
    candidates = [name for name, feature in dataset.features.items() if isinstance(feature, ClassLabel)]
    if len(candidates) == 1:
        return candidates[0]
    guesses = [name for name in _LABEL_COLUMN_GUESSES if name in dataset.column_names]
    if not candidates and guesses:
        return guesses[0]
    raise DatasetFormatError(
        f"{source}: cannot tell which column holds the labels (ClassLabel columns: {candidates}; all columns: "
        f"{dataset.column_names}). Pass label_column=."
    )


def _select_columns(split: Dataset, image_column: str, label_column: str, where: str) -> Dataset:
    """Keep the image and label columns as `image`/`label`; decode path columns as images."""
    if len(split) == 0:
        raise DatasetFormatError(f"{where} is empty.")
    missing = [c for c in (image_column, label_column) if c not in split.column_names]
    if missing:
        raise DatasetFormatError(f"{where}: no column(s) {missing}; available columns: {split.column_names}.")
    split = split.select_columns([image_column, label_column])
    split = split.rename_columns({c: n for c, n in ((image_column, "image"), (label_column, "label")) if c != n})
    image_feature = split.features["image"]
    if isinstance(image_feature, Value) and image_feature.dtype in ("string", "large_string"):
        split = split.cast_column("image", Image())  # a column of file paths
    elif not isinstance(image_feature, Image):
        raise DatasetFormatError(f"{where}: column {image_column!r} is {image_feature}, not images.")
    label_feature = split.features["label"]
    is_integer = isinstance(label_feature, Value) and label_feature.dtype.startswith(("int", "uint"))
    if not (is_integer or isinstance(label_feature, ClassLabel) or _holds_strings(label_feature)):
        raise DatasetFormatError(
            f"{where}: column {label_column!r} is {label_feature}; expected integer class ids or class names."
        )
    return split


def _holds_strings(feature: object) -> bool:
    return isinstance(feature, Value) and feature.dtype in ("string", "large_string")


def _integer_class_label(train: Dataset, label_column: str, where: str) -> ClassLabel:
    """Classes `0..max` for plain integer labels, refusing labels that start above 0 (class 0 would be empty)."""
    labels = np.asarray(train["label"])
    low, high = int(labels.min()), int(labels.max())
    if low > 0:
        # Almost always labels numbered from 1: training would go on with an extra class that never occurs.
        raise DatasetFormatError(
            f"{where}: the integer labels in {label_column!r} run {low}..{high}, so class 0"
            f"{f'..{low - 1}' if low > 1 else ''} would be empty. Shift them to start at 0, e.g. "
            f"dataset.map(lambda x: {{{label_column!r}: x[{label_column!r}] - {low}}}), or cast the column to a "
            "datasets.ClassLabel with one name per class."
        )
    return ClassLabel(names=[str(i) for i in range(max(high, 0) + 1)])


def _check_labels(split: Dataset, class_label: ClassLabel, where: str) -> None:
    labels = np.asarray(split["label"])
    bad = labels[(labels < 0) | (labels >= class_label.num_classes)]
    if bad.size:
        raise DatasetFormatError(
            f"{where}: {bad.size} label(s) outside 0..{class_label.num_classes - 1} (e.g. {int(bad[0])}); "
            f"the label column declares {class_label.num_classes} classes."
        )


def _names_in(split: Dataset, where: str) -> set[str]:
    names = set(split.unique("label"))
    if None in names:
        raise DatasetFormatError(f"{where}: some samples have no label (None); drop them or label them.")
    return names


def _check_names(split: Dataset, class_label: ClassLabel, where: str) -> None:
    unknown = sorted(_names_in(split, where) - set(class_label.names))
    if unknown:
        raise DatasetFormatError(
            f"{where}: {len(unknown)} class name(s) never seen in train: {', '.join(map(repr, unknown[:10]))}"
            f"{', ...' if len(unknown) > 10 else ''}. The train split defines the classes ({class_label.num_classes}); "
            "drop these samples or add them to train."
        )


def class_names(dataset: Dataset | DatasetDict) -> list[str]:
    """The class names of a standardised data set (or of its train split)."""
    split = dataset["train"] if isinstance(dataset, DatasetDict) else dataset
    return list(split.features["label"].names)


def label_encoding(dataset: Dataset | DatasetDict) -> dict[str, Any] | None:
    """How class names in the data were turned into class ids, when they were; `None` for data labelled with ids.

    A label column of strings (`"cat"`, `"dog"`) is encoded by `standardise_image_classification` into the sorted
    names of its train split, which the `label` `ClassLabel` keeps as its names; this gives that mapping as the
    record says it: `{"column": <the original column>, "classes": {"0": "cat", "1": "dog"}}`. It is read from the
    `ClassLabel` itself, so it survives `select`, `map` and `save_to_disk`.
    """
    split = dataset["train"] if isinstance(dataset, DatasetDict) else dataset
    feature = split.features["label"]
    if not (feature.id or "").startswith(_ENCODED_FROM_STRINGS):
        return None
    return {
        "column": feature.id.removeprefix(_ENCODED_FROM_STRINGS),
        "classes": {str(i): name for i, name in enumerate(feature.names)},
    }


# --------------------------------------------------------------------------------------------
# Nested, stratified, seeded subsets (the sample counts of a learning curve)


def stratified_order(labels: Sequence[int] | np.ndarray, seed: int = 0) -> np.ndarray:
    """An ordering of all indices such that every prefix is a class-stratified sample.

    Within each class the samples are shuffled (seeded); the j-th sample of class c (of n_c) is
    due at (j + 1/2) / n_c, and indices are sorted by that due time, ties broken by a seeded class
    order. Every prefix of length n then holds round(n * n_c / N) samples of class c, within one,
    and the subset of n samples is contained in the subset of n' > n samples: learning-curve
    points are nested by construction.
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    class_rank = dict(zip(classes.tolist(), rng.permutation(len(classes)).tolist(), strict=True))
    indices, due, rank = [], [], []
    for c in classes:
        members = rng.permutation(np.flatnonzero(labels == c))
        indices.append(members)
        due.append((np.arange(len(members)) + 0.5) / len(members))
        rank.append(np.full(len(members), class_rank[int(c)]))
    indices, due, rank = np.concatenate(indices), np.concatenate(due), np.concatenate(rank)
    return indices[np.lexsort((rank, due))]


def stratified_subset(dataset: Dataset, num_samples: int, seed: int = 0) -> Dataset:
    """The first `num_samples` of `stratified_order` (nested across sizes for one seed)."""
    if not 1 <= num_samples <= len(dataset):
        raise InputError(f"Asked for {num_samples} samples from a split of {len(dataset)}; use 1..{len(dataset)}.")
    return dataset.select(stratified_order(dataset["label"], seed)[:num_samples])


# The target train samples an audit holds out to choose its worst case (`evaluate --validation_samples`), and that
# every protection leaves out of what it trains on by default: the first AUDIT_VALIDATION_SAMPLES of
# `validation_split`'s order, so that any audit with this many validation samples or fewer chooses on images
# the protection never saw.
AUDIT_VALIDATION_SAMPLES = 200
# The source's counterpart: `hf-ntl tune` measures the owner's accuracy on the first SOURCE_VALIDATION_SAMPLES of
# the source train split's `validation_split` order, and `fit-source --validation_samples` leaves them out of the
# fit, so that the floor is measured on images the model never saw (memorised images are what retraining loses
# first: a floor on them overstates what a protection costs the owner).
SOURCE_VALIDATION_SAMPLES = 1000


def validation_split(labels: Sequence[int] | np.ndarray, num_validation: int) -> tuple[np.ndarray, np.ndarray]:
    """(validation indices, remaining indices) of a train split, fixed by the data set.

    The validation samples are the first `num_validation` of a class-stratified order drawn with
    `SPLIT_SEED`, the same in every stage and for every run seed; learning-curve subsets are drawn
    from the remaining indices only, so that choosing on validation never sees a training sample. The
    validation samples of a smaller `num_validation` are among those of a larger one.
    """
    labels = np.asarray(labels)
    if not 0 < num_validation < len(labels):
        raise InputError(
            f"A validation split of {num_validation} samples cannot be carved from a train split of {len(labels)}; "
            f"use 1..{len(labels) - 1}."
        )
    order = stratified_order(labels, seed=SPLIT_SEED)
    return np.sort(order[:num_validation]), np.sort(order[num_validation:])
