"""What a user sees while hf_ntl works: one progress display per stage, the Trainer's logs in a file.

Quiet by default: every training stage shows a single progress bar whose status line says what
matters for that method (an ADMM round and its residual, a SOPHON iteration and what the simulated
attackers reach, audit runs done with an ETA), while the Trainer's own log dictionaries go to
`training_log.jsonl` in the run's folder (with `trainer_state.json` in its checkpoints, as always).
`set_verbose(True)` (the command line's `--verbose`) restores the Trainer's own bars and logs on the
terminal instead.

Progress is drawn with `rich` on stderr, on the main process only; when stderr is not a terminal
(a log file, CI), each display prints a plain line at every tenth of the way instead of redrawing.
"""

from __future__ import annotations

import io
import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TypeVar

from rich import box
from rich.console import Console, Group, RenderableType
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback, TrainerControl, TrainerState
from transformers.training_args import TrainingArguments

T = TypeVar("T")

TRAINING_LOG = "training_log.jsonl"

# Tables are laid out for this width off a terminal (rich would assume 80 columns).
TABLE_WIDTH = 120

# Progress and notes go to stderr, so that a command's results on stdout can be piped or redirected.
console = Console(stderr=True)

_verbose = False
_displays: list[Display] = []


def is_main_process() -> bool:
    """Whether this process speaks: the only one, or rank 0 of an `accelerate launch` / `torchrun` (read from
    the launcher's environment, so that asking starts no process group)."""
    return int(os.environ.get("RANK", "0")) == 0


def say(*lines: str) -> None:
    """Print a summary line on stdout, once however many processes run the command."""
    if is_main_process():
        print(*lines)


def is_verbose() -> bool:
    """Whether the libraries' own logs were asked for (`--verbose`)."""
    return _verbose


def set_verbose(verbose: bool) -> None:
    """Show the Trainer's own progress bars and log dictionaries on the terminal (`--verbose`)."""
    global _verbose
    _verbose = verbose


class Display:
    """One progress display: `completed` of `total` `unit`, elapsed time, ETA and a status line.

    On a terminal it is a live `rich` bar; elsewhere (a log file, CI) it prints a plain line at every
    tenth of the way and at the end, so that a long run shows signs of life without flooding the log.
    Starting a display stops any left running by a stage that failed.
    """

    def __init__(self, description: str, total: int, completed: int = 0, unit: str = "steps") -> None:
        stop_displays()
        self.description, self.total, self.unit = description, max(total, 1), unit
        self.completed, self.status = completed, ""
        self.started = time.monotonic()
        self.next_line = self._tenth_after(completed)
        self.progress: Progress | None = None
        if console.is_terminal:
            self.progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(bar_width=24),
                MofNCompleteColumn(),
                TextColumn("{task.fields[unit]}"),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                TextColumn("{task.fields[status]}"),
                console=console,
            )
            self.task = self.progress.add_task(description, total=self.total, completed=completed, unit=unit, status="")
            self.progress.start()
        _displays.append(self)

    def _tenth_after(self, completed: int) -> int:
        """The first count past `completed` that reaches the next tenth of `total`."""
        tenth = completed * 10 // self.total + 1
        return -(-tenth * self.total // 10)  # ceil(tenth * total / 10), always above `completed`

    def update(self, completed: int, status: str = "") -> None:
        self.completed, self.status = completed, status
        if self.progress is not None:
            self.progress.update(self.task, completed=completed, status=status)
        elif completed >= self.next_line and completed < self.total:
            self._print_line()
            self.next_line = self._tenth_after(completed)

    def _print_line(self) -> None:
        elapsed = time.monotonic() - self.started
        line = f"{self.description}: {self.completed}/{self.total} {self.unit}, {format_duration(elapsed)}"
        print(line + (f" · {self.status}" if self.status else ""), file=sys.stderr, flush=True)

    def stop(self) -> None:
        if self in _displays:
            _displays.remove(self)
            if self.progress is not None:
                self.progress.stop()
            else:
                self._print_line()


def stop_displays() -> None:
    """Stop every running display (before an error message or a new display, so that none is drawn over)."""
    for display in reversed(_displays):
        display.stop()


def track(items: Iterable[T], description: str, total: int, unit: str = "runs", show: bool = True) -> Iterator[T]:
    """Iterate over `items` behind a progress display of `total` `unit` with an ETA (none when `show` is false)."""
    if not show:
        yield from items
        return
    display = Display(description, total, unit=unit)
    try:
        for done, item in enumerate(items, start=1):
            yield item
            display.update(done)
    finally:
        display.stop()


# A status line from the stage's latest logged values (e.g. `{"eval_accuracy": 0.93, "loss": 0.2}`).
Status = Callable[[TrainerState, dict[str, float]], str]


class StageProgress(TrainerCallback):
    """One progress display for a `Trainer` stage (main process only): optimiser steps and a status line.

    Args:
        description: the stage's name ("source fit", "NTP", ...).
        status: builds the status line from the trainer state and the latest value of every logged
            key (training and evaluation logs merged); called after every step and every log.
    """

    def __init__(self, description: str, status: Status) -> None:
        self.description = description
        self.status = status
        self.latest: dict[str, float] = {}
        self.display: Display | None = None

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if state.is_world_process_zero:
            self.display = Display(self.description, state.max_steps, completed=state.global_step)

    def _refresh(self, state: TrainerState) -> None:
        if self.display is not None:
            self.display.update(state.global_step, self.status(state, self.latest))

    def on_step_end(self, args, state, control, **kwargs):
        self._refresh(state)

    def on_log(self, args, state, control, logs: dict[str, float] | None = None, **kwargs):
        self.latest |= {key: value for key, value in (logs or {}).items() if isinstance(value, (int, float))}
        self._refresh(state)

    def on_train_end(self, args, state, control, **kwargs):
        if self.display is not None:
            self._refresh(state)
            self.display.stop()
            self.display = None


class TrainingLogFile(TrainerCallback):
    """Every log of the Trainer (`{"step", "epoch", ...}`) as a JSON line in the run's `training_log.jsonl`.

    A fresh run starts the file afresh; a resumed one keeps the lines up to its checkpoint's step, so
    the file reads as one uninterrupted run.
    """

    def _path(self, args: TrainingArguments) -> Path:
        return Path(args.output_dir) / TRAINING_LOG

    def on_train_begin(self, args, state, control, **kwargs):
        if not (state.is_world_process_zero and args.output_dir):
            return
        path = self._path(args)
        kept = []
        if state.global_step and path.is_file():
            kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= state.global_step]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(line + "\n" for line in kept))

    def on_log(self, args, state, control, logs: dict[str, float] | None = None, **kwargs):
        if not (state.is_world_process_zero and logs and args.output_dir):
            return
        line = {"step": state.global_step, "epoch": state.epoch, **logs}
        with self._path(args).open("a") as log:
            log.write(json.dumps(line) + "\n")


