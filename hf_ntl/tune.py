"""`hf-ntl tune`: search a protection's settings for the owner's own model and data, choosing on validation.

Protections are sensitive to their hyper-parameters, and defaults picked on one pair of domains need not hold
on another. `run_tune` runs an Optuna study in which every trial protects the model with settings drawn from
the method's search space (`hf_ntl/search_spaces/METHOD.yaml`, or the user's) and audits it with a cheap,
declared proxy of the suite (its strongest attacks, fewer seeds and counts). The objective is the proxy's
worst-case SLC-AUC (lower is better); the owner's accuracy is a hard floor, and a trial below it is pruned. A
protection with a guard (SOPHON's) guards the floor itself unless the space or the fixed options set it. The chosen
trial must beat the unprotected original under the same proxy, or nothing is released.

Diffusion pipelines (`--method sophon-diffusion`) are searched the same way, with their own audit
(`evaluate-diffusion`): the objective is the proxy's worst-case *denoising* SLC-AUC (SLC-AUC with -ln of the restricted
denoising MSE in place of accuracy), and the floor is on the source denoising MSE (`--max_source_mse_ratio` times the
original's at most).

Honest by construction: trials never see a test split. Before the study, the source and target train splits
are each divided once (fixed by the data set, `validation_split`) into what trials train on and a validation
split, and written as data set folders (`OUTPUT_DIR/data/*`, `save_to_disk`) whose `test` split *is* that
validation split. Trials protect and audit on those folders only; source accuracy is measured on the source
validation split, the proxy's SLC-AUC on the target validation split (its worst-case attack chosen, as in every
audit, on a further split of the trials' target train data). Only the best trial's model is then audited with
the full suite on the real test split, its worst case chosen on the target validation split (which no trial
trained on), and carded with the search recorded.

OUTPUT_DIR holds:
    hf_ntl_tune.json           the study's settings: a rerun or another worker with others is refused
    data/source, data/target   the trials' data (train, and validation as `test`)
    study.db                   the Optuna study (default storage): rerunning the command resumes it
    trials/NNNN/               trial NNNN's protection (its own output_dir, resumable), proxy report, and for
                               the chosen trial its full audit on the test split (`audit/`)
    proxy_scratch/ATTACK.json  scratch's proxy runs, the same for every trial, computed once
    proxy_original.json        the unprotected original's proxy audit: the chosen trial must beat it
    model/                     the chosen trial's model with its record, card and trials plot
    tuning.json                the search: every trial's settings and figures

Several workers can share one study: run the same command in several processes, or on several machines
with `--storage postgresql://...` and an `--output_dir` on a file system they all see; each takes the next
trial while fewer than `--trials` have finished, and the first to finish runs the final audit.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import shutil
import socket
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import optuna
import torch
import yaml
from datasets import Dataset, DatasetDict
from optuna.trial import FrozenTrial, Trial, TrialState
from rich.console import RenderableType
from transformers import PreTrainedModel

from .artifacts import finished_run, read_record, replacing_directory, run_identity, write_record
from .attacks.finetune import AttackSpec, EncodedOnDemand, EncodedSplit
from .attacks.suite import load_suite
from .cards import TRIALS_PLOT, write_card
from .data import ImagePreprocessor, load_image_classification_dataset
from .data.loading import SOURCE_VALIDATION_SAMPLES, validation_split
from .errors import InputError
from .evaluation import (
    SCRATCH,
    EvaluateArguments,
    plan_evaluation,
    read_report,
    report_tables,
    run_attacks,
    run_evaluation,
    summarise,
)
from .evaluation_diffusion import (
    DenoisingPoint,
    DiffusionEvaluateArguments,
    DiffusionPlan,
    denoising_tables,
    plan_evaluation_diffusion,
    read_report_diffusion,
    run_denoising_attacks,
    run_evaluation_diffusion,
    summarise_denoising,
)
from .leakage import split_hashes_by_size, training_samples
from .metrics import predict_accuracy
from .metrics.denoising import mean_denoising_mse, timestep_grid
from .metrics.learning_curve import CurvePoint, check_counts
from .metrics.plots import plot_trials
from .models import load_classifier, load_ddpm
from .options import stage_config, yaml_to_argv
from .protect import DIFFUSION_PROTECTIONS, PROTECTIONS, diffusion_test_images
from .source import MODEL_SUBDIR
from .terminal import is_verbose, say, signed, table, titled, track

SEARCH_SPACES = Path(__file__).parent / "search_spaces"
DEFAULT_TRIALS = 20  # of a TPE study
# The attacks the bench's worst case picked most often (README, "Benchmarks"; picked on validation), as
# `make bench-quick` runs them: the proxy keeps those of the suite that apply to the trial's model (the
# masked one only to a pruned model). `lora-r16` and `sgdm-lr1e-3` tied for sixth (4 picks of 72); the LoRA one is
# kept, as the proxy's only LoRA attack.
PROXY_ATTACKS = (
    "adamw-wd2-cosine-2x",
    "full",
    "adamw-cosine-2x",
    "adamw-lr1e-4",
    "sgdm-lr1e-2",
    "lora-r16",
    "full-masked",
)
# Seconds between a running trial's heartbeats; a trial silent for GRACE seconds (its worker killed) is
# marked failed at the next start of any worker, and its settings are tried again (`requeue_failed`).
HEARTBEAT, GRACE = 60, 300
# Accuracies are multiples of 1/N: an accuracy exactly `max_source_drop` below the original keeps the floor.
FLOOR_TOLERANCE = 1e-9


@dataclass
class TuneArguments:
    """Which model to protect against which target, what to search, and how to judge a trial."""

    model_name_or_path: str = field(metadata={"help": "The source model to protect: folder or Hub id."})
    method: str = field(
        default="ntp",
        metadata={"help": f"Protection to tune: one of {[*PROTECTIONS, *DIFFUSION_PROTECTIONS]}."},
    )
    source_dataset: str = field(default="font-digits", metadata={"help": "The owner's domain."})
    target_dataset: str = field(default="uci-digits", metadata={"help": "The unauthorised domain."})
    trials: int | None = field(
        default=None,
        metadata={
            "help": "Finished (or pruned) trials after which workers stop taking new ones (default: 20 for TPE, "
            "the whole grid for --sampler grid)."
        },
    )
    search_space: str | None = field(
        default=None, metadata={"help": "YAML search space (default: the method's, in hf_ntl/search_spaces/)."}
    )
    protect_config: str | None = field(
        default=None, metadata={"help": "YAML of fixed protection options for every trial (e.g. a shorter schedule)."}
    )
    max_source_drop: float = field(
        default=0.02,
        metadata={
            "help": "Floor: a trial losing more source validation accuracy than this (0.02 = 2 points) is pruned."
        },
    )
    max_source_mse_ratio: float = field(
        default=1.1,
        metadata={
            "help": "Floor of a diffusion protection: a trial whose source validation denoising MSE exceeds this "
            "multiple of the original's (1.1: a tenth more) is pruned."
        },
    )
    source_validation_samples: int = field(
        default=SOURCE_VALIDATION_SAMPLES,
        metadata={
            "help": "Source train samples held out from every trial to measure the floor on (fit the source with "
            "`fit-source --validation_samples` at least this, so that they are images it never saw)."
        },
    )
    target_validation_samples: int = field(
        default=300,
        metadata={
            "help": "Target train samples held out from every trial: the proxy audit is scored on them and the final "
            "audit chooses its worst case on them."
        },
    )
    proxy_attacks: list[str] | None = field(
        default=None,
        metadata={"help": f"Attacks of the proxy audit (default: those of {list(PROXY_ATTACKS)} in the suite)."},
    )
    proxy_counts: list[int] = field(default_factory=lambda: [10, 50, 200], metadata={"help": "Proxy sample counts."})
    proxy_seeds: list[int] = field(default_factory=lambda: [0], metadata={"help": "Proxy seeds."})
    suite: str = field(default="default", metadata={"help": "Attack suite (proxy and final audit): name or YAML."})
    counts: list[int] = field(default_factory=lambda: [10, 50, 200], metadata={"help": "Final audit's counts."})
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2], metadata={"help": "Final audit's seeds."})
    pruner: str = field(
        default="median",
        metadata={"help": "`median`: stop a trial whose partial proxy audit is worse than the median; `none`."},
    )
    pruner_startup_trials: int = field(default=5, metadata={"help": "Finished trials before the pruner acts."})
    sampler: str = field(
        default="tpe",
        metadata={
            "help": "`tpe`: Optuna's TPE over the space; `grid`: every combination of a space of `choices` once (a "
            "sweep; it ends when the grid is done or --trials have finished)."
        },
    )
    sampler_seed: int | None = field(
        default=None,
        metadata={
            "help": "Seed of the sampler: for TPE give each worker its own, or none; a grid's orders its points, so "
            "every worker of a grid study takes the same."
        },
    )
    storage: str | None = field(
        default=None, metadata={"help": "Optuna storage URL (default: sqlite:///OUTPUT_DIR/study.db)."}
    )
    study_name: str = field(default="hf-ntl-tune", metadata={"help": "The study's name in the storage."})
    output_dir: str = field(default="runs/tune", metadata={"help": "Data, trials, the best model and its audit."})

    def __post_init__(self) -> None:
        checks = [
            (
                self.method in PROTECTIONS or self.method in DIFFUSION_PROTECTIONS,
                f"method must be one of {[*PROTECTIONS, *DIFFUSION_PROTECTIONS]}, got {self.method!r}.",
            ),
            (self.trials is None or self.trials >= 1, f"trials must be at least 1, got {self.trials}."),
            (0 <= self.max_source_drop <= 1, f"max_source_drop is an accuracy in [0, 1], got {self.max_source_drop}."),
            (self.max_source_mse_ratio >= 1, f"max_source_mse_ratio must be >= 1, got {self.max_source_mse_ratio}."),
            (
                len(set(self.proxy_counts)) > 1 and len(set(self.counts)) > 1,
                "SLC-AUC needs two sample counts or more: give at least two --proxy_counts and --counts.",
            ),
            (self.pruner in ("median", "none"), f"pruner must be 'median' or 'none', got {self.pruner!r}."),
            (self.sampler in ("tpe", "grid"), f"sampler must be 'tpe' or 'grid', got {self.sampler!r}."),
            (self.proxy_seeds and self.seeds, "give at least one seed for the proxy and for the final audit."),
            (
                self.target_validation_samples >= 10,
                "target_validation_samples must be at least 10: the final audit chooses its worst case on them.",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise InputError(message)

    @property
    def diffusion(self) -> bool:
        """Whether the method protects a diffusion pipeline (else a classifier)."""
        return self.method in DIFFUSION_PROTECTIONS

    @property
    def proxy_validation_samples(self) -> int:
        """The trials' target samples the proxy audit chooses its worst case on (its evaluator's default), which
        the trials' protections leave out of their data."""
        return (DiffusionEvaluateArguments if self.diffusion else EvaluateArguments).validation_samples

    @property
    def source_key(self) -> str:
        """The trials' source figure, as records and summaries name it."""
        return "source_denoising_mse" if self.diffusion else "source_accuracy"

    def protection(self) -> tuple[type, Callable[..., dict[str, Any]]]:
        """The method's configuration class and the function that runs it."""
        return {**PROTECTIONS, **DIFFUSION_PROTECTIONS}[self.method]


