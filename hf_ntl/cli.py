"""The `hf-ntl` command: one subcommand per stage, each reading what the previous one wrote.

    hf-ntl fit-source --dataset_name font-digits --output_dir runs/source
    hf-ntl protect-ntp --model_name_or_path runs/source/model --target_dataset uci-digits --output_dir runs/ntp
    hf-ntl protect-sophon --model_name_or_path runs/source/model --target_dataset uci-digits --output_dir runs/sophon
    hf-ntl evaluate --model_name_or_path runs/ntp/model --target_dataset uci-digits
    hf-ntl demo --output_dir runs/demo

Every subcommand takes `--config file.yaml` (keys are the option names); options given on the
command line override the file.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from transformers import HfArgumentParser
from transformers.utils import logging as transformers_logging

from .evaluation import EvaluateArguments, format_report_table, run_evaluation
from .protect import run_ntp, run_sophon
from .source import MODEL_SUBDIR, SourceConfig, run_source
from .trainers import NTPConfig, SophonConfig


@dataclass
class DemoArguments:
    """The embedded default end to end: fit the source model, then attack it and measure SLC-AUC."""

    output_dir: str = field(default="runs/demo", metadata={"help": "Where everything is written."})
    source_dataset: str = field(default="font-digits", metadata={"help": "The owner's domain."})
    target_datasets: list[str] = field(
        default_factory=lambda: ["uci-digits", "textured-digits"], metadata={"help": "Unauthorised domains."}
    )
    model: str = field(default="tiny-resnet", metadata={"help": "Tiny preset, folder or Hub id to start from."})
    source_epochs: float = field(default=5.0, metadata={"help": "Epochs of source training."})
    source_samples: int | None = field(
        default=None, metadata={"help": "Generated source train samples (default: the domain's, 10,000)."}
    )
    counts: list[int] = field(default_factory=lambda: [10, 50, 200], metadata={"help": "Target sample counts."})
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2], metadata={"help": "Seeds per count."})
    suite: str = field(default="default", metadata={"help": "Attack suite: default, quick, or a YAML file."})
    attacks: list[str] = field(
        default_factory=lambda: ["full", "head-only", "lora-r4"],
        metadata={"help": "Attacks of the suite to run (the demo keeps three to stay within minutes)."},
    )
    overwrite: bool = field(
        default=False,
        metadata={"help": "Start afresh, deleting output_dir (otherwise a finished source model is reused)."},
    )


def yaml_to_argv(path: str) -> list[str]:
    """Turn a YAML mapping of option names to values into command-line arguments."""
    config_path = Path(path)
    if not config_path.is_file():
        raise SystemExit(f"error: config file {path} does not exist.")
    values = yaml.safe_load(config_path.read_text()) or {}
    if not isinstance(values, dict):
        raise SystemExit(f"error: {path} must hold a mapping of option names to values.")
    argv: list[str] = []
    for key, value in values.items():
        argv.append(f"--{key}")
        if isinstance(value, list):
            argv.extend(str(item) for item in value)
        elif value is not None:
            argv.append(str(value))
    return argv


def parse(dataclass_types: Sequence[type], argv: Sequence[str], prog: str) -> tuple:
    """Parse `argv` (with an optional `--config file.yaml` first) into the dataclasses.

    Options on the command line come after the file's, so they win. Unknown options, whether in
    the file or on the command line, are an error that names them.
    """
    argv = list(argv)
    if "--config" in argv:
        at = argv.index("--config")
        if at + 1 >= len(argv):
            raise SystemExit("error: --config needs a file name.")
        argv = yaml_to_argv(argv[at + 1]) + argv[:at] + argv[at + 2 :]
    parser = HfArgumentParser(dataclass_types, prog=prog, allow_abbrev=False)
    parser.add_argument("--config", help="YAML file of options; command-line options override it.")
    *parsed, remaining = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    if remaining:
        parser.error(f"unknown options: {' '.join(remaining)}")
    return tuple(p for p in parsed if not isinstance(p, argparse.Namespace))


def fit_source_command(argv: Sequence[str]) -> None:
    (config,) = parse([SourceConfig], argv, "hf-ntl fit-source")
    record = run_source(config)
    print(f"source model: {Path(config.output_dir) / MODEL_SUBDIR}  test accuracy {100 * record['test_accuracy']:.2f}%")


def protect_ntp_command(argv: Sequence[str]) -> None:
    (config,) = parse([NTPConfig], argv, "hf-ntl protect-ntp")
    record = run_ntp(config)
    print(
        f"protected model: {Path(config.output_dir) / MODEL_SUBDIR}  sparsity {record['sparsity']['overall']:.4f}  "
        f"source accuracy {100 * record['source_accuracy_before']:.2f}% -> {100 * record['source_accuracy_after']:.2f}%"
    )


def protect_sophon_command(argv: Sequence[str]) -> None:
    (config,) = parse([SophonConfig], argv, "hf-ntl protect-sophon")
    record = run_sophon(config)
    tripped = record["guard"]["tripped_at"]
    print(
        f"protected model: {Path(config.output_dir) / MODEL_SUBDIR}  source accuracy "
        f"{100 * record['source_accuracy_before']:.2f}% -> {100 * record['source_accuracy_after']:.2f}%"
        + (f"  (guard tripped at step {tripped}: kept step {record['guard']['last_good_step']})" if tripped else "")
    )


def evaluate_command(argv: Sequence[str]) -> None:
    (args,) = parse([EvaluateArguments], argv, "hf-ntl evaluate")
    print(format_report_table(run_evaluation(args)))


def demo_command(argv: Sequence[str]) -> None:
    (args,) = parse([DemoArguments], argv, "hf-ntl demo")
    start = time.perf_counter()
    out = Path(args.output_dir)
    if args.overwrite and out.exists():
        shutil.rmtree(out)
    source_model = out / "source" / MODEL_SUBDIR
    if (source_model / "model.safetensors").exists():
        print(f"[1/2] reusing the source model in {source_model} (--overwrite to refit)")
    else:
        print(f"[1/2] fitting {args.model} on {args.source_dataset}")
        config = SourceConfig(
            output_dir=str(out / "source"),
            model_name_or_path=args.model,
            dataset_name=args.source_dataset,
            num_train_epochs=args.source_epochs,
            num_train_samples=args.source_samples,
            logging_strategy="epoch",
            report_to="none",
        )
        record = run_source(config)
        print(f"      source test accuracy {100 * record['test_accuracy']:.2f}%")
    for target in args.target_datasets:
        print(f"[2/2] attacking it on {target}: {', '.join(args.attacks)} vs scratch, n = {args.counts}")
        report = run_evaluation(
            EvaluateArguments(
                model_name_or_path=str(source_model),
                target_dataset=target,
                suite=args.suite,
                attacks=args.attacks,
                counts=args.counts,
                seeds=args.seeds,
                output_dir=str(out / "evaluate" / target),
            )
        )
        print(format_report_table(report))
    print(f"reports and plots: {out / 'evaluate'}   wall time {time.perf_counter() - start:.0f} s")


COMMANDS: dict[str, tuple[Callable[[Sequence[str]], None], str]] = {
    "fit-source": (fit_source_command, "fit the owner's source classifier with Trainer"),
    "protect-ntp": (protect_ntp_command, "non-transferable pruning (ADMM + Fisher regulariser) of a source model"),
    "protect-sophon": (protect_sophon_command, "SOPHON non-fine-tunable learning (simulated attackers + guard)"),
    "evaluate": (evaluate_command, "attack a checkpoint with a suite and measure SLC-AUC against scratch"),
    "demo": (demo_command, "the embedded default end to end (fit-source, then evaluate)"),
}


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = [f"  {name:<15} {summary}" for name, (_, summary) in COMMANDS.items()]
        usage = "usage: hf-ntl COMMAND [--config file.yaml] [options]\n\ncommands:\n" + "\n".join(lines)
        if argv and argv[0] not in ("-h", "--help"):
            raise SystemExit(f"error: unknown command {argv[0]!r}\n\n{usage}")
        print(usage + "\n\n`hf-ntl COMMAND --help` lists a command's options.")
        return
    # Weights load in milliseconds here; their per-tensor bars would bury the training progress.
    transformers_logging.disable_progress_bar()
    command, _ = COMMANDS[argv[0]]
    command(argv[1:])


if __name__ == "__main__":
    main()
