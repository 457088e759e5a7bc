"""The `hf-ntl` command: one subcommand per stage, each reading what the previous one wrote.

    hf-ntl fit-source --dataset_name font-digits --output_dir runs/source
    hf-ntl protect-ntp --model_name_or_path runs/source/model --target_dataset uci-digits --output_dir runs/ntp
    hf-ntl protect-sophon --model_name_or_path runs/source/model --target_dataset uci-digits --output_dir runs/sophon
    hf-ntl evaluate --model_name_or_path runs/ntp/model --target_dataset uci-digits --output_dir runs/audit
    hf-ntl card --model_dir runs/ntp/model --report_dir runs/audit
    hf-ntl push --model_dir runs/ntp/model --repo_id you/tiny-resnet-ntp
    hf-ntl demo --output_dir runs/demo

Diffusion (unconditional DDPM pipelines):

    hf-ntl fit-ddpm --dataset_name font-digits --output_dir runs/ddpm
    hf-ntl protect-sophon-diffusion --model_name_or_path runs/ddpm/model --target_dataset uci-digits \
        --output_dir runs/sophon-ddpm
    hf-ntl evaluate-diffusion --model_name_or_path runs/sophon-ddpm/model \
        --original_model_name_or_path runs/ddpm/model --output_dir runs/audit-ddpm

Every subcommand takes `--config file.yaml` (keys are the option names); options given on the
command line override the file.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

from rich.table import Table

from .errors import InputError
from .options import parse, stage_config

# Each command imports what it runs when it runs: `hf-ntl --help`, `--version` and a mistyped command answer in
# a second rather than after the ~12 s that torch, diffusers and the rest of transformers take to import.


@dataclass
class DemoArguments:
    """The embedded default end to end: fit the source model, protect it, attack it, write its card."""

    output_dir: str = field(default="runs/demo", metadata={"help": "Where everything is written."})
    method: str = field(default="ntp", metadata={"help": "Protection: `ntp` (about 30 s here) or `sophon` (~80 s)."})
    source_dataset: str = field(default="font-digits", metadata={"help": "The owner's domain."})
    target_dataset: str = field(default="uci-digits", metadata={"help": "The unauthorised domain."})
    model: str = field(default="tiny-resnet", metadata={"help": "Tiny preset, folder or Hub id to start from."})
    source_epochs: float | None = field(
        default=None,
        metadata={"help": "Epochs of source training (default: the preset's fit-source recipe; tiny-vit's is 40)."},
    )
    source_samples: int | None = field(
        default=None, metadata={"help": "Generated source train samples (default: the domain's, 10,000)."}
    )
    counts: list[int] = field(default_factory=lambda: [10, 50, 200], metadata={"help": "Target sample counts."})
    seeds: list[int] = field(default_factory=lambda: [0, 1], metadata={"help": "Seeds per count."})
    suite: str = field(default="default", metadata={"help": "Attack suite: default, quick, or a YAML file."})
    attacks: list[str] | None = field(
        default=None,
        metadata={
            "help": "Attacks of the suite to run (default, to stay within minutes: full, head-only, lora-r4, and "
            "full-masked for NTP)."
        },
    )
    protect_config: str | None = field(
        default=None, metadata={"help": "YAML of options for the protection stage (e.g. a shorter schedule)."}
    )
    overwrite: bool = field(
        default=False, metadata={"help": "Start afresh, deleting output_dir (otherwise finished stages are reused)."}
    )

    def __post_init__(self) -> None:
        from .protect import PROTECTIONS

        if self.method not in PROTECTIONS:
            raise InputError(f"method must be one of {list(PROTECTIONS)}, got {self.method!r}.")


@dataclass
class CardArguments:
    """Write the Hub model card of a checkpoint from its record and an evaluation report."""

    model_dir: str = field(metadata={"help": "The model folder (written by fit-source or protect-*)."})
    report_dir: str = field(metadata={"help": "The output_dir of `hf-ntl evaluate` on that model."})
    model_name: str | None = field(
        default=None, metadata={"help": "Title and model-index name, e.g. the Hub repo id (default: folder name)."}
    )


@dataclass
class PushArguments:
    """Upload a model folder with its card and plot to the Hugging Face Hub."""

    model_dir: str = field(metadata={"help": "The model folder, with README.md written by `hf-ntl card`."})
    repo_id: str = field(metadata={"help": "The Hub repository, `owner/name` (created if missing)."})
    public: bool = field(default=False, metadata={"help": "Create the repository public (default: private)."})
    token: str | None = field(default=None, metadata={"help": "Hub token (default: HF_TOKEN or the cached login)."})


def fit_source_command(argv: Sequence[str]) -> None:
    from .source import MODEL_SUBDIR, SourceConfig, run_source
    from .terminal import say

    (config,) = parse([SourceConfig], argv, "hf-ntl fit-source")
    record = run_source(config)
    say(f"source model: {Path(config.output_dir) / MODEL_SUBDIR}  test accuracy {100 * record['test_accuracy']:.2f}%")


def protect_ntp_command(argv: Sequence[str]) -> None:
    from .protect import run_ntp
    from .source import MODEL_SUBDIR
    from .terminal import say
    from .trainers import NTPConfig

    (config,) = parse([NTPConfig], argv, "hf-ntl protect-ntp")
    record = run_ntp(config)
    say(
        f"protected model: {Path(config.output_dir) / MODEL_SUBDIR}  sparsity {record['sparsity']['overall']:.4f}  "
        f"source accuracy {100 * record['source_accuracy_before']:.2f}% -> {100 * record['source_accuracy_after']:.2f}%"
    )


def _guard_note(record: dict[str, Any]) -> str:
    tripped = record["guard"]["tripped_at"]
    return f"  (guard tripped at step {tripped}: kept step {record['guard']['last_good_step']})" if tripped else ""


def protect_sophon_command(argv: Sequence[str]) -> None:
    from .protect import run_sophon
    from .source import MODEL_SUBDIR
    from .terminal import say
    from .trainers import SophonConfig

    (config,) = parse([SophonConfig], argv, "hf-ntl protect-sophon")
    record = run_sophon(config)
    say(
        f"protected model: {Path(config.output_dir) / MODEL_SUBDIR}  source accuracy "
        f"{100 * record['source_accuracy_before']:.2f}% -> {100 * record['source_accuracy_after']:.2f}%"
        + _guard_note(record)
    )


def evaluate_command(argv: Sequence[str]) -> None:
    from .evaluation import EvaluateArguments, dry_run, report_tables, run_evaluation
    from .terminal import print_tables

    (args,) = parse([EvaluateArguments], argv, "hf-ntl evaluate")
    if args.dry_run:
        print_tables([plan_table(dry_run(args))])
        return
    print_tables(report_tables(run_evaluation(args)))


def plan_table(plan: dict[str, Any]) -> Table:
    """`hf-ntl evaluate --dry_run`'s output: what the audit would run, and for about how long."""
    from .terminal import format_duration

    rows = Table(
        title="Audit plan (nothing trained, nothing written)", title_justify="left", box=None, show_header=False
    )
    rows.add_column(style="bold")
    rows.add_column()
    for label, path in plan["models"].items():
        if path:
            rows.add_row(label, path)
    rows.add_row("scratch", "a fresh copy of the model's architecture per seed")
    samples = plan["samples"]
    rows.add_row(
        "target",
        f"{plan['target']}: {samples['train pool']} train pool, {samples['validation']} validation, "
        f"{samples['test']} test (images trained on: {plan['test_overlap']} test, {plan['validation_overlap']} "
        "validation)",
    )
    rows.add_row("attacks", f"{len(plan['attacks'])}: {', '.join(plan['attacks'])}")
    rows.add_row("counts / seeds", f"{', '.join(map(str, plan['counts']))} / {', '.join(map(str, plan['seeds']))}")
    runs = len(plan["attacks"]), sum(1 for path in plan["models"].values() if path) + 1
    rows.add_row(
        "runs",
        f"{plan['runs']} ({runs[0]} attacks x {runs[1]} models x {len(plan['seeds'])} seeds x "
        f"{len(plan['counts'])} counts)",
    )
    budget = "; ".join(f"n={n}: {'/'.join(map(str, steps))}" for n, steps in plan["steps_per_count"].items())
    rows.add_row("steps per run", budget)
    rows.add_row("estimated time", f"{format_duration(plan['estimated_seconds'])} here, in one process")
    return rows