# --------------------------------------------------------------------------------------------
# The search space


@dataclass(frozen=True)
class Parameter:
    """One searched option: a float or int range (`log` scale, `step`), or a list of `choices`."""

    name: str
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple[Any, ...] | None = None

    def suggest(self, trial: Trial) -> Any:
        if self.choices is not None:
            return trial.suggest_categorical(self.name, list(self.choices))
        if isinstance(self.low, int) and isinstance(self.high, int):
            return trial.suggest_int(self.name, self.low, self.high, step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.name, self.low, self.high, step=self.step, log=self.log)

    def contains(self, value: Any) -> bool:
        if self.choices is not None:
            return value in self.choices
        return isinstance(value, int | float) and self.low <= value <= self.high

    def describe(self) -> str:
        if self.choices is not None:
            return "one of " + ", ".join(map(str, self.choices))
        return f"{self.low:g} .. {self.high:g}" + (" (log)" if self.log else "")


def load_search_space(path: str | Path, config_class: type) -> list[Parameter]:
    """The `Parameter`s of a search-space YAML, each checked to be an option of `config_class` with a valid range."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"search space {path} does not exist.")
    try:
        content = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise InputError(f"{path} is not valid YAML: {' '.join(str(err).split())}") from err
    if not isinstance(content, dict) or not content:
        raise InputError(f"{path} must map option names to distributions, e.g. `alpha: {{low: 0.1, high: 10}}`.")
    options = {f.name for f in fields(config_class)}
    unknown = sorted(set(content) - options)
    if unknown:
        raise InputError(f"{path}: {unknown} are not options of this protection (see `hf-ntl protect-* --help`).")
    space = []
    for name, spec in content.items():
        keys = set(spec) if isinstance(spec, dict) else set()
        if not isinstance(spec, dict) or not (
            keys == {"choices"} or {"low", "high"} <= keys <= {"low", "high", "log", "step"}
        ):
            raise InputError(
                f"{path}: {name} must be `{{low, high[, log, step]}}` or `{{choices: [...]}}`, got {spec!r}."
            )
        if "choices" in spec:
            if not isinstance(spec["choices"], list) or not spec["choices"]:
                raise InputError(f"{path}: {name}'s choices must be a non-empty list.")
            space.append(Parameter(name, choices=tuple(spec["choices"])))
            continue
        low, high = spec["low"], spec["high"]
        if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in (low, high)) or not low < high:
            raise InputError(f"{path}: {name} needs numbers low < high, got {low!r} and {high!r}.")
        if spec.get("log") and low <= 0:
            raise InputError(f"{path}: {name} is on a log scale, so low must be positive, got {low}.")
        step = spec.get("step")
        if step is not None and (spec.get("log") or not step > 0 or isinstance(low, int) != isinstance(step, int)):
            raise InputError(f"{path}: {name}'s step must be a positive {type(low).__name__}, without `log`.")
        space.append(Parameter(name, low, high, bool(spec.get("log", False)), step))
    return space


def default_search_space(method: str) -> Path:
    path = SEARCH_SPACES / f"{method}.yaml"
    if not path.is_file():
        raise InputError(f"No search space ships for {method!r}: write one and pass it with --search_space.")
    return path


# --------------------------------------------------------------------------------------------
# The trials' data: train splits less validation splits, the validation splits as `test`


def trial_data(name: str, validation_samples: int, image_size: int) -> DatasetDict:
    """`name`'s train split as the trials see it: `train` less `validation_samples`, and those as `test`.

    The validation samples are fixed by the data set (`validation_split`): every worker and rerun gets the same.
    """
    train = load_image_classification_dataset(name, image_size=image_size)["train"]
    if not 0 < validation_samples < len(train):
        raise InputError(
            f"{validation_samples} validation samples cannot be held out of {name}'s {len(train)} train samples."
        )
    validation, rest = validation_split(train["label"], validation_samples)
    return DatasetDict(train=train.select(rest), test=train.select(validation))


def trained_on_validation(args: TuneArguments, validation: Dataset, image_size: int) -> int | None:
    """How many of the source validation images the source model's records (and those of the models it came from)
    say were trained on; `None` when no record names any samples (a Hub checkpoint: nothing says what it saw).

    The floor is meant for images the model never saw: memorised accuracy is what retraining loses first, so a
    floor on such images overstates what a setting costs the owner and rejects settings that keep the owner's
    accuracy on new images.
    """
    sets, _ = training_samples(args.model_name_or_path)
    if not sets:
        return None
    hashes = split_hashes_by_size(
        validation,
        image_size,
        lambda size: trial_data(args.source_dataset, args.source_validation_samples, size)["test"],
    )
    trained: set[str] = set()
    for sample_set in sets.values():
        trained |= hashes(sample_set.image_size) & set(sample_set.hashes)
    return len(trained)


# --------------------------------------------------------------------------------------------
# The study


def tune_identity(args: TuneArguments, space: list[Parameter], proxy: list[str]) -> dict[str, Any]:
    """What makes a study this study; a rerun (or another worker) with other settings is refused."""
    protect_options = yaml.safe_load(Path(args.protect_config).read_text()) if args.protect_config else None
    # Not part of it: how many trials, where the study is kept, how TPE samples, how trials are pruned, the final
    # audit's grid. A grid's seed is: it orders the points, and a point is known to every worker by its number.
    kept = ("trials", "storage", "study_name", "output_dir", "pruner", "pruner_startup_trials")
    kept += ("sampler_seed",) if args.sampler == "tpe" else ()
    kept += ("counts", "seeds")
    kept += ("max_source_drop",) if args.diffusion else ("max_source_mse_ratio",)  # the other kind's floor
    settings = {f.name: getattr(args, f.name) for f in fields(args) if f.name not in kept}
    settings["search_space"] = [vars(parameter) | {"choices": parameter.choices} for parameter in space]
    settings["proxy_attacks"] = proxy  # as resolved: the default list may change between versions
    settings["protect_config"] = protect_options
    settings["guard"] = guard_at_floor(args, space)  # trials run with a guard at the floor are another study
    return json.loads(json.dumps(settings, default=str))


def claim_output_folder(output: Path, identity: dict[str, Any]) -> None:
    """Make `output` this study's before anything is written to it: its data, trials and scratch runs belong
    to one study; another study's folder is refused (the data it holds would silently be reused)."""
    output.mkdir(parents=True, exist_ok=True)
    path = output / "hf_ntl_tune.json"
    if not path.is_file():
        path.write_text(json.dumps(identity, indent=2, sort_keys=True) + "\n")
        return
    recorded = json.loads(path.read_text())
    if recorded != identity:
        changed = sorted(k for k in recorded.keys() | identity.keys() if recorded.get(k) != identity.get(k))
        raise InputError(
            f"{output} holds a study started with other settings (differing in {', '.join(changed)}): use another "
            "--output_dir, or the original settings to resume it."
        )


