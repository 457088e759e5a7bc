"""Writing result folders so that an interrupted run never leaves a broken one in place."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from transformers import TrainingArguments

from .data.fingerprint import SampleSet
from .errors import InputError

RECORD_FILE = "hf_ntl.json"
# Beside the record: a hash per image of every sample set the stage trained on (a few hundred kB
# for 10,000 images, kept out of the record that cards and users read).
SAMPLES_FILE = "hf_ntl_samples.json"


@contextmanager
def replacing_directory(target: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty staging folder that replaces `target` only once the block succeeds.

    A previous good result at `target` survives any exception (or kill) inside the block: the
    swap is two renames on the same file system, done after everything has been written.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-staging-", dir=target.parent))
    try:
        yield staging
        retired = None
        if target.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{target.name}-old-", dir=target.parent))
            os.replace(target, retired / "old")
        os.replace(staging, target)
        if retired is not None:
            shutil.rmtree(retired, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_record(folder: str | os.PathLike, record: dict[str, Any]) -> None:
    """Write the machine-readable record (`hf_ntl.json`) that later stages and cards read."""
    (Path(folder) / RECORD_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")


def read_record(folder: str | os.PathLike) -> dict[str, Any]:
    """Read `hf_ntl.json` from a model folder (an empty dict when there is none)."""
    path = Path(folder) / RECORD_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def write_samples(folder: str | os.PathLike, samples: dict[str, SampleSet]) -> None:
    """Write the per-image hashes of each role's samples (`hf_ntl_samples.json`) for the leakage guard."""
    content = {role: sample_set.to_dict() for role, sample_set in samples.items()}
    (Path(folder) / SAMPLES_FILE).write_text(json.dumps(content) + "\n")


def read_samples(folder: str | os.PathLike) -> dict[str, SampleSet] | None:
    """The sample sets a model folder records, or `None` when it records none (a Hub model, an older run)."""
    path = Path(folder) / SAMPLES_FILE
    if not path.is_file():
        return None
    return {role: SampleSet.from_dict(values) for role, values in json.loads(path.read_text()).items()}


RUN_FILE = "hf_ntl_run.json"
# The `TrainingArguments` settings that shape a result, recorded beside a config's own fields.
RECORDED_TRAINING_ARGUMENTS = (
    "learning_rate",
    "weight_decay",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "lr_scheduler_type",
    "seed",
)


# Options that say how to treat a run (its folder, whether to run it at all), not what it computes.
NOT_SETTINGS = ("overwrite", "dry_run")
# Settings added after runs had been recorded without them, and the value that computes what those runs did: at
# that value a setting is left out of the identity, so the demo and the bench still reuse the older runs.
NEUTRAL_SETTINGS = {"invert_probability": 0.0, "validation_samples": 0}  # the latter: fit-source's


def run_settings(config: Any, extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """The settings that define a run: the fields a config adds to `TrainingArguments` (but `NOT_SETTINGS`)
    and the recorded training arguments."""
    base = {f.name for f in dataclasses.fields(TrainingArguments)}
    own = [f.name for f in dataclasses.fields(config) if f.name not in base and f.name not in NOT_SETTINGS]
    names = own + [name for name in (*RECORDED_TRAINING_ARGUMENTS, *extra) if name in base and hasattr(config, name)]
    settings = {name: getattr(config, name) for name in names}
    settings = {name: value for name, value in settings.items() if NEUTRAL_SETTINGS.get(name, object()) != value}
    return json.loads(json.dumps(settings, default=str))


def run_identity(stage: str, config: Any, method: str | None = None) -> dict[str, Any]:
    """What makes a run this run: its stage, its method and every setting that shapes its result.

    Written to `hf_ntl_run.json` by `claim_output_dir`; a pipeline (demo, bench) reuses a finished
    stage only when this equals the recorded identity (`finished_run`).
    """
    identity: dict[str, Any] = {"stage": stage, **({"method": method} if method else {})}
    return identity | run_settings(config, extra=("num_train_epochs",))


def finished_run(output_dir: str | os.PathLike, identity: dict[str, Any], finished: str = "model/hf_ntl.json") -> bool:
    """Whether `output_dir` holds a finished result (`finished`) of exactly the run `identity` describes."""
    out = Path(output_dir)
    run_file = out / RUN_FILE
    if not ((out / finished).is_file() and run_file.is_file()):
        return False
    return json.loads(run_file.read_text()) == json.loads(json.dumps(identity))


def holds_other_run(output_dir: str | os.PathLike, identity: dict[str, Any]) -> bool:
    """Whether `output_dir` was claimed by a run other than `identity` (finished or not).

    For pipelines that regenerate their stages (the bench, `make model-cards`): such a folder holds the
    result of a changed default or setting, to be replaced (`overwrite`) rather than refused; an unfinished
    run of this very identity is resumed instead.
    """
    run_file = Path(output_dir) / RUN_FILE
    return run_file.is_file() and json.loads(run_file.read_text()) != json.loads(json.dumps(identity))


class OutputDirError(InputError):
    """An output folder holds another run's results; nothing was touched."""


def check_output_dir(
    output_dir: str | os.PathLike,
    identity: dict[str, Any],
    overwrite: bool = False,
    finished: str = "model/hf_ntl.json",
) -> None:
    """Raise `OutputDirError` if `claim_output_dir` would refuse `output_dir`; touch nothing (for dry runs)."""
    out = Path(output_dir)
    if overwrite:
        return
    identity = json.loads(json.dumps(identity))  # as it will read back (tuples become lists, ...)
    run_file = out / RUN_FILE
    previous = json.loads(run_file.read_text()) if run_file.is_file() else None
    checkpoints = sorted(out.glob("checkpoint-*"))
    hint = (
        "pass --overwrite to start afresh (a finished result is replaced only once the new one is complete), "
        "or choose another output_dir."
    )
    if (out / finished).is_file():
        raise OutputDirError(f"{out} already holds a finished result ({out / finished}); {hint}")
    if previous is not None and previous != identity and checkpoints:
        changed = sorted(k for k in identity.keys() | previous.keys() if identity.get(k) != previous.get(k))
        raise OutputDirError(f"{out} holds checkpoints of another run (differing in {', '.join(changed)}); {hint}")
    if previous is None and checkpoints:
        raise OutputDirError(f"{out} holds checkpoints that hf_ntl did not start; {hint}")


def claim_output_dir(
    output_dir: str | os.PathLike,
    identity: dict[str, Any],
    overwrite: bool = False,
    finished: str = "model/hf_ntl.json",
) -> None:
    """Make `output_dir` this run's, refusing to mix runs, before any training starts.

    A folder is resumed only by the run that started it: `identity` (stage, model, data and every
    setting that shapes the result) is written to `hf_ntl_run.json` and compared on the next start.
    Refused without `overwrite` (`check_output_dir`): a folder whose finished result (`finished`,
    relative) exists, whose checkpoints belong to a run with another identity, or that holds
    checkpoints hf_ntl did not start. With `overwrite`, checkpoints are deleted so the run starts
    afresh; a finished result stays in place until the new one replaces it (see `replacing_directory`).
    """
    check_output_dir(output_dir, identity, overwrite, finished)
    out = Path(output_dir)
    if overwrite:
        for checkpoint in sorted(out.glob("checkpoint-*")):
            shutil.rmtree(checkpoint)
    out.mkdir(parents=True, exist_ok=True)
    (out / RUN_FILE).write_text(json.dumps(json.loads(json.dumps(identity)), indent=2, sort_keys=True) + "\n")