def tune_command(argv: Sequence[str]) -> None:
    from .source import MODEL_SUBDIR
    from .terminal import print_tables, say
    from .tune import TuneArguments, run_tune, tuning_tables

    (args,) = parse([TuneArguments], argv, "hf-ntl tune")
    summary = run_tune(args)
    say(f"model and card: {Path(args.output_dir) / MODEL_SUBDIR}")
    print_tables(tuning_tables(summary))


def fit_ddpm_command(argv: Sequence[str]) -> None:
    from .source import MODEL_SUBDIR
    from .source_diffusion import DiffusionSourceConfig, run_diffusion_source
    from .terminal import say

    (config,) = parse([DiffusionSourceConfig], argv, "hf-ntl fit-ddpm")
    record = run_diffusion_source(config)
    say(
        f"diffusion pipeline: {Path(config.output_dir) / MODEL_SUBDIR}  test denoising MSE "
        f"{record['test_denoising_mse']:.4f}  ({record['wall_time_s']:.0f} s)"
    )


def protect_sophon_diffusion_command(argv: Sequence[str]) -> None:
    from .protect import run_sophon_diffusion
    from .source import MODEL_SUBDIR
    from .terminal import say
    from .trainers import SophonDiffusionConfig

    (config,) = parse([SophonDiffusionConfig], argv, "hf-ntl protect-sophon-diffusion")
    record = run_sophon_diffusion(config)
    before, after = record["denoising_mse_before"], record["denoising_mse_after"]
    say(
        f"protected pipeline: {Path(config.output_dir) / MODEL_SUBDIR}  denoising MSE, original domain "
        f"{before['source']:.4f} -> {after['source']:.4f}, restricted {before['target']:.4f} -> {after['target']:.4f}"
        f"  ({record['wall_time_s']:.0f} s)" + _guard_note(record)
    )