def feasible(trial: FrozenTrial) -> bool:
    """A finished trial that kept the source floor (the only kind that can be chosen).

    The floor is the trial's Optuna constraint `source_floor` (floor minus source accuracy, <= 0 when kept), which
    TPE also reads: a trial below the floor informs the sampler as infeasible.
    """
    return trial.state == TrialState.COMPLETE and trial.constraints.get("source_floor", 0.0) <= FLOOR_TOLERANCE


def grid(space: list[Parameter]) -> dict[str, list[Any]]:
    """The space as a grid, each option's choices; a space with a range has none."""
    ranges = [p.name for p in space if p.choices is None]
    if ranges:
        raise InputError(
            f"--sampler grid needs every option of the search space as `{{choices: [...]}}`; {ranges} are ranges."
        )
    return {p.name: list(p.choices) for p in space}


def planned_trials(args: TuneArguments, space: list[Parameter]) -> int:
    """How many trials the study runs: --trials (20 for TPE by default), at most a grid's size (all by default)."""
    if args.sampler == "tpe":
        return args.trials or DEFAULT_TRIALS
    size = math.prod(len(choices) for choices in grid(space).values())
    return min(args.trials or size, size)


def make_sampler(args: TuneArguments, space: list[Parameter]) -> optuna.samplers.BaseSampler:
    """TPE, or a grid over every combination of the space's `choices`."""
    if args.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=args.sampler_seed)
    return optuna.samplers.GridSampler(grid(space), seed=args.sampler_seed)


def open_study(args: TuneArguments, identity: dict[str, Any], space: list[Parameter]) -> optuna.Study:
    """Create or load the study; refuse one made with other settings."""
    url = args.storage or f"sqlite:///{(Path(args.output_dir) / 'study.db').resolve()}"
    # SQLite locks the whole file on writes: wait for another worker rather than fail.
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None
    with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna 5 but have been stable since 2.x
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        storage = optuna.storages.RDBStorage(
            url, engine_kwargs=engine, heartbeat_interval=HEARTBEAT, grace_period=GRACE
        )
    pruner = (
        optuna.pruners.MedianPruner(n_startup_trials=args.pruner_startup_trials)
        if args.pruner == "median"
        else optuna.pruners.NopPruner()
    )
    study = optuna.create_study(
        storage=storage,
        study_name=args.study_name,
        direction="minimize",
        sampler=make_sampler(args, space),
        pruner=pruner,
        load_if_exists=True,
    )
    recorded = study.user_attrs.get("identity")
    if recorded is None:
        study.set_user_attr("identity", identity)
    elif recorded != identity:
        changed = sorted(k for k in recorded.keys() | identity.keys() if recorded.get(k) != identity.get(k))
        raise InputError(
            f"The study {args.study_name!r} in {url} was started with other settings (differing in "
            f"{', '.join(changed)}): use another --output_dir and --study_name, or the original settings."
        )
    return study


