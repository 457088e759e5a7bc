"""The leakage guard: no audit scores a model on test images it, or its original, was trained on.

Every training stage records the samples it used (`hf_ntl_samples.json`, see
`hf_ntl.data.fingerprint`); a protected model's record names the model it started from, so the
whole chain (source fit, protection, guard set) is followed back. `check_test_overlap` counts the
test images found in each recorded sample set, before any fine-tuning starts, and refuses to go on
when there are any, unless the user says the overlap is deliberate.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from datasets import Dataset

from .artifacts import read_record, read_samples
from .data.fingerprint import SampleSet, image_hashes
from .errors import InputError
from .models import TINY_PRESETS, TINY_UNET_PRESET


class TestOverlapError(InputError):
    """The test split holds samples a model under audit was trained on."""

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


def test_hashes_by_size(
    test: Dataset, image_size: int, load_test_at: Callable[[int], Dataset]
) -> Callable[[int | None], set[str]]:
    """`size -> hashes of the test split rendered at size`, for `check_test_overlap`.

    `test` is the split as the audit loaded it (at `image_size`). An embedded domain's pixels depend
    on the size it was rendered at, so a sample set recorded at another size is compared with the
    test split rendered at that size (`load_test_at(size)`); stored images (size `None`) are compared
    as they are.
    """
    cache: dict[int, set[str]] = {}

    def hashes(size: int | None) -> set[str]:
        key = image_size if size is None else size
        if key not in cache:
            cache[key] = set(image_hashes(test if key == image_size else load_test_at(key)))
        return cache[key]

    return hashes


def check_test_overlap(
    models: dict[str, str],
    test_hashes: Callable[[int | None], set[str]],
    allow_overlap: bool = False,
) -> dict[str, Any]:
    """Count, per model and recorded sample set, the test images it holds; refuse any unless allowed.

    Args:
        models: label ("model", "original") -> path of each model under audit.
        test_hashes: `image_size -> hashes of the test split rendered at that size` (the size
            matters for embedded domains only; it is `None` for stored images).
        allow_overlap: go on, and say so in the report, when test images were trained on.

    Returns:
        The report's `test_overlap` entry: `{"counts": {label: {sample set: count}}, "unrecorded":
        {label: [...]}, "allowed": allow_overlap, "total": n}`.

    Raises:
        TestOverlapError: some test images were trained on and `allow_overlap` is false.
    """
    counts: dict[str, dict[str, int]] = {}
    unrecorded: dict[str, list[str]] = {}
    for label, path in models.items():
        sets, missing = training_samples(path)
        counts[label] = {name: len(test_hashes(s.image_size) & set(s.hashes)) for name, s in sets.items()}
        unrecorded[label] = missing
    total = sum(n for per_model in counts.values() for n in per_model.values())
    if total and not allow_overlap:
        found = "; ".join(f"{label}: {name} holds {n}" for label, c in counts.items() for name, n in c.items() if n)
        raise TestOverlapError(
            f"{total} test image(s) of the target were trained on ({found}). The audit would score a model on "
            "images it has seen: evaluate on a test split disjoint from every stage's training data, or pass "
            "--allow_test_overlap for a deliberate experiment (the report and card then say so)."
        )
    return {"counts": counts, "unrecorded": unrecorded, "allowed": allow_overlap, "total": total}