def evaluate_diffusion_command(argv: Sequence[str]) -> None:
    from .evaluation_diffusion import DiffusionEvaluateArguments, denoising_tables, run_evaluation_diffusion
    from .terminal import print_tables

    (args,) = parse([DiffusionEvaluateArguments], argv, "hf-ntl evaluate-diffusion")
    print_tables(denoising_tables(run_evaluation_diffusion(args)))


def card_command(argv: Sequence[str]) -> None:
    from .cards import write_card
    from .terminal import say

    (args,) = parse([CardArguments], argv, "hf-ntl card")
    write_card(args.model_dir, args.report_dir, args.model_name)
    say(f"model card: {Path(args.model_dir) / 'README.md'}")


def push_command(argv: Sequence[str]) -> None:
    from .cards import push_to_hub
    from .terminal import say

    (args,) = parse([PushArguments], argv, "hf-ntl push")
    url = push_to_hub(args.model_dir, args.repo_id, private=not args.public, token=args.token)
    say(f"pushed {args.model_dir} to {args.repo_id}: {url}")


def demo_command(argv: Sequence[str]) -> None:
    from .artifacts import finished_run, run_identity
    from .cards import write_card
    from .evaluation import EvaluateArguments, read_report, report_tables, run_evaluation
    from .protect import PROTECTIONS
    from .source import MODEL_SUBDIR, SourceConfig, run_source
    from .terminal import print_tables, say

    (args,) = parse([DemoArguments], argv, "hf-ntl demo")
    start = time.perf_counter()
    out = Path(args.output_dir)
    if args.overwrite and out.exists():
        shutil.rmtree(out)
    # A finished stage is reused only when it is exactly the run asked for (its recorded identity);
    # a stage with other settings is not reused, and its own folder check says what to do.
    source_config = SourceConfig(
        output_dir=str(out / "source"),
        model_name_or_path=args.model,
        dataset_name=args.source_dataset,
        num_train_epochs=args.source_epochs,
        num_train_samples=args.source_samples,
        logging_strategy="epoch",
        report_to="none",
    )
    source_model = out / "source" / MODEL_SUBDIR
    if finished_run(source_config.output_dir, run_identity("source", source_config)):
        say(f"[1/4] reusing the source model in {source_model} (--overwrite to refit)")
    else:
        say(f"[1/4] fitting {args.model} on {args.source_dataset}")
        record = run_source(source_config)
        say(f"      source test accuracy {100 * record['test_accuracy']:.2f}%")

    config_class, run = PROTECTIONS[args.method]
    options = ["--output_dir", str(out / args.method), "--model_name_or_path", str(source_model)]
    options += ["--source_dataset", args.source_dataset, "--target_dataset", args.target_dataset]
    options += ["--logging_strategy", "no"]
    protect_config = stage_config(config_class, args.protect_config, options, f"protect-{args.method}")
    protected_model = out / args.method / MODEL_SUBDIR
    if finished_run(protect_config.output_dir, run_identity("protect", protect_config, args.method)):
        say(f"[2/4] reusing the protected model in {protected_model}")
    else:
        say(f"[2/4] protecting it with {args.method} against {args.target_dataset}")
        record = run(protect_config)
        say(
            f"      source accuracy {100 * record['source_accuracy_before']:.2f}% -> "
            f"{100 * record['source_accuracy_after']:.2f}%  ({record['wall_time_s']:.0f} s)"
        )

    # Each method's audit has its own folder: an audit belongs to one model.
    audit = out / f"audit-{args.method}"
    attacks = args.attacks or ["full", "head-only", "lora-r4"] + (["full-masked"] if args.method == "ntp" else [])
    audit_args = EvaluateArguments(
        model_name_or_path=str(protected_model),
        original_model_name_or_path=str(source_model),
        target_dataset=args.target_dataset,
        suite=args.suite,
        attacks=attacks,
        counts=args.counts,
        seeds=args.seeds,
        output_dir=str(audit),
    )
    if finished_run(audit, run_identity("evaluate", audit_args), finished="report.json"):
        say(f"[3/4] reusing the audit in {audit}")
        report = read_report(audit / "report.json")
    else:
        say(f"[3/4] attacking it and the original on {args.target_dataset}: {', '.join(attacks)}; n = {args.counts}")
        report = run_evaluation(audit_args)
    write_card(protected_model, audit)
    say(f"[4/4] model card: {protected_model / 'README.md'}")
    say(f"      report and plot: {audit}   wall time {time.perf_counter() - start:.0f} s\n")
    print_tables(report_tables(report))