def enqueue_defaults(study: optuna.Study, space: list[Parameter], defaults: Any, sampler: str) -> None:
    """Make the method's defaults the first trial of a new study, so that the search is measured against them,
    when they are a point of the search space.

    A grid holds them already when they lie in it (and queueing them would try that point twice); the trial with
    the defaults' values is marked as theirs whichever way it came (`Objective`).
    """
    if study.trials:
        return
    values = {p.name: getattr(defaults, p.name) for p in space}
    # A default of None is set by the method from the model (NTP's sparsity): no point of the space is it.
    missing = [
        f"{p.name} (set from the model)" if values[p.name] is None else f"{p.name}={values[p.name]}"
        for p in space
        if values[p.name] is None or not p.contains(values[p.name])
    ]
    if missing:
        say(f"no defaults trial: the defaults of {', '.join(missing)} are not points of the search space")
    elif sampler == "tpe":
        study.enqueue_trial(values)


def requeue_failed(study: optuna.Study) -> None:
    """Queue again the settings of every failed trial (interrupted, or its worker killed) not tried since.

    The new trial keeps the failed one's folder (`trial_folder`), so its protection resumes from the last
    checkpoint rather than starting over.
    """
    # A trial whose worker was killed is still RUNNING until its heartbeat is GRACE seconds old: mark it failed now.
    with warnings.catch_warnings():  # "experimental" since Optuna 2.9, like heartbeats (`open_study`)
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    latest = {}  # folder -> the last trial that used it
    for trial in study.get_trials(deepcopy=False):
        latest[trial.user_attrs.get("resumes", trial.number)] = trial
    for folder, trial in latest.items():
        if trial.state == TrialState.FAIL:
            # As `Study.enqueue_trial` queues it, keeping a grid's point: `GridSampler` reads it back when it ends.
            system_attrs = {"fixed_params": trial.params}
            system_attrs |= {
                key: trial.system_attrs[key] for key in ("grid_id", "search_space") if key in trial.system_attrs
            }
            study.add_trial(
                optuna.trial.create_trial(
                    state=TrialState.WAITING, system_attrs=system_attrs, user_attrs={"resumes": folder}
                )
            )


def finished_trials(study: optuna.Study) -> list[FrozenTrial]:
    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))


def trial_folder(output_dir: Path, trial: Trial | FrozenTrial) -> Path:
    """`trials/NNNN`, NNNN the trial's number, or that of the failed trial whose settings it tries again."""
    return output_dir / "trials" / f"{trial.user_attrs.get('resumes', trial.number):04d}"


