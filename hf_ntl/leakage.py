"""The leakage guard: no audit scores a model on test images it, or its original, was trained on.

Every training stage records the samples it used (`hf_ntl_samples.json`, see
`hf_ntl.data.fingerprint`); a protected model's record names the model it started from, so the
whole chain (source fit, protection, guard set) is followed back. `check_test_overlap` counts the
test images (and, called again, the validation images the worst case is chosen on) found in each
recorded sample set, before any fine-tuning starts, and refuses to go on when there are any, unless
the user says the overlap is deliberate.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict

from .artifacts import read_record, read_samples
from .data.fingerprint import SampleSet, image_hashes
from .data.loading import AUDIT_VALIDATION_SAMPLES
from .errors import InputError
from .models import TINY_PRESETS, TINY_UNET_PRESET


class TestOverlapError(InputError):
    """The test (or validation) split holds samples a model under audit was trained on."""

    __test__ = False  # not a pytest test class, whatever its name says


def training_samples(model_path: str | Path) -> tuple[dict[str, SampleSet], list[str]]:
    """Every sample set the records of `model_path` and of the models it came from name.

    The chain is followed through each record's `source_model` (what a protection started from),
    else its `base_model` (what a fit started from). A tiny preset starts from random weights; any
    other link whose training data no record names (a Hub checkpoint's pretraining, a folder
    without records, a path that no longer exists) is listed as unrecorded: it was not checked.

    Returns:
        ({"<role> [<folder>]": SampleSet}, [folders or ids along the chain that record no samples]).
    """
    found: dict[str, SampleSet] = {}
    unrecorded: list[str] = []
    current: str | None = str(model_path)
    seen: set[str] = set()
    while current and current not in seen and current not in (*TINY_PRESETS, TINY_UNET_PRESET):
        seen.add(current)
        folder = Path(current)
        samples = read_samples(folder) if folder.is_dir() else None
        record = read_record(folder) if folder.is_dir() else {}
        if samples is None:
            unrecorded.append(current)
        else:
            for role, sample_set in samples.items():
                found[f"{role} [{folder}]"] = sample_set
        current = record.get("source_model") or record.get("base_model")
    return found, unrecorded


def split_hashes_by_size(
    split: Dataset, image_size: int, load_split_at: Callable[[int], Dataset]
) -> Callable[[int | None], set[str]]:
    """`size -> hashes of the split (test or validation) rendered at size`, for `check_test_overlap`.

    `split` is as the audit loaded it (at `image_size`). An embedded domain's pixels depend on the
    size it was rendered at, so a sample set recorded at another size is compared with the split
    rendered at that size (`load_split_at(size)`); stored images (size `None`) are compared as they
    are.
    """
    cache: dict[int, set[str]] = {}

    def hashes(size: int | None) -> set[str]:
        key = image_size if size is None else size
        if key not in cache:
            cache[key] = set(image_hashes(split if key == image_size else load_split_at(key)))
        return cache[key]

    return hashes


def check_test_overlap(
    models: dict[str, str],
    split_hashes: Callable[[int | None], set[str]],
    allow_overlap: bool = False,
    split: str = "test",
) -> dict[str, Any]:
    """Count, per model and recorded sample set, the images of `split` it holds; refuse any unless allowed.

    Args:
        models: label ("model", "original") -> path of each model under audit.
        split_hashes: `image_size -> hashes of the split rendered at that size` (the size matters for
            embedded domains only; it is `None` for stored images).
        allow_overlap: go on, and say so in the report, when images of the split were trained on.
        split: `"test"` (what figures are reported on) or `"validation"` (what the worst case is
            chosen on: a protection trained on it would steer the choice away from the attacks it
            resists least).

    Returns:
        The report's `test_overlap` (or `validation_overlap`) entry: `{"counts": {label: {sample set:
        count}}, "unrecorded": {label: [...]}, "allowed": allow_overlap, "total": n}`.

    Raises:
        TestOverlapError: some images of the split were trained on and `allow_overlap` is false.
    """
    counts: dict[str, dict[str, int]] = {}
    unrecorded: dict[str, list[str]] = {}
    for label, path in models.items():
        sets, missing = training_samples(path)
        counts[label] = {name: len(split_hashes(s.image_size) & set(s.hashes)) for name, s in sets.items()}
        unrecorded[label] = missing
    total = sum(n for per_model in counts.values() for n in per_model.values())
    if total and not allow_overlap:
        found = "; ".join(f"{label}: {name} holds {n}" for label, c in counts.items() for name, n in c.items() if n)
        if split == "validation":
            consequence = (
                "The audit would choose its worst case on images a protection was trained on: protect with "
                "audit_validation_samples at least evaluate's --validation_samples (the protections' default is "
                f"{AUDIT_VALIDATION_SAMPLES}), or lower --validation_samples"
            )
        else:
            consequence = (
                "The audit would score a model on images it has seen: evaluate on a test split disjoint from every "
                "stage's training data"
            )
        raise TestOverlapError(
            f"{total} {split} image(s) of the target were trained on ({found}). {consequence}; or pass "
            "--allow_test_overlap for a deliberate experiment (the report and card then say so)."
        )
    return {"counts": counts, "unrecorded": unrecorded, "allowed": allow_overlap, "total": total}


def check_audit_overlap(
    models: dict[str, str],
    target: DatasetDict,
    image_size: int,
    load_target_at: Callable[[int], DatasetDict],
    validation_indices: Sequence[int],
    allow_overlap: bool = False,
) -> dict[str, dict[str, Any]]:
    """The leakage guard of an audit: its test split, then its validation split (`validation_indices` of the
    target's train split), each checked with `check_test_overlap` against every sample set the models' records name.

    Args:
        target: the target data set as the audit loaded it, at `image_size`.
        load_target_at: `size -> the target data set rendered at size` (for sample sets recorded at other sizes).

    Returns:
        `{"test": the report's test_overlap, "validation": its validation_overlap}`.
    """
    selections: dict[str, Callable[[DatasetDict], Dataset]] = {
        "test": lambda splits: splits["test"],
        "validation": lambda splits: splits["train"].select(validation_indices),
    }
    load_target_at = functools.cache(load_target_at)  # both splits come from one rendering per size
    found = {}
    for split, select in selections.items():
        hashes = split_hashes_by_size(
            select(target), image_size, lambda size, select=select: select(load_target_at(size))
        )
        found[split] = check_test_overlap(models, hashes, allow_overlap, split=split)
    return found