COMMANDS: dict[str, tuple[Callable[[Sequence[str]], None], str]] = {
    "fit-source": (fit_source_command, "fit the owner's source classifier with Trainer"),
    "protect-ntp": (protect_ntp_command, "non-transferable pruning (ADMM + Fisher regulariser) of a source model"),
    "protect-sophon": (protect_sophon_command, "SOPHON non-fine-tunable learning (simulated attackers + guard)"),
    "evaluate": (evaluate_command, "attack a checkpoint with a suite and measure SLC-AUC against scratch"),
    "tune": (tune_command, "search a protection's settings (Optuna): chosen on validation, audited on test"),
    "fit-ddpm": (fit_ddpm_command, "fit the owner's unconditional DDPM (a diffusers UNet) with Trainer"),
    "protect-sophon-diffusion": (
        protect_sophon_diffusion_command,
        "SOPHON for a DDPM pipeline (DoS loss on simulated fine-tuning)",
    ),
    "evaluate-diffusion": (
        evaluate_diffusion_command,
        "attack DDPM pipelines (full, LoRA) and measure restricted denoising MSE vs scratch",
    ),
    "card": (card_command, "write the Hub model card (model-index with SLC-AUC) into a model folder"),
    "push": (push_command, "upload a model folder with its card and plot to the Hub"),
    "demo": (demo_command, "the embedded default end to end: fit-source, protect, evaluate, card"),
}