@contextmanager
def exclusive(lock_file: Path) -> Iterator[None]:
    """Hold an exclusive lock on `lock_file` (workers sharing an output folder take turns)."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with lock_file.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# --------------------------------------------------------------------------------------------
# One trial: protect, check the floor, audit with the proxy attack by attack


def guard_at_floor(args: TuneArguments, space: list[Parameter]) -> dict[str, float]:
    """The guard options that make a protection's guard (SOPHON's) keep the owner's floor, unless the search space
    or the fixed options set the guard; nothing for a method without one.

    The guard restores the last state that passed it. At SOPHON's default (80%) it let trials fall below the floor
    and be pruned, when a state they passed through above the floor was a candidate. The floor is relative (at most
    `max_source_drop` below the original), and so is the guard set here (`guard_max_drop`, on its own held-out source
    train samples); its absolute threshold is lifted, so that a model below 80% can be tuned too. A diffusion
    protection's guard is relative already: `guard_max_mse_ratio` takes `max_source_mse_ratio`.
    """
    config_class, _ = args.protection()
    if args.diffusion:
        guard = {"guard_max_mse_ratio": args.max_source_mse_ratio}
    else:
        guard = {"guard_max_drop": args.max_source_drop, "guard_threshold": 0.0}
    fixed = yaml_to_argv(args.protect_config) if args.protect_config else []
    if not set(guard) <= {f.name for f in fields(config_class)}:
        return {}
    if set(guard) & ({p.name for p in space} | {option.removeprefix("--") for option in fixed}):
        return {}
    return guard


class Objective:
    """A trial of the study: protect with the trial's settings, then audit with the proxy on validation."""

    def __init__(self, args: TuneArguments, space: list[Parameter], proxy: list[str], original_source: float) -> None:
        self.args, self.space, self.proxy = args, space, proxy
        self.floor = source_floor(args, original_source)
        self.output = Path(args.output_dir)
        self.config_class, self.protect = args.protection()
        defaults = stage_config(self.config_class, args.protect_config, [], f"protect-{args.method}")
        self.default_values = {parameter.name: getattr(defaults, parameter.name) for parameter in space}
        self.guard_options = guard_at_floor(args, space)
        self.original_weights: dict[str, torch.Tensor] | None = None

    def protection_config(self, folder: Path, values: dict[str, Any]) -> Any:
        options = ["--output_dir", str(folder), "--model_name_or_path", self.args.model_name_or_path]
        options += ["--source_dataset", str(self.output / "data" / "source")]
        options += ["--target_dataset", str(self.output / "data" / "target"), "--logging_strategy", "no"]
        options += [f"--{name}={value}" for name, value in self.guard_options.items()]
        options += ["--audit_validation_samples", str(self.args.proxy_validation_samples)]
        for name, value in values.items():
            options += [f"--{name}", str(value)]
        return stage_config(self.config_class, self.args.protect_config, options, f"protect-{self.args.method}")

    def __call__(self, trial: Trial) -> float:
        values = {parameter.name: parameter.suggest(trial) for parameter in self.space}
        if values == self.default_values:
            trial.set_user_attr("defaults", True)
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")  # who ran it, when several share a study
        folder = trial_folder(self.output, trial)
        config = self.protection_config(folder, values)
        if finished_run(folder, run_identity("protect", config, self.args.method)):
            record = read_record(folder / MODEL_SUBDIR)  # a retried trial whose protection had finished
        else:
            record = self.protect(config)
        # The finished model is all a trial needs from here on; checkpoints of every trial would fill the disk.
        for checkpoint in folder.glob("checkpoint-*"):
            shutil.rmtree(checkpoint)
        # Measured by the protection on its source data's `test` split: the source validation split.
        figure, shortfall = self.source_figure(record)
        trial.set_user_attr(self.args.source_key, figure)
        trial.set_constraint("source_floor", shortfall)  # feasible when <= 0 (`feasible`)
        # A trial below the floor can never be chosen: its audit is skipped, except the defaults', which the
        # search is measured against.
        if shortfall > FLOOR_TOLERANCE and not trial.user_attrs.get("defaults"):
            trial.set_user_attr("pruned_by", "source floor")
            raise optuna.TrialPruned(f"source figure {figure:.4f} is beyond the floor {self.floor:.4f}")
        if self.is_original(folder / MODEL_SUBDIR):
            # A guard restored the starting weights: the proxy would repeat the original's runs, seed for seed. Its
            # running worst case is reported as an audit would, so that the median pruner counts it fully.
            trial.set_user_attr("unchanged", True)
            original = self.original_proxy()
            for step, worst_case in enumerate(original["worst_case_by_attack"]):
                trial.report(worst_case, step)
            return original["slc_auc"]["worst_case"]["slc_auc"]
        return self.proxy_audit(trial, folder)

    def source_figure(self, record: dict[str, Any]) -> tuple[float, float]:
        """A protection record's source figure (a classifier's accuracy, a pipeline's denoising MSE) and how far it
        is beyond the floor (<= 0: it kept it)."""
        if self.args.diffusion:
            # Against the original's MSE as this trial's protection measured it: the same images, noise and grid.
            mse = record["denoising_mse_after"]["source"]
            return mse, mse - self.args.max_source_mse_ratio * record["denoising_mse_before"]["source"]
        accuracy = record["source_accuracy_after"]
        return accuracy, self.floor - accuracy

    def weights(self, model_path: str | Path) -> dict[str, torch.Tensor]:
        model = load_ddpm(model_path)[0] if self.args.diffusion else load_classifier(model_path)
        return model.state_dict()

    def is_original(self, model_path: Path) -> bool:
        """Whether the model at `model_path` has exactly the original's weights."""
        if self.original_weights is None:
            self.original_weights = self.weights(self.args.model_name_or_path)
        weights = self.weights(model_path)
        return weights.keys() == self.original_weights.keys() and all(
            torch.equal(weights[name], self.original_weights[name]) for name in weights
        )

    def proxy_audit(self, trial: Trial, folder: Path) -> float:
        """Attack the trial's model with the proxy; after each attack the worst case so far is reported to the
        pruner, which may stop a trial that is already worse than most."""

        def report(step: int, attack: str, worst_case: float) -> None:
            trial.report(worst_case, step)
            if trial.should_prune():
                trial.set_user_attr("pruned_by", f"proxy audit after {attack}")
                raise optuna.TrialPruned(f"worst case after {step + 1} attacks: {worst_case:+.3f}")

        proxy_report = self.run_proxy(folder / MODEL_SUBDIR, f"trial {trial.number} proxy audit", report)
        trial.set_user_attr("slc_auc_normalized", proxy_report["slc_auc"]["worst_case"]["slc_auc_normalized"])
        trial.set_user_attr("worst_case_attacks", proxy_report["worst_case_attacks"])
        (folder / "proxy_report.json").write_text(json.dumps(proxy_report, indent=2) + "\n")
        return proxy_report["slc_auc"]["worst_case"]["slc_auc"]

    def original_proxy(self) -> dict[str, Any]:
        """The unprotected original under the same proxy: the figure a chosen trial must beat.

        Without it a search can "win" with a trial that changed nothing (a SOPHON guard that restored the starting
        weights keeps any floor). Computed once, by the first worker, and kept in `proxy_original.json`.
        """
        path = self.output / "proxy_original.json"
        with exclusive(self.output / ".original.lock"):
            if not path.is_file():
                proxy_report = self.run_proxy(Path(self.args.model_name_or_path), "the original's proxy audit")
                staging = path.with_suffix(f".{socket.gethostname()}-{os.getpid()}.partial")
                staging.write_text(json.dumps(proxy_report, indent=2) + "\n")
                os.replace(staging, path)
        return json.loads(path.read_text())

    def run_proxy(
        self, model_path: Path, description: str, after_attack: Callable[[int, str, float], None] | None = None
    ) -> dict[str, Any]:
        """Audit `model_path` with the proxy on the target folder (scored on its `test`, the target validation
        split), one attack at a time, calling `after_attack(step, attack, worst case so far)` after each.
        Scratch's runs are the same for every model and are shared."""
        if self.args.diffusion:
            return self.run_proxy_diffusion(model_path, description, after_attack)
        args = self.args
        audit = EvaluateArguments(
            model_name_or_path=str(model_path),
            target_dataset=str(self.output / "data" / "target"),
            suite=args.suite,
            counts=args.proxy_counts,
            seeds=args.proxy_seeds,
            validation_samples=args.proxy_validation_samples,
        )
        plan = plan_evaluation(audit)
        suite = [spec for spec in plan.suite if spec.name in self.proxy]
        model = plan.models["model"]
        train = EncodedOnDemand(plan.splits["train pool"], plan.preprocessor)
        validation = EncodedSplit.from_dataset(plan.splits["validation"], plan.preprocessor)
        scored = EncodedSplit.from_dataset(plan.splits["test"], plan.preprocessor)  # the target validation split
        points: list[CurvePoint] = []
        worst_cases: list[float] = []  # after each attack
        for step, spec in enumerate(track(suite, description, len(suite), unit="attacks")):
            points += self.scratch_points(spec, model, train, validation, scored)
            points += run_attacks(
                {"model": model}, train, validation, scored, [spec], plan.counts, plan.seeds, False, with_scratch=False
            )
            summary = summarise(points, suite[: step + 1], ["model"])
            worst_cases.append(summary["slc_auc"]["model"]["worst_case"]["slc_auc"])
            if after_attack is not None:
                after_attack(step, spec.name, worst_cases[-1])
        return {
            "model": str(model_path),
            "attacks": [spec.name for spec in suite],
            "counts": plan.counts,
            "seeds": plan.seeds,
            "slc_auc": summary["slc_auc"]["model"],
            "worst_case_attacks": summary["worst_case_attacks"]["model"],
            "worst_case_by_attack": worst_cases,
            "points": [p.to_dict() for p in points],
        }

    def scratch_points(
        self,
        spec: AttackSpec,
        model: PreTrainedModel,
        train: EncodedOnDemand,
        validation: EncodedSplit,
        scored: EncodedSplit,
    ) -> list[CurvePoint]:
        """Scratch's proxy runs under `spec`, computed by the first trial that needs them and kept on disk."""
        path = self.output / "proxy_scratch" / f"{spec.name}.json"
        if not path.is_file():
            points = run_attacks(
                {}, train, validation, scored, [spec], self.args.proxy_counts, self.args.proxy_seeds, False, model
            )
            path.parent.mkdir(parents=True, exist_ok=True)
            staging = path.with_suffix(f".{socket.gethostname()}-{os.getpid()}.partial")
            staging.write_text(json.dumps([p.to_dict() for p in points]))
            os.replace(staging, path)
        return [CurvePoint(**values) for values in json.loads(path.read_text())]

    def run_proxy_diffusion(
        self, model_path: Path, description: str, after_attack: Callable[[int, str, float], None] | None = None
    ) -> dict[str, Any]:
        """`run_proxy` for a diffusion pipeline: its worst case is the denoising SLC-AUC (`summarise_denoising`)."""
        args = self.args
        audit = DiffusionEvaluateArguments(
            model_name_or_path=str(model_path),
            target_dataset=str(self.output / "data" / "target"),
            source_dataset=str(self.output / "data" / "source"),
            suite=args.suite,
            attacks=self.proxy,
            counts=args.proxy_counts,
            seeds=args.proxy_seeds,
            validation_samples=args.proxy_validation_samples,
            sample_images=0,
        )
        plan = plan_evaluation_diffusion(audit)
        points: list[DenoisingPoint] = []
        worst_cases: list[float] = []
        for step, spec in enumerate(track(plan.suite, description, len(plan.suite), unit="attacks")):
            points += self.diffusion_scratch_points(plan, spec.name)
            points += run_denoising_attacks(plan, ["model"], [spec], progress=False)
            summary = summarise_denoising(points, plan.suite[: step + 1], ["model", SCRATCH], plan.counts)
            worst_cases.append(summary["slc_auc"]["model"]["slc_auc"])
            if after_attack is not None:
                after_attack(step, spec.name, worst_cases[-1])
        return {
            "model": str(model_path),
            "attacks": [spec.name for spec in plan.suite],
            "counts": plan.counts,
            "seeds": list(args.proxy_seeds),
            "slc_auc": {"worst_case": summary["slc_auc"]["model"]},
            "worst_case_attacks": summary["strongest_attack"]["model"],
            "worst_case_by_attack": worst_cases,
            "samples": plan.samples,  # the trials' data folders, never a test split
            "points": [p.to_dict() for p in points],
        }

    def diffusion_scratch_points(self, plan: DiffusionPlan, attack: str) -> list[DenoisingPoint]:
        """Scratch's proxy runs under `attack`, computed by the first trial that needs them and kept on disk."""
        path = self.output / "proxy_scratch" / f"{attack}.json"
        if not path.is_file():
            spec = next(spec for spec in plan.suite if spec.name == attack)
            points = run_denoising_attacks(plan, [SCRATCH], [spec], progress=False)
            path.parent.mkdir(parents=True, exist_ok=True)
            staging = path.with_suffix(f".{socket.gethostname()}-{os.getpid()}.partial")
            staging.write_text(json.dumps([p.to_dict() for p in points]))
            os.replace(staging, path)
        points = json.loads(path.read_text())
        # JSON made the step numbers strings.
        for values in points:
            values["restricted_mse_by_step"] = {int(k): v for k, v in values["restricted_mse_by_step"].items()}
        return [DenoisingPoint(**values) for values in points]