def show_progress(trainer: Trainer, description: str, status: Status) -> None:
    """Give `trainer` hf_ntl's display: its logs to the log file and, unless verbose, one progress bar
    instead of the Trainer's own bars and printed log dictionaries."""
    trainer.add_callback(TrainingLogFile())
    if _verbose:
        return
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(StageProgress(description, status))


def metric_status(*fields: tuple[str, str]) -> Status:
    """A status line of the latest logged `fields`, each `(key, format)`, e.g. `("eval_accuracy", "test acc {:.1%}")`;
    keys not logged yet are left out. The epoch leads when the stage counts epochs."""

    def status(state: TrainerState, latest: dict[str, float]) -> str:
        parts = [f"epoch {state.epoch:.1f}/{state.num_train_epochs:g}"] if state.epoch is not None else []
        parts += [text.format(latest[key]) for key, text in fields if key in latest]
        return " · ".join(parts)

    return status


# ---------------------------------------------------------------------------------------------
# Tables


def table(columns: list[str]) -> Table:
    """A results table: first column left-aligned (row names), the others right-aligned (figures)."""
    result = Table(box=box.SIMPLE_HEAD, show_edge=False, header_style="bold")
    for index, column in enumerate(columns):
        result.add_column(column, justify="left" if index == 0 else "right")
    return result


def titled(title: str, body: RenderableType) -> Group:
    """`body` under a bold `title` line (a table's own title would be wrapped to the table's width)."""
    return Group(Text(title, style="bold"), body)


def signed(value: float, text: str, bad_when_positive: bool = True) -> Text:
    """`text` coloured by the sign of `value`: red where it is bad for protection, green where it is good."""
    bad = value > 0 if bad_when_positive else value < 0
    return Text(text, style="red" if bad else "green")


def print_tables(tables: list[RenderableType]) -> None:
    """Print `tables` on stdout (main process only): coloured on a terminal, as `tables_text` otherwise."""
    if not is_main_process():
        return
    out = Console()
    if not out.is_terminal:
        print(tables_text(tables))
        return
    for index, item in enumerate(tables):
        if index:
            out.print()
        out.print(item)


def tables_text(tables: list[RenderableType]) -> str:
    """`tables` rendered as plain text (no colour), as `print_tables` shows them off a terminal."""
    buffer = io.StringIO()
    out = Console(file=buffer, width=TABLE_WIDTH, color_system=None)
    for index, item in enumerate(tables):
        if index:
            out.print()
        out.print(item)
    return "\n".join(line.rstrip() for line in buffer.getvalue().rstrip().splitlines())


def format_duration(seconds: float) -> str:
    """`42 s`, `12 min`, `3.4 h`: a duration as a person reads it."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
