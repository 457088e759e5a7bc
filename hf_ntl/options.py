"""Options from the command line and YAML files, into the configuration dataclasses of every stage.

`hf-ntl COMMAND --config file.yaml --option value`: the file's keys are option names; the command line
wins. Pipelines that drive stages (demo, tune, the bench) build each stage's configuration the same way
(`stage_config`), so a stage option is spelled and checked identically everywhere.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import yaml
from transformers import HfArgumentParser

from .errors import InputError


def yaml_to_argv(path: str) -> list[str]:
    """Turn a YAML mapping of option names to values into command-line arguments."""
    config_path = Path(path)
    if not config_path.is_file():
        raise InputError(f"config file {path} does not exist.")
    try:
        values = yaml.safe_load(config_path.read_text()) or {}
    except yaml.YAMLError as err:
        raise InputError(f"{path} is not valid YAML: {' '.join(str(err).split())}") from err
    if not isinstance(values, dict):
        raise InputError(f"{path} must hold a mapping of option names to values.")
    argv: list[str] = []
    for key, value in values.items():
        argv.append(f"--{key}")
        if isinstance(value, list):
            argv.extend(str(item) for item in value)
        elif value is not None:
            argv.append(str(value))
    return argv


class _Parser(HfArgumentParser):
    """`HfArgumentParser` whose errors are `InputError`s: `main` prints them on one line, without the usage
    block (hundreds of TrainingArguments options), and points to `--help`."""

    def error(self, message: str) -> NoReturn:
        raise InputError(f"{message} (`{self.prog} --help` lists the options)")


def parse(dataclass_types: Sequence[type], argv: Sequence[str], prog: str) -> tuple:
    """Parse `argv` (with an optional `--config file.yaml` first) into the dataclasses.

    Options on the command line come after the file's, so they win. Unknown options, whether in
    the file or on the command line, are an error that names them; so is a value the dataclasses'
    own checks (`__post_init__`) refuse.
    """
    argv = list(argv)
    if "--config" in argv:
        at = argv.index("--config")
        if at + 1 >= len(argv):
            raise InputError("--config needs a file name.")
        argv = yaml_to_argv(argv[at + 1]) + argv[:at] + argv[at + 2 :]
    parser = _Parser(dataclass_types, prog=prog, allow_abbrev=False)
    parser.add_argument("--config", help="YAML file of options; command-line options override it.")
    try:
        *parsed, remaining = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    except ValueError as err:  # a dataclass's __post_init__ (ours or TrainingArguments') refused a value
        if isinstance(err, InputError):
            raise
        raise InputError(str(err)) from err
    if remaining:
        parser.error(f"unknown options: {' '.join(remaining)}")
    return tuple(p for p in parsed if not isinstance(p, argparse.Namespace))


def stage_config(config_class: type, config_file: str | None, options: Sequence[str], command: str) -> Any:
    """A stage's config for a pipeline driving stages (demo, bench): the YAML `config_file`'s options (those of
    `hf-ntl COMMAND`), then `options` (paths, domains), which win; no experiment trackers."""
    argv = [*(["--config", config_file] if config_file else []), *options, "--report_to", "none"]
    try:
        (config,) = parse([config_class], argv, f"hf-ntl {command}")
    except InputError as err:
        raise InputError(f"{config_file or f'the {command} stage'}: {err}") from err
    return config