def source_floor(args: TuneArguments, original_source: float) -> float:
    """The floor on the source figure, for display: the lowest accuracy, or the highest denoising MSE, a trial
    may reach (a diffusion trial is judged against the original's MSE as its own protection measured it)."""
    if args.diffusion:
        return args.max_source_mse_ratio * original_source
    return original_source - args.max_source_drop


def format_source(args: TuneArguments, value: float) -> str:
    """A source figure as a person reads it."""
    return f"source MSE {value:.4f}" if args.diffusion else f"source {100 * value:.1f}%"


def format_value(value: Any) -> str:
    """A setting as a person reads it: floats to three significant digits."""
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def format_settings(params: dict[str, Any], separator: str = "  ") -> str:
    """A trial's settings on one line."""
    return separator.join(f"{name}={format_value(value)}" for name, value in params.items())


def trial_line(args: TuneArguments, study: optuna.Study, trial: FrozenTrial, trials: int) -> str:
    """One line per finished trial (of `trials`): its settings, its figures, the best so far."""
    settings = format_settings(trial.params)
    source = trial.user_attrs.get(args.source_key)
    label = f"trial {trial.number} ({len(finished_trials(study))}/{trials})"
    line = f"{label}{' defaults' if trial.user_attrs.get('defaults') else ''}  {settings}"
    if source is not None:
        line += f"  {format_source(args, source)}"
    if trial.state == TrialState.COMPLETE:
        line += f"  proxy worst-case SLC-AUC {trial.value:+.3f}" + ("" if feasible(trial) else " (below the floor)")
        if trial.user_attrs.get("unchanged"):
            line += " (the original's weights: a guard restored them)"
    elif trial.state == TrialState.PRUNED:
        line += f"  pruned ({trial.user_attrs.get('pruned_by', 'pruner')})"
    else:
        line += f"  {trial.state.name.lower()}"
    completed = [t for t in study.get_trials(deepcopy=False) if feasible(t)]
    if completed:
        best = min(completed, key=lambda t: t.value)
        line += f"  | best {best.value:+.3f} (trial {best.number})"
    return line


# --------------------------------------------------------------------------------------------
# The command


def proxy_attacks(args: TuneArguments) -> list[str]:
    """The proxy's attack names, checked against the suite before any trial runs.

    A diffusion pipeline's proxy defaults to its whole suite: it has few attacks, none of them dominated.
    """
    if args.diffusion:
        suite = DiffusionEvaluateArguments(model_name_or_path="", suite=args.suite, attacks=args.proxy_attacks)
        return [spec.name for spec in suite.attack_suite()]  # an unknown name is an error now
    if args.proxy_attacks:
        load_suite(args.suite, pruned=True, only=args.proxy_attacks)  # an unknown name is an error now
        if not {spec.name for spec in load_suite(args.suite)} & set(args.proxy_attacks):
            raise InputError(
                f"The proxy {args.proxy_attacks} has no attack for an unpruned model, so the original could not be "
                "audited with it: add one of the suite's other attacks to --proxy_attacks."
            )
        return list(args.proxy_attacks)
    available = {spec.name for spec in load_suite(args.suite, pruned=True)}
    chosen = [name for name in PROXY_ATTACKS if name in available]
    if not chosen:
        raise InputError(
            f"None of the proxy attacks {list(PROXY_ATTACKS)} is in suite {args.suite}: pass --proxy_attacks."
        )
    return chosen


def check_space_values(space: list[Parameter], config_class: type, protect_config: str | None, method: str) -> None:
    """Build the method's configuration with each end of every range and each choice: a value the option cannot
    take (a type, a range its own checks refuse) is an error now, not at the trial that draws it."""
    for parameter in space:
        if parameter.name == "audit_validation_samples":
            raise InputError(
                "search space: audit_validation_samples is not a setting to search: it says which target samples "
                "the proxy audit chooses on, and the trials must leave exactly those out."
            )
        values = parameter.choices if parameter.choices is not None else (parameter.low, parameter.high)
        for value in values:
            try:
                stage_config(config_class, protect_config, [f"--{parameter.name}", str(value)], f"protect-{method}")
            except InputError as err:
                raise InputError(f"search space: {parameter.name} = {value!r} is refused: {err}") from err


