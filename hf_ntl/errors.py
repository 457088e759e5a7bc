"""The one exception type that means "the user asked for something that cannot be done".

Everything raised because of the user's options, paths, data or models derives from `InputError`
(a `ValueError`, so library callers that catch `ValueError` keep working). The command line prints
an `InputError` as one line, `hf-ntl COMMAND: error: <message>`, and exits with status 2; anything
else is a bug and keeps its traceback.

Names that may be a local path or a Hub id are told apart here once (`missing_local_path`,
`not_local_nor_hub`), so that every loader says the same thing when neither holds what was asked for.
"""

from __future__ import annotations

import os
from pathlib import Path

from huggingface_hub.utils import HFValidationError, validate_repo_id


class InputError(ValueError):
    """A problem with the user's input (options, paths, data sets, checkpoints), said so that they can fix it."""


def missing_local_path(name: str | os.PathLike) -> str | None:
    """The message for a `name` that can only be a local path and is not there, else `None`.

    A Hub repository id is `name` or `owner/name` (letters, digits, `-`, `_`, `.`); anything else (`./runs/x`,
    `/data/x`, `~/x`, `runs/a/model`, `runs/`) can only be a path. Said here, "no such folder: <path>" replaces what
    the Hub client would answer for such a name ("Repo id must be in the form 'repo_name' or
    'namespace/repo_name'"). A name that exists, or that could be a Hub id, gives `None`: the caller loads it, and
    when that fails for a Hub-shaped name that is not on disk, says both with `not_local_nor_hub`.
    """
    path = Path(name).expanduser()
    if path.exists() or _could_be_hub_id(str(name)):
        return None
    # A relative path is resolved against the working directory, which the user may not have in mind.
    where = "" if path.is_absolute() else f" (looked for {path.absolute()})"
    return f"no such folder: {name}{where}"


def not_local_nor_hub(name: str | os.PathLike, error: BaseException) -> str:
    """The message for a Hub-shaped `name` that is no local folder and that the Hub could not give either."""
    # Hub clients' messages run over several lines; the command line prints an InputError as one.
    reason = " ".join(str(error).split())
    return f"{name} is not a local folder (no such folder) and loading it from the Hub failed: {reason}"


def _could_be_hub_id(name: str) -> bool:
    # The Hub client's own rule, so that exactly the names it would refuse are treated as paths.
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True