# Options every command takes, read before the command's own.
GLOBAL_OPTIONS = {
    "--verbose": "show the Trainer's own progress bars and logs instead of one progress display per stage",
    "--debug": "show the full traceback of every error (also: HF_NTL_DEBUG=1); `--debug VALUE` is TrainingArguments'",
}


def _usage() -> str:
    lines = [f"  {name:<26} {summary}" for name, (_, summary) in COMMANDS.items()]
    options = [f"  {name:<26} {summary}" for name, summary in GLOBAL_OPTIONS.items()]
    return (
        "usage: hf-ntl COMMAND [--config file.yaml] [options]\n\ncommands:\n"
        + "\n".join(lines)
        + "\n\noptions of every command:\n"
        + "\n".join(options)
        + f"\n  {'--version':<26} print hf_ntl's version"
    )


def _take_flag(argv: list[str], flag: str) -> bool:
    """Remove hf-ntl's own `flag` from `argv`, saying whether it was there. A `--debug` followed by a value
    (`--debug underflow_overflow`) is `TrainingArguments`' option of that name and stays."""
    found = False
    for index in reversed(range(len(argv))):
        followed_by_value = index + 1 < len(argv) and not argv[index + 1].startswith("--")
        if argv[index] == flag and not followed_by_value:
            del argv[index]
            found = True
    return found


def main(argv: Sequence[str] | None = None) -> None:
    """Run `hf-ntl COMMAND ...`: input errors print one line and exit 2; bugs keep their traceback."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = _take_flag(argv, "--debug") or os.environ.get("HF_NTL_DEBUG", "") not in ("", "0")
    verbose = _take_flag(argv, "--verbose")
    if argv[:1] == ["--version"]:
        print(f"hf-ntl {version('hf_ntl')}")
        return
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage() + "\n\n`hf-ntl COMMAND --help` lists a command's options.")
        return
    name = argv[0]
    if name not in COMMANDS:
        print(f"hf-ntl: error: unknown command {name!r}; `hf-ntl --help` lists them.", file=sys.stderr)
        raise SystemExit(2)
    import datasets
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    from .evaluation import leave_process_group
    from .terminal import set_verbose, stop_displays

    set_verbose(verbose)
    # Weights load in milliseconds and data sets map in seconds here; the libraries' own bars for them
    # would bury the stage's progress. `--verbose` keeps them.
    for library in (transformers_logging, diffusers_logging):
        (library.enable_progress_bar if verbose else library.disable_progress_bar)()
    (datasets.enable_progress_bars if verbose else datasets.disable_progress_bars)()
    command, _ = COMMANDS[name]
    try:
        command(argv[1:])
        leave_process_group()
    except InputError as err:
        stop_displays()
        if debug:
            raise
        print(f"hf-ntl {name}: error: {' '.join(str(err).split())}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        stop_displays()
        if debug:
            raise
        # Every stage checkpoints as it goes: rerunning the same command resumes.
        print(
            f"hf-ntl {name}: interrupted (rerun the same command to resume from the last checkpoint)", file=sys.stderr
        )
        raise SystemExit(130) from None
    except BaseException:
        stop_displays()
        raise


if __name__ == "__main__":
    main()