def run_tune(args: TuneArguments) -> dict[str, Any]:
    """Run (or resume, or join) the study, then audit the best trial's model on the test split and card it.

    Returns the search summary written to `tuning.json`.
    """
    config_class, _ = args.protection()
    space = load_search_space(args.search_space or default_search_space(args.method), config_class)
    proxy = proxy_attacks(args)
    trials = planned_trials(args, space)  # a grid's options are checked here, before any data is loaded
    # Fixed options and every value of the space are checked now, not at the first trial that meets them.
    defaults = stage_config(config_class, args.protect_config, [], f"protect-{args.method}")
    check_space_values(space, config_class, args.protect_config, args.method)
    # A pipeline's source MSE is measured with fixed noise (`seed`) on a grid (`guard_timesteps`): trials drawing
    # their own would each be measured on other terms than the original's figure shown beside them.
    measuring = sorted({"seed", "guard_timesteps"} & {p.name for p in space}) if args.diffusion else []
    if measuring:
        raise InputError(
            f"search space: {measuring} set how source denoising MSE is measured and cannot be searched; fix them "
            "in --protect_config instead."
        )
    output = Path(args.output_dir)
    identity = tune_identity(args, space, proxy)
    if args.diffusion:
        unet, scheduler = load_ddpm(args.model_name_or_path)
        image_size = unet.config.sample_size
    else:
        image_size = ImagePreprocessor.from_pretrained(args.model_name_or_path).image_size
    # Both data sets load and split before the folder is claimed: a mistyped name must not lock it to a study.
    data = {
        role: trial_data(name, held_out, image_size)
        for role, name, held_out in (
            ("source", args.source_dataset, args.source_validation_samples),
            ("target", args.target_dataset, args.target_validation_samples),
        )
    }
    # The final audit draws its learning curves from the trials' target train split (its validation split is the
    # held-out one): a grid it cannot give is an error now, not after the study.
    check_counts(args.counts, len(data["target"]["train"]), what="the target train split less the held-out samples")
    # A pipeline's floor is its denoising MSE, and fit-ddpm fits on the whole train split: classifiers only.
    memorised = None if args.diffusion else trained_on_validation(args, data["source"]["test"], image_size)
    if memorised:
        say(
            f"warning: the source model (or one it came from) was trained on {memorised} of the "
            f"{args.source_validation_samples} source validation images, so the floor is measured partly on "
            "memorised accuracy, which any retraining lowers first; fit it without them (`hf-ntl fit-source "
            f"--validation_samples {args.source_validation_samples}`) for a floor on images it never saw"
        )
    with exclusive(output / ".data.lock"):
        claim_output_folder(output, identity)
        for role, dataset in data.items():
            if not (output / "data" / role / "dataset_dict.json").is_file():  # written once, by the first worker
                with replacing_directory(output / "data" / role) as staging:
                    dataset.save_to_disk(str(staging))
    # The original's source figure on the source validation split, measured as a trial's protection measures its own.
    if args.diffusion:
        images = diffusion_test_images(data["source"]["test"], unet)
        grid = timestep_grid(scheduler, defaults.guard_timesteps)
        original_source = mean_denoising_mse(unet, scheduler, images, grid, seed=defaults.seed)
    else:
        preprocessor = ImagePreprocessor.from_pretrained(args.model_name_or_path)
        encoded = EncodedSplit.from_dataset(data["source"]["test"], preprocessor)
        model = load_classifier(args.model_name_or_path)
        original_source = predict_accuracy(model, encoded.pixel_values, encoded.labels)

    if not is_verbose():
        optuna.logging.set_verbosity(optuna.logging.WARNING)
    # Workers starting together take turns to create the study (SQLite's tables), check it and queue trials.
    with exclusive(output / ".study.lock"):
        study = open_study(args, identity, space)
        enqueue_defaults(study, space, defaults, args.sampler)
        requeue_failed(study)
    objective = Objective(args, space, proxy, original_source)
    original = objective.original_proxy()["slc_auc"]["worst_case"]["slc_auc"]
    remaining = trials - len(finished_trials(study))
    if remaining > 0:
        where = args.storage or output / "study.db"
        floor = format_source(args, objective.floor).removeprefix("source ")
        say(
            f"tuning {args.method}: {remaining} of {trials} trials to run; study in {where}; the unprotected "
            f"original: {format_source(args, original_source)} (floor {floor}), proxy worst-case "
            f"SLC-AUC {original:+.3f} (to beat)"
        )
        callbacks = [
            optuna.study.MaxTrialsCallback(trials, states=(TrialState.COMPLETE, TrialState.PRUNED)),
            lambda study, trial: say(trial_line(args, study, trial, trials)),
        ]
        study.optimize(objective, callbacks=callbacks)
        # A grid stops once every point was tried, counting a trial that failed meanwhile (another worker's, killed):
        # take those points up again before calling the grid done.
        while args.sampler == "grid" and len(finished_trials(study)) < trials:
            with exclusive(output / ".study.lock"):
                requeue_failed(study)
            if not study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
                break  # the missing points are still running in other workers
            study.optimize(objective, callbacks=callbacks)
    with exclusive(output / ".final.lock"):
        return final_audit(args, study, space, proxy, original_source, original, memorised)


def final_audit(
    args: TuneArguments,
    study: optuna.Study,
    space: list[Parameter],
    proxy: list[str],
    original_source: float,
    original_proxy: float,
    memorised: int | None,
) -> dict[str, Any]:
    """Audit the best trial's model with the full suite on the real test split; card it; write `tuning.json`.

    The best trial must have kept the floor and beaten the unprotected original's proxy worst case
    (`original_proxy`): a search whose best setting protects nothing is an error, not a released model. The audit
    is the best trial's own (`trials/NNNN/audit`, reused when finished); only then is `model/` replaced, in one
    step, by that trial's model with its record, card and plot, so an interruption leaves the previous result whole.
    """
    output = Path(args.output_dir)
    finished = finished_trials(study)
    completed = [t for t in finished if t.state == TrialState.COMPLETE]
    candidates = [t for t in completed if feasible(t)]
    if not candidates:
        floor = (
            f"with a source denoising MSE at most {args.max_source_mse_ratio:g} times the original's: loosen "
            "--max_source_mse_ratio"
            if args.diffusion
            else f"within {args.max_source_drop:.2%} of the original's source accuracy: loosen --max_source_drop"
        )
        memorised_hint = (
            f" The floor was measured partly on {memorised} images the source model was trained on: fit it with "
            "`--validation_samples` first."
            if memorised
            else ""
        )
        raise InputError(
            f"No trial of {len(finished)} finished {floor}, or narrow the search space towards gentler settings."
            + memorised_hint
        )
    best = min(candidates, key=lambda t: t.value)
    if best.value >= original_proxy:
        raise InputError(
            f"No setting protected within the floor: the best of {len(candidates)} trials that kept it (trial "
            f"{best.number}: {format_settings(best.params, ', ')}) lets the proxy's attackers gain {best.value:+.3f}, "
            f"no less than the unprotected original's {original_proxy:+.3f}. Run more trials (--trials), loosen "
            "the floor, or widen the search space; no model was released."
        )
    defaults = next((t for t in completed if t.user_attrs.get("defaults")), None)
    folder = trial_folder(output, best)
    report, source_test = full_audit(args, folder, best.number)
    worst_case = report["slc_auc"]["model"] if args.diffusion else report["slc_auc"]["model"]["worst_case"]
    identity = study.user_attrs["identity"]  # holds the owner's fixed options and the guard, as the trials ran
    summary: dict[str, Any] = {
        "method": args.method,
        "model": args.model_name_or_path,
        "source_dataset": args.source_dataset,
        "target_dataset": args.target_dataset,
        "search_space": {p.name: p.describe() for p in space},
        # What every trial shared beyond the method's defaults: the owner's `--protect_config`, and the guard.
        "fixed_options": (identity["protect_config"] or {}) | identity["guard"],
        "guard_at_floor": bool(identity["guard"]),
        **({"max_source_mse_ratio": args.max_source_mse_ratio} if args.diffusion else {}),
        **({} if args.diffusion else {"max_source_drop": args.max_source_drop}),
        "validation_samples": {"source": args.source_validation_samples, "target": args.target_validation_samples},
        # Source validation images the source model was trained on (`trained_on_validation`): 0 for an honest floor,
        # None where no record says (a Hub checkpoint, a diffusion pipeline).
        "source_validation_trained_on": memorised,
        "proxy": {"attacks": proxy, "counts": args.proxy_counts, "seeds": args.proxy_seeds, "suite": args.suite},
        "trials": [trial_summary(t, args.source_key) for t in study.trials],
        "finished_trials": len(finished),
        "best_trial": best.number,
        "params": best.params,
        "defaults_trial": defaults.number if defaults else None,
        "validation": {
            "worst_case_slc_auc": best.value,
            "worst_case_slc_auc_original": original_proxy,
            args.source_key: best.user_attrs[args.source_key],
            f"{args.source_key}_original": original_source,
        },
        "test": {
            "worst_case_slc_auc": worst_case["slc_auc"],
            "worst_case_slc_auc_normalized": worst_case["slc_auc_normalized"],
            args.source_key: source_test["model"],
            f"{args.source_key}_original": source_test["original"],
        },
        "audit": str(folder / "audit"),
        "source_figure": args.source_key,  # what the trials' source figure is: accuracy, or denoising MSE
        # Compute spent on trials (all workers), unlike a wall clock it does not change when the study is reopened.
        "trial_seconds": round(sum((t.datetime_complete - t.datetime_start).total_seconds() for t in finished), 1),
    }
    record = read_record(folder / MODEL_SUBDIR)
    # The record names the real data sets and their test-split figures (the trials' folders are in `samples` and
    # `config`), and says where the model was audited: a byte-identical copy of this folder.
    record |= {"dataset": args.source_dataset, "target_dataset": args.target_dataset}
    if args.diffusion:
        # The audit's MSE before attack, on both domains' test images (its grid, its test subsets).
        before = report["mse_before_attack"]
        record["denoising_mse_before"] = {
            "source": before["original"]["original"],
            "target": before["original"]["restricted"],
        }
        record["denoising_mse_after"] = {"source": before["model"]["original"], "target": before["model"]["restricted"]}
        record["timestep_grid"] = report["timestep_grid"]
        record["data"]["test_samples"] = {
            "source": report["test_samples"]["original"],
            "target": report["test_samples"]["restricted"],
        }
    else:
        record |= {"source_accuracy_before": source_test["original"], "source_accuracy_after": source_test["model"]}
    record["tuning"] = {k: v for k, v in summary.items() if k != "trials"} | {"audited_as": str(folder / MODEL_SUBDIR)}
    with replacing_directory(output / MODEL_SUBDIR) as staging:
        shutil.copytree(folder / MODEL_SUBDIR, staging, dirs_exist_ok=True)
        write_record(staging, record)
        title = f"hf-ntl tune --method {args.method}"
        floor = source_floor(args, original_source)
        plot_trials(summary["trials"], staging / TRIALS_PLOT, floor, title, original_proxy, args.source_key)
        write_card(staging, folder / "audit", model_name=output.name)
    staging_json = output / ".tuning.json.partial"
    staging_json.write_text(json.dumps(summary, indent=2) + "\n")
    os.replace(staging_json, output / "tuning.json")
    summary["report"] = report
    return summary


