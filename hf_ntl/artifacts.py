"""Writing result folders so that an interrupted run never leaves a broken one in place."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

RECORD_FILE = "hf_ntl.json"


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