def full_audit(args: TuneArguments, folder: Path, number: int) -> tuple[dict[str, Any], dict[str, float]]:
    """The chosen trial's audit with the full suite on the real test split (`folder/audit`, reused when finished),
    and the source figure on the real source test split of its model and of the original."""
    model = folder / MODEL_SUBDIR
    common = dict(
        model_name_or_path=str(model),
        original_model_name_or_path=args.model_name_or_path,
        target_dataset=args.target_dataset,
        suite=args.suite,
        counts=args.counts,
        seeds=args.seeds,
        # Chosen on the held-out samples no trial trained on (the trials' `test` split), whatever their number.
        validation_samples=args.target_validation_samples,
        output_dir=str(folder / "audit"),
    )
    if args.diffusion:
        audit = DiffusionEvaluateArguments(**common, source_dataset=args.source_dataset)
        run, read, command = run_evaluation_diffusion, read_report_diffusion, "evaluate-diffusion"
    else:
        audit, run, read, command = EvaluateArguments(**common), run_evaluation, read_report, "evaluate"
    if finished_run(folder / "audit", run_identity(command, audit), "report.json"):
        report = read(folder / "audit" / "report.json")
    else:
        say(f"auditing trial {number}'s model with the full suite on {args.target_dataset}'s test split")
        report = run(replace(audit, overwrite=True))
    # Trials measured the source figure on the validation split; the released figures are the test split's.
    if args.diffusion:  # the audit measured both pipelines on the source test images before attacking them
        return report, {label: report["mse_before_attack"][label]["original"] for label in ("model", "original")}
    preprocessor = ImagePreprocessor.from_pretrained(model)
    source = load_image_classification_dataset(args.source_dataset, image_size=preprocessor.image_size)["test"]
    test = EncodedSplit.from_dataset(source, preprocessor)
    return report, {
        label: predict_accuracy(load_classifier(path), test.pixel_values, test.labels)
        for label, path in (("model", model), ("original", args.model_name_or_path))
    }


def trial_summary(trial: FrozenTrial, source_key: str) -> dict[str, Any]:
    return {
        "number": trial.number,
        "folder": str(trial_folder(Path(), trial)),
        "state": trial.state.name.lower(),
        "params": trial.params,
        "defaults": bool(trial.user_attrs.get("defaults")),
        source_key: trial.user_attrs.get(source_key),
        "worst_case_slc_auc": trial.value if trial.state == TrialState.COMPLETE else None,
        "feasible": feasible(trial),
        "pruned_by": trial.user_attrs.get("pruned_by"),
        "unchanged": bool(trial.user_attrs.get("unchanged")),
    }


def tuning_tables(summary: dict[str, Any]) -> list[RenderableType]:
    """The search on a terminal: the best trial, the defaults and the original side by side, their settings, then
    the final audit's tables."""
    key = summary["source_figure"]
    diffusion = key == "source_denoising_mse"

    def source(value: float) -> str:
        return f"{value:.4f}" if diffusion else f"{100 * value:.2f}%"

    figure_name = "MSE" if diffusion else "accuracy"
    rows = table(["", "trial", f"source {figure_name} (validation)", "proxy worst case (validation)"])
    trials = {t["number"]: t for t in summary["trials"]}
    numbers = {"best": summary["best_trial"], "defaults": summary["defaults_trial"]}
    shown = {label: trials[number] for label, number in numbers.items() if number is not None}
    for label, trial in shown.items():
        value = trial["worst_case_slc_auc"]
        figure = source(trial[key]) + ("" if trial["feasible"] else " (below the floor)")
        figure += " (the original's weights)" if trial["unchanged"] else ""
        rows.add_row(label, str(trial["number"]), figure, signed(value, f"{value:+.3f}"))
    validation = summary["validation"]
    original = validation["worst_case_slc_auc_original"]
    original_source = source(validation[f"{key}_original"])
    rows.add_row("unprotected original", "", original_source, signed(original, f"{original:+.3f}"))
    states = [t["state"] for t in summary["trials"]]
    test = summary["test"]
    title = (
        f"Search: {states.count('complete')} trials finished, {states.count('pruned')} pruned; the best on test: "
        f"worst case {test['worst_case_slc_auc']:+.3f} (full suite), source {figure_name} "
        f"{source(test[key])} (original {source(test[f'{key}_original'])})"
    )
    # One row per searched option: a settings column would wrap into an unreadable block.
    settings = table(["option", *(f"{label} (trial {trial['number']})" for label, trial in shown.items())])
    for name in summary["search_space"]:
        settings.add_row(name, *(format_value(trial["params"][name]) for trial in shown.values()))
    audit = denoising_tables(summary["report"]) if diffusion else report_tables(summary["report"])
    return [titled(title, rows), titled("Settings", settings), *audit]
