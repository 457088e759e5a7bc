"""`make bench`: how well hf_ntl protects, what it costs, and how that compares to the published results.

    make bench                      # = python benchmarks/bench.py --sections quality diffusion cost
    make bench-budget               # after it: the budget section, into benchmarks/budget
    make bench-architectures        # the architectures section, into benchmarks/architectures
    make bench-hub                  # = python benchmarks/bench.py --sections hub --output_dir benchmarks/hub
    python benchmarks/bench.py --sections cost          # one section

Six sections (`make bench` runs the three that fit in 90 minutes on 2 CPU cores), all with fixed seeds on the
embedded domains, under the measurement protocol of ALGORITHMS.md §5 (splits fixed by the data set, a leakage
guard before every audit, the worst case chosen on a validation split and read on test, budgets that grow with n):

- **quality**: a source model per domain; one scratch baseline per target (shared by the pairs
  attacking it: its runs are identical); for every ordered pair (source, target) NTP and SOPHON
  protect the source model against the target (default settings); the original and both
  protected models are attacked with the default suite plus the NTP paper's masked protocol
  (`full-masked`). Source accuracy, SLC-AUC (raw and normalised) under the masked protocol and for
  the suite's worst case, averaged over pairs beside the published anchors.
- **architectures**: the first pair again on other presets (ConvNeXt by default; `--architectures
  tiny-vit tiny-convnext` adds the ViT, whose own fit alone takes 68 minutes on 2 CPU cores), each
  fitted with its own `fit-source` recipe, protected and audited as above against scratch of the
  same architecture.
- **budget**: scratch at twice every attack's budget on each target, against the quality section's
  scratch runs: whether SLC-AUC measures saved data or saved compute.
- **diffusion**: a tiny DDPM on the first domain, SOPHON (DoS) against the second, restricted
  denoising MSE after the diffusion suite for SOPHON, the original and scratch.
- **cost**, measured in this run: protection step time over a plain `Trainer` step on the same
  batch size, SOPHON peak tensor memory at two K, one attack run, for three ResNet sizes.
- **hub** (only when named): the ResNet-18 and ViT-Base architectures built from their Hub configs
  (random weights: no Hub here) at 224 px with their checkpoints' image processors, and the
  `google/ddpm-cifar10-32` UNet: plain / NTP / SOPHON step and attack step times, and the peak
  resident memory of a whole 224 px audit process at two target train sizes.

Each audit's runs are spread over `--audit_processes` one-thread processes (torchrun). Every stage
writes into `--runs_dir` and is reused when it finished with the same recorded identity, so an
interrupted bench picks up where it stopped; the results go to `--output_dir` (`results.json`,
`results.md`, `slc_auc_heatmap.png`) only once every requested section is complete.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import multiprocessing
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from itertools import permutations
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from datasets import DatasetDict
from diffusers import DDPMScheduler, UNet2DModel
from diffusers.utils import logging as diffusers_logging
from rich.table import Table
from transformers import (
    AutoModelForImageClassification,
    HfArgumentParser,
    ResNetConfig,
    ResNetForImageClassification,
    Trainer,
    TrainerCallback,
    ViTConfig,
)
from transformers import TrainingArguments as PlainTrainingArguments
from transformers.trainer_callback import PrinterCallback
from transformers.utils import logging as transformers_logging

from hf_ntl.artifacts import finished_run, holds_other_run, read_record, run_identity
from hf_ntl.attacks import (
    DIFFUSION_SUITE,
    AttackSpec,
    EncodedOnDemand,
    EncodedSplit,
    finetune,
    finetune_unet,
    finetuned_accuracy,
    load_suite,
)
from hf_ntl.attacks.suite import MASKED_ATTACK
from hf_ntl.data import (
    ImageClassificationCollator,
    ImagePreprocessor,
    load_image_classification_dataset,
    stratified_subset,
)
from hf_ntl.data.loading import SOURCE_VALIDATION_SAMPLES, validation_split
from hf_ntl.data.transforms import encode_diffusion_split
from hf_ntl.errors import InputError
from hf_ntl.evaluation import (
    SCRATCH,
    EvaluateArguments,
    leave_process_group,
    process_state,
    read_report,
    run_attacks,
    run_evaluation,
    run_seconds,
    summarise,
    write_report,
)
from hf_ntl.evaluation_diffusion import DiffusionEvaluateArguments, run_evaluation_diffusion
from hf_ntl.leakage import check_audit_overlap
from hf_ntl.metrics.learning_curve import CurvePoint, check_counts
from hf_ntl.metrics.memory import peak_memory
from hf_ntl.metrics.plots import plot_pair_heatmaps
from hf_ntl.models import TINY_PRESETS, build_tiny_classifier, load_classifier
from hf_ntl.options import stage_config
from hf_ntl.protect import PROTECTIONS, run_sophon_diffusion
from hf_ntl.source import MODEL_SUBDIR, SourceConfig, run_source
from hf_ntl.source_diffusion import DiffusionSourceConfig, run_diffusion_source
from hf_ntl.terminal import StageProgress, format_duration, print_tables, stop_displays
from hf_ntl.trainers import (
    NTPConfig,
    NTPTrainer,
    SophonConfig,
    SophonDiffusionConfig,
    SophonDiffusionTrainer,
    SophonTrainer,
)

SECTIONS = ("quality", "architectures", "budget", "diffusion", "cost", "hub")
# Sections that time the code at hand rather than run stages: a finished one is reused whole (delete its JSON in
# runs_dir to measure again).
MEASUREMENTS = ("cost", "hub")
# What a bench run's identity leaves out, as the results do not depend on it: where they go, which sections run now,
# how many processes share an audit, and the presets of the architectures section (each has its own folder of
# stages, identified as they run).
BOOKKEEPING = (
    "runs_dir",
    "output_dir",
    "sections",
    "architectures",
    "overwrite",
    "audit_processes",
    "audit_request",
    "dry_run",
)
# The bench settings an audit's report depends on (beside its models, target and suite): `run_audit` reads these.
AUDIT_SETTINGS = ("model", "counts", "seeds", "validation_samples")
LABELS = ("original", *PROTECTIONS)
DISPLAY = {"original": "original", "ntp": "NTP", "sophon": "SOPHON", SCRATCH: "scratch"}
# The published anchors (ALGORITHMS.md §2, §3). Raw SLC-AUC there is on the reference grid of
# fractions 0.001 .. 1 (range +-ln 1000); its normalised value divides by that range.
REFERENCE_GRID_RANGE = float(np.log(1000))
SLC_AUC_ANCHORS = {
    "NTP paper, average over digit/CIFAR/STL pairs: NTP": -0.54,
    "NTP reference notebooks, 20 digit pairs: original": 1.38,
    "NTP reference notebooks: NTL": 0.48,
    "NTP reference notebooks: CUTI": 0.70,
    "NTP reference notebooks: NTP": -1.13,
}
SOPHON_ANCHOR = {"sophon": 0.152, "scratch": 0.627, "original": 0.848}  # CIFAR-10 accuracy after fine-tuning
DIFFUSION_ANCHOR = {"sophon": 0.705, "scratch": 0.479, "original": 0.445}  # CIFAR-100 -> CelebA denoising MSE


@dataclass
class BenchArguments:
    """What the bench runs; the defaults are the committed results in `benchmarks/`."""

    runs_dir: str = field(default="runs/bench", metadata={"help": "Where every stage is written (and reused)."})
    output_dir: str = field(default="benchmarks", metadata={"help": "Where results.json/.md and the heatmap go."})
    sections: list[str] = field(
        default_factory=lambda: ["quality", "diffusion", "cost"],
        metadata={"help": f"Sections to run, of {list(SECTIONS)} (default: those of `make bench`)."},
    )
    domains: list[str] = field(
        default_factory=lambda: ["font-digits", "uci-digits", "textured-digits"],
        metadata={"help": "Embedded domains (or folders); every ordered pair is benchmarked."},
    )
    model: str = field(default="tiny-resnet", metadata={"help": "Tiny preset the source models start from."})
    architectures: list[str] = field(
        # Not tiny-vit by default: its own fit-source recipe alone takes 68 minutes on 2 CPU cores (the README's
        # ViT row names it, with a reduced suite).
        default_factory=lambda: ["tiny-convnext"],
        metadata={"help": "Other tiny presets the architectures section protects and audits on the first pair."},
    )
    source_steps: int | None = field(
        default=None, metadata={"help": "Optimiser steps of each source model (default: the fit-source recipe)."}
    )
    suite: str = field(default="default", metadata={"help": "Attack suite (the masked protocol is added)."})
    attacks: list[str] | None = field(default=None, metadata={"help": "Only these attacks of the suite."})
    attack_steps: int | None = field(default=None, metadata={"help": "Override every attack's steps."})
    counts: list[int] = field(
        default_factory=lambda: [10, 50, 200, 1147],
        metadata={"help": "Target sample counts (1147: all of uci-digits' train split less its validation split)."},
    )
    validation_samples: int = field(
        default=200, metadata={"help": "Target train samples held out to choose the worst case per n."}
    )
    seeds: list[int] = field(default_factory=lambda: [0, 1], metadata={"help": "Seeds of the attack runs."})
    audit_processes: int = field(
        default=2, metadata={"help": "Processes (one thread each) an audit's runs are spread over (torchrun)."}
    )
    ntp_config: str | None = field(default=None, metadata={"help": "YAML of NTP options (default: NTP's)."})
    sophon_config: str | None = field(default=None, metadata={"help": "YAML of SOPHON options (default: SOPHON's)."})
    ddpm_config: str | None = field(default=None, metadata={"help": "YAML of fit-ddpm options."})
    sophon_diffusion_config: str | None = field(default=None, metadata={"help": "YAML of SOPHON-diffusion options."})
    diffusion_counts: list[int] = field(default_factory=lambda: [100, 500], metadata={"help": "Attacker images."})
    diffusion_attack_steps: int | None = field(default=None, metadata={"help": "Override the diffusion attacks."})
    diffusion_test_samples: int = field(default=200, metadata={"help": "Test images per domain for the MSE."})
    diffusion_eval_timesteps: int = field(default=10, metadata={"help": "Timesteps of the denoising-MSE grid."})
    diffusion_validation_samples: int = field(
        default=100, metadata={"help": "Restricted train images held out to choose the strongest attack per n."}
    )
    cost_models: list[str] = field(
        default_factory=lambda: ["tiny-resnet", "small-resnet", "resnet-18"],
        metadata={"help": "Model sizes timed in the cost section: tiny-resnet, small-resnet, resnet-18."},
    )
    cost_steps: int = field(default=20, metadata={"help": "Timed plain Trainer steps (after 3 warm-up)."})
    cost_sophon_iterations: int = field(default=5, metadata={"help": "Timed SOPHON iterations (after 1 warm-up)."})
    cost_inner_steps: list[int] = field(default_factory=lambda: [5, 50], metadata={"help": "SOPHON K compared."})
    hub_models: list[str] = field(
        default_factory=lambda: ["resnet-18", "vit-base"],
        metadata={"help": "Hub architectures timed at 224 px in the hub section: resnet-18, vit-base."},
    )
    hub_batch_size: int = field(default=8, metadata={"help": "Batch of the hub section's timed steps."})
    hub_steps: int = field(default=3, metadata={"help": "Timed steps per trainer in the hub section (after warm-up)."})
    hub_audit_train_sizes: list[int] = field(
        default_factory=lambda: [2000, 10000],
        metadata={"help": "Target train sizes whose 224 px audits' peak memory the hub section compares."},
    )
    overwrite: bool = field(default=False, metadata={"help": "Delete runs_dir first (otherwise stages are reused)."})
    dry_run: bool = field(
        default=False, metadata={"help": "Print what would run or be reused, with an estimated time; run nothing."}
    )
    audit_request: str | None = field(
        default=None, metadata={"help": "Internal: run one audit (written by the bench) in this torchrun process."}
    )

    def __post_init__(self) -> None:
        unknown = sorted(set(self.sections) - set(SECTIONS))
        if unknown:
            raise InputError(f"Unknown sections {unknown}; choose from {list(SECTIONS)}.")
        paired = sorted({"quality", "architectures", "diffusion"} & set(self.sections))
        if paired and len(self.domains) < 2:
            raise InputError(f"The {', '.join(paired)} section(s) need at least two domains (three by default).")
        if self.audit_processes < 1:
            raise InputError(f"audit_processes must be at least 1, got {self.audit_processes}.")
        if len(set(self.domains)) != len(self.domains):
            raise InputError(f"Domains must be distinct, got {self.domains}.")
        if len(self.cost_inner_steps) != 2:
            raise InputError(f"cost_inner_steps compares two values of K, got {self.cost_inner_steps}.")
        bad = sorted(set(self.architectures) - set(TINY_PRESETS))
        if bad:
            raise InputError(f"Unknown architectures {bad}; choose tiny presets from {list(TINY_PRESETS)}.")
        bad = sorted(set(self.cost_models) - set(COST_MODELS))
        if bad:
            raise InputError(f"Unknown cost models {bad}; choose from {list(COST_MODELS)}.")
        bad = sorted(set(self.hub_models) - set(HUB_MODELS))
        if bad:
            raise InputError(f"Unknown hub models {bad}; choose from {list(HUB_MODELS)}.")


def check_sample_counts(args: BenchArguments) -> None:
    """Refuse sample counts a target cannot supply now, not after the first hour of training."""
    targets = list(args.domains) if {"quality", "budget"} & set(args.sections) else []
    if "architectures" in args.sections and args.domains[1] not in targets:
        targets.append(args.domains[1])
    requests = [(domain, args.counts, args.validation_samples) for domain in targets]
    if "diffusion" in args.sections:
        requests.append((args.domains[1], args.diffusion_counts, args.diffusion_validation_samples))
    for domain, counts, held_out in requests:
        train = len(load_image_classification_dataset(domain)["train"])
        if held_out >= train:
            raise InputError(f"{domain} has {train} train samples: too few for a validation split of {held_out}.")
        check_counts(counts, train - held_out, what=f"{domain}'s train split less {held_out} validation")


def _timed(compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """`compute()` with its `wall_time_s`, as JSON reads it back (integer keys become strings)."""
    start = time.perf_counter()
    result = compute()
    result["wall_time_s"] = round(time.perf_counter() - start, 1)
    return json.loads(json.dumps(result))


def _cached(path: Path, compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """The JSON at `path` if a finished run left it, else `_timed(compute)` written there atomically.

    Only for pure measurements of the code at hand (the cost and hub timings): a section made of stages
    (sources, protections, audits) is recomputed every time from its stages, each reused only when its recorded
    identity matches, so that a changed default or setting is never hidden behind a finished section.
    """
    if path.is_file():
        print(f"  reusing {path}")
        return json.loads(path.read_text())
    result = _timed(compute)
    path.parent.mkdir(parents=True, exist_ok=True)
    unfinished = path.with_suffix(".partial")
    unfinished.write_text(json.dumps(result, indent=2) + "\n")
    unfinished.replace(path)
    return result


# ----------------------------------------------------------------------------- protection quality


def source_validation_samples(domain: str) -> int:
    """The source validation split the bench's source fits leave out, so that `hf-ntl tune` (the NTP sweep,
    `--source_validation_samples` this) measures the owner's floor on images the model never saw: tune's default,
    or a fifth of a smaller train split (uci-digits: 269 of 1,347), which must still teach the source task."""
    return min(SOURCE_VALIDATION_SAMPLES, len(load_image_classification_dataset(domain)["train"]) // 5)


def source_config(args: BenchArguments, folder: Path, domain: str) -> SourceConfig:
    """The fit-source stage for `domain`: a plain `Trainer` run of the preset's recipe, or of `source_steps` steps."""
    options = ["--output_dir", str(folder), "--model_name_or_path", args.model, "--dataset_name", domain]
    options += ["--logging_strategy", "no", "--validation_samples", str(source_validation_samples(domain))]
    if args.source_steps is not None:
        options += ["--max_steps", str(args.source_steps)]
    return stage_config(SourceConfig, None, options, "fit-source")


def fit_source(args: BenchArguments, folder: Path, domain: str) -> Path:
    """The owner's source model for `domain`, fitted unless a finished run of the same settings is there."""
    config = source_config(args, folder, domain)
    identity = run_identity("source", config)
    if not finished_run(folder, identity):
        print(f"  fitting {args.model} on {domain}")
        config.overwrite = holds_other_run(folder, identity)  # a fit of other settings is replaced
        run_source(config)
    return folder / MODEL_SUBDIR


def protect_config(
    args: BenchArguments, folder: Path, source_model: Path, source: str, target: str, method: str
) -> NTPConfig | SophonConfig:
    """The protect stage of `method` against `target` (the method's defaults, or the bench's YAML)."""
    config_class, _ = PROTECTIONS[method]
    options = ["--output_dir", str(folder), "--model_name_or_path", str(source_model)]
    options += ["--source_dataset", source, "--target_dataset", target, "--logging_strategy", "no"]
    options += ["--audit_validation_samples", str(args.validation_samples)]  # what the audits choose on
    yaml_path = args.ntp_config if method == "ntp" else args.sophon_config
    return stage_config(config_class, yaml_path, options, f"protect-{method}")


def protect(args: BenchArguments, folder: Path, source_model: Path, source: str, target: str, method: str) -> Path:
    """The source model protected against `target` with `method`, unless a finished run of it is there."""
    config = protect_config(args, folder, source_model, source, target, method)
    identity = run_identity("protect", config, method)
    if not protection_finished(folder, identity, source_model):
        print(f"  protecting the {source} model against {target} with {method}")
        # A protection of other settings (a default changed) or of other source weights (a refitted source) is
        # replaced.
        config.overwrite = holds_other_run(folder, identity) or finished_run(folder, identity)
        PROTECTIONS[method][1](config)
        stamp_source_weights(folder, source_model)
    return folder / MODEL_SUBDIR


SOURCE_WEIGHTS = "source_weights.sha256"
SOURCE_WEIGHT_FILES = "**/*.safetensors"  # a pipeline keeps its UNet's in a subfolder


def protection_finished(folder: Path, identity: dict[str, Any], source_model: Path) -> bool:
    """Whether `folder` holds a finished protection of `identity` made from the weights `source_model` holds now.

    A run's identity names its source model by path; a source refitted in place (its settings changed) leaves that
    path as it was, so the weights it was protected from are stamped beside the protection (`SOURCE_WEIGHTS`).
    """
    stamp = folder / SOURCE_WEIGHTS
    return (
        finished_run(folder, identity)
        and stamp.is_file()
        and stamp.read_text().strip() == files_digest(source_model, SOURCE_WEIGHT_FILES)
    )


def stamp_source_weights(folder: Path, source_model: Path) -> None:
    (folder / SOURCE_WEIGHTS).write_text(f"{files_digest(source_model, SOURCE_WEIGHT_FILES)}\n")


def files_digest(path: Path, pattern: str | None = None) -> str | None:
    """A SHA-256 of the file `path`, or of the files in the folder `path` matching `pattern`; `None` when there are
    none yet (a model not made yet: no audit of it can be finished)."""
    files = sorted(path.glob(pattern)) if pattern else [path] if path.is_file() else []
    if not files:
        return None
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.read_bytes())
    return digest.hexdigest()


def audit_request(
    args: BenchArguments,
    folder: Path,
    models: dict[str, Path],
    target: str,
    suite: list[AttackSpec],
    scratch_report: Path | None = None,
) -> tuple[dict[str, Any], dict[str, Any], bool]:
    """An audit's request (what `run_audit` reads), its identity, and whether `folder` holds it finished.

    The identity is what shapes the audit's report, so that a finished audit is reused only for the same one: the
    target, the suite, the bench settings `run_audit` reads (`AUDIT_SETTINGS`), and the models and shared scratch
    report by content (a digest of their files), not by path. A protection rerun after a default changed has new
    weights at the same path, and its audit must be redone; a change to the bench's other settings (another
    section's) leaves it alone.
    """
    request = {
        "bench": {k: v for k, v in dataclasses.asdict(args).items() if k != "audit_request"},
        "folder": str(folder),
        "models": {label: str(path) for label, path in models.items()},
        "target": target,
        "suite": [spec.to_dict() for spec in suite],
        "scratch_report": str(scratch_report) if scratch_report else None,
    }
    identity = {
        "target": target,
        "suite": request["suite"],
        **{name: request["bench"][name] for name in AUDIT_SETTINGS},
        "models": {
            label: {"path": str(path), "weights": files_digest(path, "*.safetensors")} for label, path in models.items()
        },
        "scratch_report": scratch_report and {"path": str(scratch_report), "content": files_digest(scratch_report)},
    }
    request_file = folder / "audit_request.json"
    finished = (folder / "report.json").is_file() and request_file.is_file()
    finished = finished and json.loads(request_file.read_text()).get("identity") == json.loads(json.dumps(identity))
    return request, identity, finished


def audit(
    args: BenchArguments,
    folder: Path,
    models: dict[str, Path],
    target: str,
    suite: list[AttackSpec] | None = None,
    scratch_report: Path | None = None,
) -> dict[str, Any]:
    """Attack the models with one suite; the audit's `report.json`.

    `models` may be empty: scratch alone, on the architecture of `args.model`. With a
    `scratch_report` (such a scratch-only audit of the same target, suite, counts and seeds), its
    scratch runs are the baseline instead of running scratch again: every pair with the same target
    shares one, as the runs are identical. With `audit_processes` > 1 the runs are spread over that
    many torchrun processes of one thread each (the report is identical to a one-process run: every
    run is seeded on its own).
    """
    suite = suite or bench_suite(args)
    request, identity, finished = audit_request(args, folder, models, target, suite, scratch_report)
    if finished:
        print(f"  reusing {folder / 'report.json'}")
        return read_report(folder / "report.json")
    request_file = folder / "audit_request.json"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "report.json").unlink(missing_ok=True)
    request_file.write_text(json.dumps({**request, "identity": identity}, indent=2) + "\n")
    if args.audit_processes == 1:
        run_audit(request)
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        command += [f"--nproc_per_node={args.audit_processes}", __file__, "--audit_request", str(request_file)]
        subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return read_report(folder / "report.json")


def run_audit(request: dict[str, Any]) -> None:
    """One audit (see `audit`), in this process or as one rank of a torchrun launch; rank 0 writes the report."""
    args = BenchArguments(**request["bench"])
    folder, target = Path(request["folder"]), request["target"]
    models = {label: Path(path) for label, path in request["models"].items()}
    suite = [AttackSpec(**spec) for spec in request["suite"]]
    start = time.perf_counter()
    preprocessor = ImagePreprocessor.from_pretrained(models["original"]) if models else ImagePreprocessor()
    dataset = load_image_classification_dataset(target, image_size=preprocessor.image_size)
    validation_indices, pool_indices = validation_split(dataset["train"]["label"], args.validation_samples)
    counts = check_counts(args.counts, len(pool_indices), what=f"{target}'s train split less validation")
    loaded = {label: load_classifier(path) for label, path in models.items()}
    classes = dataset["train"].features["label"].num_classes
    for label, model in loaded.items():
        if model.config.num_labels != classes:
            raise ValueError(f"{models[label]} has {model.config.num_labels} outputs but {target} {classes} classes.")

    def target_at(size: int):
        return load_image_classification_dataset(target, image_size=size)

    paths = {label: str(path) for label, path in models.items()}
    overlap = check_audit_overlap(paths, dataset, preprocessor.image_size, target_at, validation_indices)
    train = EncodedOnDemand(dataset["train"].select(pool_indices), preprocessor)
    validation = EncodedSplit.from_dataset(dataset["train"].select(validation_indices), preprocessor)
    test = EncodedSplit.from_dataset(dataset["test"], preprocessor)
    reference = build_tiny_classifier(args.model, classes)
    shared = request["scratch_report"]
    points = run_attacks(
        loaded, train, validation, test, suite, counts, args.seeds, reference=reference, with_scratch=not shared
    )
    if shared:
        baseline = read_report(shared)
        if (baseline["counts"], baseline["seeds"], baseline["suite"]) != (counts, list(args.seeds), request["suite"]):
            raise ValueError(f"{shared} is a scratch baseline of another grid or suite.")
        points += [CurvePoint(**point) for point in baseline["points"] if point["model"] == SCRATCH]
    state = process_state()
    report = {
        "model": str(models.get("original", args.model)),
        "original": str(models.get("original", "")),
        "target": target,
        "source": read_record(models["original"]) if models else {},
        "classes": classes,
        "target_train_samples": len(dataset["train"]) - args.validation_samples,
        "target_validation_samples": args.validation_samples,
        "target_test_samples": len(dataset["test"]),
        "test_overlap": overlap["test"],
        "validation_overlap": overlap["validation"],
        "counts": counts,
        "seeds": list(args.seeds),
        "suite": [spec.to_dict() for spec in suite],
        "steps_per_count": {n: sorted({spec.steps_for(n) for spec in suite}) for n in counts},
        **summarise(points, suite, list(loaded)),
        "seconds_by_model": {
            label: round(sum(p.seconds for p in points if p.model == label), 1) for label in [*loaded, SCRATCH]
        },
        "points": [p.to_dict() for p in points],
        "wall_time_s": round(time.perf_counter() - start, 1),
        "processes": state.num_processes,
    }
    if state.is_main_process:
        write_report(report, folder)
    leave_process_group()


def bench_suite(args: BenchArguments) -> list[AttackSpec]:
    """The attacks of the quality section: the suite with the masked protocol (the model under test is pruned)."""
    return load_suite(args.suite, pruned=True, steps=args.attack_steps, only=args.attacks)


def scratch_path(runs: Path, target: str) -> Path:
    """The report of the scratch baseline the pairs attacking `target` share."""
    return runs / "scratch" / Path(target).name / "report.json"


def check_masked_protocol(args: BenchArguments) -> None:
    """The quality tables compare every model under the NTP paper's masked protocol: it must be in the suite."""
    if MASKED_ATTACK.name not in [spec.name for spec in bench_suite(args)]:
        raise InputError(f"The bench needs the masked protocol: keep {MASKED_ATTACK.name!r} in --attacks.")


def quality(args: BenchArguments, runs: Path) -> dict[str, Any]:
    """Source models, protections and audits for every ordered pair; per pair, what the tables need."""
    check_masked_protocol(args)
    sources = {domain: fit_source(args, runs / "sources" / Path(domain).name, domain) for domain in args.domains}
    for target in args.domains:  # one scratch baseline per target, shared by the pairs that attack it
        print(f"[quality] scratch on {target}")
        audit(args, scratch_path(runs, target).parent, {}, target)
    pairs = []
    for source, target in permutations(args.domains, 2):
        print(f"[quality] {source} -> {target}")
        pairs.append(protect_and_audit_pair(args, runs, sources[source], source, target))
    return {"counts": args.counts, "seeds": args.seeds, "largest_n": max(args.counts), "pairs": pairs}


def protect_and_audit_pair(args: BenchArguments, runs: Path, source_model: Path, source: str, target: str) -> dict:
    """Both protections of `source_model` against `target`, and one audit of the three models against the target's
    shared scratch baseline (`scratch_path(runs, target)`); what the tables need of the pair."""
    folder = runs / "quality" / f"{Path(source).name}__{Path(target).name}"
    models = {"original": source_model}
    for method in PROTECTIONS:
        models[method] = protect(args, folder / method, source_model, source, target, method)
    report = audit(args, folder / "audit", models, target, scratch_report=scratch_path(runs, target))
    largest = max(report["counts"])
    pair: dict[str, Any] = {"source": source, "target": target, "audit_wall_time_s": report["wall_time_s"]}
    for label in LABELS:
        record = read_record(models[label])
        scores = report["slc_auc"][label]
        pair[label] = {
            "source_accuracy": record.get("source_accuracy_after", record.get("test_accuracy")),
            "masked": scores["per_attack"][MASKED_ATTACK.name],
            "worst_case": scores["worst_case"],
            "strongest_attack": scores["strongest_attack"],
            "masked_accuracy_at_largest_n": report["curves"][label][MASKED_ATTACK.name][largest],
            "worst_case_accuracy_at_largest_n": report["worst_case_curves"][label][largest],
            "worst_case_attacks": report["worst_case_attacks"][label],
            "attack_seconds": report["seconds_by_model"][label],
            "protection_wall_time_s": record.get("wall_time_s") if label != "original" else None,
        }
    pair[SCRATCH] = {
        "masked_accuracy_at_largest_n": report["curves"][SCRATCH][MASKED_ATTACK.name][largest],
        "worst_case_accuracy_at_largest_n": report["worst_case_curves"][SCRATCH][largest],
        "worst_case_attacks": report["worst_case_attacks"][SCRATCH],
        "attack_seconds": report["seconds_by_model"][SCRATCH],
    }
    pair["test_overlap"] = report["test_overlap"]["total"]
    pair["validation_overlap"] = report["validation_overlap"]["total"]
    return pair


def architectures(args: BenchArguments, runs: Path) -> dict[str, Any]:
    """The quality section's pair `domains[0] -> domains[1]` on each of `args.architectures`: a source model fitted
    with the preset's own recipe, NTP and SOPHON with their defaults, and an audit against scratch of the same
    architecture; how the protections behave on a transformer (ViT) and a modern convnet (ConvNeXt)."""
    check_masked_protocol(args)
    source, target = args.domains[0], args.domains[1]
    rows = {}
    for preset in args.architectures:
        print(f"[architectures] {preset}: {source} -> {target}")
        preset_args, folder = replace(args, model=preset), runs / "architectures" / preset
        source_model = fit_source(preset_args, folder / "sources" / Path(source).name, source)
        audit(preset_args, scratch_path(folder, target).parent, {}, target)
        rows[preset] = protect_and_audit_pair(preset_args, folder, source_model, source, target)
    return {"counts": args.counts, "seeds": args.seeds, "largest_n": max(args.counts), "models": rows}


def quality_averages(result: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Mean over pairs of each label's source accuracy, SLC-AUC (both protocols, both scales) and accuracy at n max."""
    pairs = result["pairs"]
    averages = {}
    for label in LABELS:
        rows = [pair[label] for pair in pairs]
        averages[label] = {
            "source_accuracy": statistics.mean(row["source_accuracy"] for row in rows),
            "masked_slc_auc": statistics.mean(row["masked"]["slc_auc"] for row in rows),
            "masked_slc_auc_normalized": statistics.mean(row["masked"]["slc_auc_normalized"] for row in rows),
            "worst_case_slc_auc": statistics.mean(row["worst_case"]["slc_auc"] for row in rows),
            "worst_case_slc_auc_normalized": statistics.mean(row["worst_case"]["slc_auc_normalized"] for row in rows),
            "masked_accuracy_at_largest_n": statistics.mean(row["masked_accuracy_at_largest_n"] for row in rows),
            "worst_case_accuracy_at_largest_n": statistics.mean(
                row["worst_case_accuracy_at_largest_n"] for row in rows
            ),
        }
    scratch = [pair[SCRATCH] for pair in pairs]
    averages[SCRATCH] = {
        key: statistics.mean(row[key] for row in scratch)
        for key in ("masked_accuracy_at_largest_n", "worst_case_accuracy_at_largest_n")
    }
    return averages


# ----------------------------------------------------------------------------- budget convergence


def doubled_budget(suite: list[AttackSpec]) -> list[AttackSpec]:
    """`suite` with twice every attack's budget (floor, epochs and ceiling)."""
    return [
        dataclasses.replace(
            spec,
            steps=2 * spec.steps,
            epochs=None if spec.epochs is None else 2 * spec.epochs,
            max_steps=None if spec.max_steps is None else 2 * spec.max_steps,
        )
        for spec in suite
    ]


def budget(args: BenchArguments, runs: Path) -> dict[str, Any]:
    """Is scratch converged? Per target, scratch under the suite at twice its budget against the quality
    section's scratch runs (same seeds, subsets and selection on validation)."""
    suite = bench_suite(args)
    doubled = doubled_budget(suite)
    targets = {}
    for target in args.domains:
        if not audit_request(args, scratch_path(runs, target).parent, {}, target, suite)[2]:
            raise InputError(
                f"The budget section compares with the quality section's scratch runs, and {runs} holds none finished "
                f"for these settings on {target}: run the quality section (`make bench`) first."
            )
        single = read_report(scratch_path(runs, target))
        print(f"[budget] scratch on {target} at twice the budget")
        double = audit(args, runs / "budget" / Path(target).name, {}, target, suite=doubled)
        rows = {}
        for n in single["counts"]:
            per_attack = {
                spec.name: double["curves"][SCRATCH][spec.name][n] - single["curves"][SCRATCH][spec.name][n]
                for spec in suite
            }
            rows[n] = {
                "steps": single["steps_per_count"][n],
                "doubled_steps": double["steps_per_count"][n],
                "worst_case": single["worst_case_curves"][SCRATCH][n],
                "worst_case_doubled": double["worst_case_curves"][SCRATCH][n],
                "chosen_attack": single["worst_case_attacks"][SCRATCH][n],
                "chosen_attack_doubled": double["worst_case_attacks"][SCRATCH][n],
                "largest_change_of_one_attack": max(per_attack.values(), key=abs),
                "attack_with_largest_change": max(per_attack, key=lambda name: abs(per_attack[name])),
            }
        targets[target] = rows
    return {"counts": args.counts, "seeds": args.seeds, "targets": targets}


def budget_table(result: dict[str, Any]) -> str:
    rows = [
        [
            "target",
            "n",
            "steps (1x / 2x)",
            "scratch, worst case 1x → 2x (%)",
            "change (points)",
            "largest change of a single attack",
        ]
    ]
    for target, by_count in result["targets"].items():
        for n, row in by_count.items():
            change = 100 * (row["worst_case_doubled"] - row["worst_case"])
            rows.append(
                [
                    target,
                    str(n),
                    f"{'/'.join(map(str, row['steps']))} / {'/'.join(map(str, row['doubled_steps']))}",
                    f"{100 * row['worst_case']:.1f} ({row['chosen_attack']}) → {100 * row['worst_case_doubled']:.1f} "
                    f"({row['chosen_attack_doubled']})",
                    f"{change:+.1f}",
                    f"{100 * row['largest_change_of_one_attack']:+.1f} ({row['attack_with_largest_change']})",
                ]
            )
    return _markdown(rows)


# ----------------------------------------------------------------------------- diffusion


def diffusion(args: BenchArguments, runs: Path) -> dict[str, Any]:
    """fit-ddpm on the first domain, SOPHON (DoS) against the second, then the diffusion audit."""
    source, target = args.domains[0], args.domains[1]
    folder = runs / "diffusion"
    original = folder / "source" / MODEL_SUBDIR
    options = ["--output_dir", str(folder / "source"), "--dataset_name", source, "--disable_tqdm", "true"]
    config = stage_config(DiffusionSourceConfig, args.ddpm_config, options, "fit-ddpm")
    identity = run_identity("ddpm-source", config)
    if not finished_run(folder / "source", identity):
        print(f"[diffusion] fitting the tiny DDPM on {source}")
        config.overwrite = holds_other_run(folder / "source", identity)
        run_diffusion_source(config)
    protected = folder / "sophon" / MODEL_SUBDIR
    options = ["--output_dir", str(folder / "sophon"), "--model_name_or_path", str(original)]
    options += ["--source_dataset", source, "--target_dataset", target, "--disable_tqdm", "true"]
    options += ["--audit_validation_samples", str(args.diffusion_validation_samples)]
    config = stage_config(SophonDiffusionConfig, args.sophon_diffusion_config, options, "protect-sophon-diffusion")
    identity = run_identity("protect", config, "sophon-diffusion")
    if not protection_finished(folder / "sophon", identity, original):
        print(f"[diffusion] protecting it against {target} with SOPHON (DoS)")
        config.overwrite = holds_other_run(folder / "sophon", identity) or finished_run(folder / "sophon", identity)
        run_sophon_diffusion(config)
        stamp_source_weights(folder / "sophon", original)
    audit_dir = folder / "audit"
    audit_args = DiffusionEvaluateArguments(
        model_name_or_path=str(protected),
        original_model_name_or_path=str(original),
        target_dataset=target,
        counts=args.diffusion_counts,
        steps=args.diffusion_attack_steps,
        test_samples=args.diffusion_test_samples,
        eval_timesteps=args.diffusion_eval_timesteps,
        validation_samples=args.diffusion_validation_samples,
        sample_images=0,
        output_dir=str(audit_dir),
        overwrite=True,  # reached only when the folder holds no finished audit of exactly these settings
    )
    if finished_run(audit_dir, run_identity("evaluate-diffusion", audit_args), finished="report.json"):
        report = json.loads((audit_dir / "report.json").read_text())
    else:
        print(f"[diffusion] attacking SOPHON, the original and scratch on {target}")
        report = run_evaluation_diffusion(audit_args)
    rename = {"model": "sophon", "original": "original", SCRATCH: SCRATCH}
    worst = report["worst_case_restricted_mse"]
    return {
        "source": source,
        "target": target,
        "counts": report["counts"],
        "mse_before_attack": {rename[k]: v for k, v in report["mse_before_attack"].items()},
        "worst_case_restricted_mse": {rename[k]: worst[k] for k in worst},
        "strongest_attack": {rename[k]: v for k, v in report["strongest_attack"].items()},
        "protection_wall_time_s": read_record(protected)["wall_time_s"],
        "audit_wall_time_s": report["wall_time_s"],
    }


# ----------------------------------------------------------------------------- cost


def _small_resnet() -> ResNetConfig:
    return ResNetConfig(embedding_size=32, hidden_sizes=[32, 64, 128, 256], depths=[1, 1, 1, 1], layer_type="basic")


def _resnet_18() -> ResNetConfig:
    # microsoft/resnet-18's architecture (the NTP paper's model), built from its config.
    return ResNetConfig(embedding_size=64, hidden_sizes=[64, 128, 256, 512], depths=[2, 2, 2, 2], layer_type="basic")


COST_MODELS = {"tiny-resnet": None, "small-resnet": _small_resnet, "resnet-18": _resnet_18}

# Training arguments of the timed trainers: no logging, saving or evaluation inside the measurement.
QUIET_TRAINING = {
    "report_to": "none",
    "disable_tqdm": True,
    "logging_strategy": "no",
    "save_strategy": "no",
    "eval_strategy": "no",
    "dataloader_pin_memory": torch.cuda.is_available(),  # pinning needs an accelerator; it only warns on CPU
}


def _cost_model(name: str, num_labels: int) -> torch.nn.Module:
    if COST_MODELS[name] is None:
        return build_tiny_classifier(name, num_labels)
    config = COST_MODELS[name]()
    config.num_labels = num_labels
    torch.manual_seed(0)
    return ResNetForImageClassification(config)


class StepTimer(TrainerCallback):
    """Wall time between consecutive optimiser-step ends: everything one step of a trainer costs."""

    def __init__(self) -> None:
        self.ends: list[float] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append(time.perf_counter())


def _seconds_per_step(trainer: Trainer, warmup: int) -> float:
    """Mean wall time of the steps after the first `warmup` (which allocate optimiser state)."""
    timer = StepTimer()
    trainer.add_callback(timer)
    # Timed bare: a plain Trainer would print its closing log dictionary, a protection its progress display.
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(StageProgress)
    trainer.train()
    return float(np.diff(timer.ends[warmup - 1 :]).mean())


def cost(args: BenchArguments, runs: Path) -> dict[str, Any]:
    """Step times of a plain `Trainer`, NTP and SOPHON, SOPHON's memory at two K and one attack run, per size."""
    preprocessor = ImagePreprocessor(image_size=32)
    source = load_image_classification_dataset(args.domains[0], image_size=32)
    target = load_image_classification_dataset(args.domains[1], image_size=32)
    source_train = stratified_subset(source["train"], min(2000, len(source["train"])), seed=0)
    guard = stratified_subset(source["test"], min(200, len(source["test"])), seed=0)
    target_train = target["train"]
    attack_samples = min(200, len(target_train))
    attack_train = EncodedSplit.from_dataset(stratified_subset(target_train, attack_samples, seed=0), preprocessor)
    attack_test = EncodedSplit.from_dataset(target["test"], preprocessor)
    attack = load_suite("default")[0]
    classes = source["train"].features["label"].num_classes
    quiet = QUIET_TRAINING
    warmup = 3
    rows = {}
    for name in args.cost_models:
        print(f"[cost] {name}")
        row: dict[str, Any] = {"parameters": sum(p.numel() for p in _cost_model(name, classes).parameters())}
        with tempfile.TemporaryDirectory() as tmp:
            plain_args = PlainTrainingArguments(
                output_dir=tmp,
                max_steps=warmup + args.cost_steps,
                per_device_train_batch_size=64,
                remove_unused_columns=False,
                **quiet,
            )
            collator = ImageClassificationCollator(preprocessor)
            plain = Trainer(_cost_model(name, classes), plain_args, train_dataset=source_train, data_collator=collator)
            row["plain_step_s"] = _seconds_per_step(plain, warmup)
            # One whole ADMM round (its projection and the hard prune included) and a few retraining steps.
            ntp_args = NTPConfig(output_dir=tmp, admm_rounds=1, retrain_steps=10, **quiet)
            ntp = NTPTrainer(_cost_model(name, classes), ntp_args, source_train, target_train, preprocessor)
            row["ntp_step_s"] = _seconds_per_step(ntp, warmup)
            sophon_args = SophonConfig(
                output_dir=tmp, iterations=1 + args.cost_sophon_iterations, guard_threshold=0.0, **quiet
            )
            sophon = SophonTrainer(
                _cost_model(name, classes), sophon_args, source_train, target_train, preprocessor, guard
            )
            row["sophon_step_s"] = _seconds_per_step(sophon, warmup=1)
            row["sophon_inner_steps"] = sophon_args.inner_steps
            for k in args.cost_inner_steps:
                config = SophonConfig(output_dir=tmp, inner_steps=k, environments=1, guard_threshold=0.0, **quiet)
                trainer = SophonTrainer(
                    _cost_model(name, classes), config, source_train, target_train, preprocessor, guard
                )
                trainer.suppression_step(iteration=0)  # the FTS optimiser's state is allocated outside the measure
                began = time.perf_counter()
                with peak_memory() as peak:
                    trainer.suppression_step(iteration=1)
                row[f"fts_step_k{k}_s"] = time.perf_counter() - began
                row[f"fts_peak_mib_k{k}"] = peak.bytes / 2**20
        began = time.perf_counter()
        finetuned_accuracy(_cost_model(name, classes), attack_train, attack_test, attack, seed=0)
        row["attack_run_s"] = time.perf_counter() - began
        row["ntp_over_plain"] = row["ntp_step_s"] / row["plain_step_s"]
        row["sophon_over_plain"] = row["sophon_step_s"] / row["plain_step_s"]
        small, large = args.cost_inner_steps
        row["fts_peak_memory_ratio"] = row[f"fts_peak_mib_k{large}"] / row[f"fts_peak_mib_k{small}"]
        rows[name] = row
    return {
        "data": {"source": args.domains[0], "target": args.domains[1], "batch_size": 64, "attack_n": attack_samples},
        "timed_steps": {"plain": args.cost_steps, "sophon": args.cost_sophon_iterations},
        "inner_steps_compared": args.cost_inner_steps,
        "attack": attack.to_dict(),
        "models": rows,
    }


# ----------------------------------------------------------------------------- hub scale


def _vit_base() -> ViTConfig:
    # google/vit-base-patch16-224's architecture (ViTConfig's defaults), eager attention as the tiny preset's.
    return ViTConfig(attn_implementation="eager")


# Each Hub architecture with the image processor its checkpoint ships (microsoft/resnet-18: shortest edge
# 224 / crop_pct 0.875, bicubic; google/vit-base-patch16-224: 224 x 224, bilinear).
IMAGENET = {"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}
HUB_MODELS = {
    "resnet-18": (
        _resnet_18,
        {"image_processor_type": "ConvNextImageProcessor", "size": {"shortest_edge": 224}, "crop_pct": 0.875,
         "resample": 3, **IMAGENET},
    ),
    "vit-base": (
        _vit_base,
        {"image_processor_type": "ViTImageProcessor", "size": {"height": 224, "width": 224}, "resample": 2,
         "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]},
    ),
}  # fmt: skip


def _ddpm_cifar10_32() -> UNet2DModel:
    # google/ddpm-cifar10-32's UNet, from its config.json (35.7 M parameters).
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=32,
        block_out_channels=(128, 256, 256, 256),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        layers_per_block=2,
        downsample_padding=0,
        flip_sin_to_cos=False,
        freq_shift=1,
        norm_eps=1e-6,
    )


def _hub_checkpoint(name: str, folder: Path, classes: int) -> Path:
    """A randomly initialised checkpoint of a Hub architecture, saved with its image processor."""
    build, processor = HUB_MODELS[name]
    config = build()
    config.num_labels = classes
    torch.manual_seed(0)
    AutoModelForImageClassification.from_config(config).save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(processor))
    return folder


def _audit_peak_rss(model: str, target: str, counts: list[int], steps: int) -> float:
    """In a fresh process: one audit (the `full` attack, one seed), and the process's peak resident memory in MiB.

    Read from /proc (Linux) as VmHWM, the peak of this process's own memory: `getrusage`'s ru_maxrss would
    also count the parent's resident size at the fork that started this process, which exec does not reset.
    """
    transformers_logging.disable_progress_bar()  # a spawned process: the parent's settings do not reach it
    arguments = EvaluateArguments(
        model_name_or_path=model, target_dataset=target, attacks=["full"], counts=counts, steps=steps, seeds=[0]
    )
    run_evaluation(arguments, progress=False)
    status = Path("/proc/self/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1]) / 1024


def hub(args: BenchArguments, runs: Path) -> dict[str, Any]:
    """Hub architectures at 224 px (random weights): step times of a plain Trainer, NTP and SOPHON and of an
    attack, the `google/ddpm-cifar10-32` UNet's, and the peak memory of a 224 px audit at two train sizes."""
    folder = runs / "hub"
    source_name, target_name = args.domains[0], args.domains[1]
    quiet = {**QUIET_TRAINING, "per_device_train_batch_size": args.hub_batch_size}
    # SOPHON at its default K would take minutes per iteration on CPU: timed with K = 2 and one attacker,
    # which a default iteration (2 attackers x K = 10) repeats about ten times.
    sophon_settings = {"inner_steps": 2, "environments": 1, "inner_batch_sizes": [2 * args.hub_batch_size]}
    sophon_settings["query_size"] = args.hub_batch_size
    # Each part is kept as it finishes (an interrupted section resumes after it).
    steps = _cached(
        folder / "step_times.json", lambda: {"models": _hub_step_times(args, folder, sophon_settings, quiet)}
    )
    attacks = _cached(folder / "attack_times.json", lambda: {"models": _hub_attack_times(args, folder)})
    memory = _cached(folder / "audit_memory.json", lambda: {"peak_rss_mib": _hub_audit_memory(args, folder)})
    return {
        "batch_size": args.hub_batch_size,
        "timed_steps": args.hub_steps,
        "sophon_settings": sophon_settings,
        "data": {"source": source_name, "target": target_name},
        "models": {name: {**row, **attacks["models"][name]} for name, row in steps["models"].items()},
        "audit": {
            "model": "resnet-18",
            "target": source_name,
            "attack": "full",
            "counts": [10, 50],
            "steps": 3,
            "test_samples": min(500, len(load_image_classification_dataset(source_name)["test"])),
        },
        "audit_peak_rss_mib": memory["peak_rss_mib"],
    }


def hub_attack(args: BenchArguments, steps: int) -> AttackSpec:
    """The suite's `full` attack at the hub batch for exactly `steps` steps. (With the suite's budget, which grows
    with the data, a 1-step and a 4-step run on 32 samples both took 60 steps, and their difference was noise.)"""
    return replace(load_suite("default", steps=steps)[0], batch_size=args.hub_batch_size)


def _hub_step_times(
    args: BenchArguments, folder: Path, sophon_settings: dict[str, Any], quiet: dict[str, Any]
) -> dict[str, dict[str, Any]]:
    """Plain / NTP / SOPHON step times of each Hub architecture at 224 px, and SOPHON's of the DDPM UNet."""
    source_name, target_name = args.domains[0], args.domains[1]
    rows: dict[str, dict[str, Any]] = {}
    for name in args.hub_models:
        print(f"[hub] {name} at 224 px")
        checkpoint = _hub_checkpoint(name, folder / name, 10)
        preprocessor = ImagePreprocessor.from_pretrained(checkpoint)
        source = load_image_classification_dataset(source_name, image_size=preprocessor.image_size)
        target = load_image_classification_dataset(target_name, image_size=preprocessor.image_size)
        source_train = stratified_subset(source["train"], 20 * args.hub_batch_size, seed=0)
        guard = stratified_subset(source["test"], 2 * args.hub_batch_size, seed=0)
        target_train = stratified_subset(target["train"], 4 * args.hub_batch_size, seed=0)
        row: dict[str, Any] = {"parameters": sum(p.numel() for p in load_classifier(checkpoint).parameters())}
        with tempfile.TemporaryDirectory() as tmp:
            plain_args = PlainTrainingArguments(
                output_dir=tmp, max_steps=2 + args.hub_steps, remove_unused_columns=False, **quiet
            )
            collator = ImageClassificationCollator(preprocessor)
            plain = Trainer(load_classifier(checkpoint), plain_args, train_dataset=source_train, data_collator=collator)
            row["plain_step_s"] = _seconds_per_step(plain, warmup=2)
            ntp_args = NTPConfig(
                output_dir=tmp, admm_rounds=1, steps_per_round=2 + args.hub_steps, retrain_steps=0, **quiet
            )
            ntp = NTPTrainer(load_classifier(checkpoint), ntp_args, source_train, target_train, preprocessor)
            row["ntp_step_s"] = _seconds_per_step(ntp, warmup=2)
            sophon_args = SophonConfig(
                output_dir=tmp, iterations=1 + args.hub_steps, guard_threshold=0.0, **sophon_settings, **quiet
            )
            sophon = SophonTrainer(
                load_classifier(checkpoint), sophon_args, source_train, target_train, preprocessor, guard
            )
            row["sophon_k2_iteration_s"] = _seconds_per_step(sophon, warmup=1)
        rows[name] = row

    print("[hub] google/ddpm-cifar10-32's UNet")
    unet, scheduler = _ddpm_cifar10_32(), DDPMScheduler(num_train_timesteps=1000)
    images = {
        name: encode_diffusion_split(
            load_image_classification_dataset(name, image_size=32)["train"], 32, 3, limit=4 * args.hub_batch_size
        )
        for name in (source_name, target_name)
    }
    row = {"parameters": sum(p.numel() for p in unet.parameters())}
    with tempfile.TemporaryDirectory() as tmp:
        diffusion_args = SophonDiffusionConfig(
            output_dir=tmp, iterations=1 + args.hub_steps, ntr_steps=1, guard_max_mse_ratio=1e9, **sophon_settings,
            **quiet,
        )  # fmt: skip
        sophon = SophonDiffusionTrainer(
            unet, diffusion_args, scheduler, images[source_name], images[target_name], images[source_name]
        )
        row["sophon_k2_iteration_s"] = _seconds_per_step(sophon, warmup=1)
    rows["ddpm-cifar10-32"] = row
    return rows


def _hub_attack_times(args: BenchArguments, folder: Path) -> dict[str, dict[str, float]]:
    """One attack step of each Hub architecture at 224 px and of the DDPM UNet: a run of 1 + hub_steps steps less
    a run of 1 step (its set-up: the copy, the optimiser), over hub_steps."""
    target_name = args.domains[1]
    runs: dict[str, Callable[[int], object]] = {}
    for name in args.hub_models:
        checkpoint = folder / name
        if not checkpoint.is_dir():
            _hub_checkpoint(name, checkpoint, 10)
        preprocessor = ImagePreprocessor.from_pretrained(checkpoint)
        target = load_image_classification_dataset(target_name, image_size=preprocessor.image_size)
        train = stratified_subset(target["train"], 4 * args.hub_batch_size, seed=0)
        pool = EncodedSplit.from_dataset(train, preprocessor)
        runs[name] = lambda steps, checkpoint=checkpoint, pool=pool: finetune(
            load_classifier(checkpoint), pool, hub_attack(args, steps), seed=0
        )
    unet, scheduler = _ddpm_cifar10_32(), DDPMScheduler(num_train_timesteps=1000)
    images = encode_diffusion_split(
        load_image_classification_dataset(target_name, image_size=32)["train"], 32, 3, limit=4 * args.hub_batch_size
    )
    spec = replace(DIFFUSION_SUITE[0], batch_size=args.hub_batch_size)
    runs["ddpm-cifar10-32"] = lambda steps: finetune_unet(unet, scheduler, images, replace(spec, steps=steps), seed=0)
    rows = {}
    for name, attack in runs.items():
        print(f"[hub] attack steps of {name}")
        row = {}
        for steps in (1, 1 + args.hub_steps):
            began = time.perf_counter()
            attack(steps)
            row[f"attack_{steps}_steps_s"] = time.perf_counter() - began
        row["attack_step_s"] = (row[f"attack_{1 + args.hub_steps}_steps_s"] - row["attack_1_steps_s"]) / args.hub_steps
        rows[name] = row
    return rows


def _hub_audit_memory(args: BenchArguments, folder: Path) -> dict[int, float]:
    """The peak memory (MiB) of a 224 px audit on the first domain (the largest train split), in a fresh process
    per target train size, with the same test images for all."""
    source_name = args.domains[0]
    memory = {}
    checkpoint = folder / "resnet-18"
    if not checkpoint.is_dir():
        _hub_checkpoint("resnet-18", checkpoint, 10)
    preprocessor = ImagePreprocessor.from_pretrained(checkpoint)
    rendered = load_image_classification_dataset(source_name, image_size=preprocessor.image_size)
    test = stratified_subset(rendered["test"], min(500, len(rendered["test"])), seed=0)
    spawn = multiprocessing.get_context("spawn")
    for size in args.hub_audit_train_sizes:
        if size > len(rendered["train"]):
            raise InputError(f"{source_name} has {len(rendered['train'])} train samples; hub audit asks {size}.")
        data = folder / f"{source_name}-{size}"
        if not data.is_dir():
            train = stratified_subset(rendered["train"], size, seed=0)
            DatasetDict({"train": train, "test": test}).save_to_disk(str(data))
        print(f"[hub] audit memory, resnet-18 at 224 px, {size} target train samples")
        with spawn.Pool(1, maxtasksperchild=1) as pool:
            memory[size] = pool.apply(_audit_peak_rss, (str(checkpoint), str(data), [10, 50], 3))
    return memory


def hub_table(result: dict[str, Any]) -> str:
    rows = [["model", "parameters", "plain step", "NTP step", "SOPHON iteration (K = 2, 1 attacker)", "attack step"]]
    for name, row in result["models"].items():
        plain, ntp = row.get("plain_step_s"), row.get("ntp_step_s")
        rows.append(
            [
                name,
                f"{row['parameters'] / 1e6:.1f} M",
                "-" if plain is None else f"{plain:.2f} s",
                "-" if ntp is None else f"{ntp:.2f} s ({ntp / plain:.1f}x)",
                f"{row['sophon_k2_iteration_s']:.2f} s",
                f"{row['attack_step_s']:.2f} s",
            ]
        )
    return _markdown(rows)


# ----------------------------------------------------------------------------- results


def pair_header(first: str, largest_n: int) -> list[str]:
    """The columns of a protected pair's row (`pair_cells`) after `first`."""
    header = [first, "source acc. (%) orig / NTP / SOPHON"]
    header += [f"{DISPLAY[label]}: SLC-AUC masked / worst case" for label in LABELS]
    return [*header, f"acc. (%) at n = {largest_n}, worst case: orig / NTP / SOPHON / scratch"]


def pair_cells(pair: dict[str, Any]) -> list[str]:
    """Source accuracies, SLC-AUC (masked / worst case) per model and accuracies at the largest n of one pair."""
    accuracies = " / ".join(f"{100 * pair[label]['source_accuracy']:.1f}" for label in LABELS)
    scores = [
        f"{pair[label]['masked']['slc_auc']:+.3f} / {pair[label]['worst_case']['slc_auc']:+.3f}" for label in LABELS
    ]
    at_n = " / ".join(f"{100 * pair[label]['worst_case_accuracy_at_largest_n']:.1f}" for label in (*LABELS, SCRATCH))
    return [accuracies, *scores, at_n]


def architectures_table(result: dict[str, Any], quality_result: dict[str, Any] | None, model: str) -> str:
    """One row per architecture on the section's pair; the quality section's `model` on that pair first."""
    rows = [pair_header("model", result["largest_n"])]
    first = next(iter(result["models"].values()))
    for pair in (quality_result or {}).get("pairs", []):
        if (pair["source"], pair["target"]) == (first["source"], first["target"]):
            rows.append([f"{model} (quality section)", *pair_cells(pair)])
    rows += [[preset, *pair_cells(pair)] for preset, pair in result["models"].items()]
    return _markdown(rows)


def quality_tables(result: dict[str, Any], averages: dict[str, dict[str, float]]) -> tuple[str, str]:
    """(per-pair table, averages-beside-anchors table) in Markdown; `averages` from `quality_averages`."""
    n = result["largest_n"]
    grid_range = float(np.log(max(result["counts"]) / min(result["counts"])))
    rows = [pair_header("pair", n)]
    rows += [[f"{pair['source']} → {pair['target']}", *pair_cells(pair)] for pair in result["pairs"]]
    rows.append(
        [
            "**average**",
            " / ".join(f"{100 * averages[label]['source_accuracy']:.1f}" for label in LABELS),
            *[
                f"**{averages[label]['masked_slc_auc']:+.3f} / {averages[label]['worst_case_slc_auc']:+.3f}**"
                for label in LABELS
            ],
            " / ".join(
                f"{100 * averages[label]['worst_case_accuracy_at_largest_n']:.1f}" for label in (*LABELS, SCRATCH)
            ),
        ]
    )
    pair_note = (
        f"SLC-AUC raw; normalised = raw / ln({max(result['counts'])}/{min(result['counts'])}) = raw / "
        f"{grid_range:.2f} (the mean accuracy gap to scratch). Worst case: at each n the attack with the best "
        "validation accuracy (chosen on a validation split held out of the target train split), reported with its "
        "test accuracy, against scratch's attack chosen the same way."
    )

    anchors = [
        [
            "average over pairs",
            "published (raw)",
            "published, normalised by ln 1000",
            "this bench: masked protocol",
            "this bench: worst case of the suite",
        ]
    ]
    for name, value in SLC_AUC_ANCHORS.items():
        method = name.rsplit(": ", 1)[1]
        label = {"NTP": "ntp", "original": "original"}.get(method)
        ours = ["not implemented"] * 2
        if label:
            ours = [
                f"{averages[label][key]:+.3f}" for key in ("masked_slc_auc_normalized", "worst_case_slc_auc_normalized")
            ]
        anchors.append([f"SLC-AUC, {name}", f"{value:+.2f}", f"{value / REFERENCE_GRID_RANGE:+.3f}", *ours])
    anchors.append(
        [
            "SLC-AUC, SOPHON (not reported by its paper)",
            "–",
            "–",
            *[
                f"{averages['sophon'][key]:+.3f}"
                for key in ("masked_slc_auc_normalized", "worst_case_slc_auc_normalized")
            ],
        ]
    )
    anchors.append(
        [
            "target accuracy after fine-tuning: SOPHON vs scratch (original)",
            f"{100 * SOPHON_ANCHOR['sophon']:.1f} % vs {100 * SOPHON_ANCHOR['scratch']:.1f} % "
            f"({100 * SOPHON_ANCHOR['original']:.1f} %), CIFAR-10, 20 epochs",
            "–",
            *[
                f"{100 * averages['sophon'][key]:.1f} % vs {100 * averages[SCRATCH][key]:.1f} % "
                f"({100 * averages['original'][key]:.1f} %), n = {n}"
                for key in ("masked_accuracy_at_largest_n", "worst_case_accuracy_at_largest_n")
            ],
        ]
    )
    anchor_note = (
        "SLC-AUC normalised (raw SLC-AUC depends on the grid: the published figures use fractions 0.001 .. 1 of the "
        f"target set, range ln 1000 = {REFERENCE_GRID_RANGE:.2f}; this bench uses n = {result['counts']}, range "
        f"{grid_range:.2f}). Masked protocol for unpruned models (original, SOPHON) is plain full fine-tuning, "
        "Adam 1e-3."
    )
    return _markdown(rows) + "\n\n" + pair_note, _markdown(anchors) + "\n\n" + anchor_note


def diffusion_table(result: dict[str, Any]) -> str:
    rows = [["model", "before attack", *[f"after attack, n = {n}" for n in result["counts"]], "published (paper)"]]
    for label in ("sophon", "original", SCRATCH):
        before = result["mse_before_attack"].get(label, {}).get("restricted")
        after = [f"{result['worst_case_restricted_mse'][label][str(n)]:.4f}" for n in result["counts"]]
        before_cell = f"{before:.4f}" if before is not None else "–"
        rows.append([DISPLAY[label], before_cell, *after, f"{DIFFUSION_ANCHOR[label]:.3f}"])
    return _markdown(rows)


def cost_table(result: dict[str, Any]) -> str:
    small, large = result["inner_steps_compared"]
    rows = [
        [
            "model",
            "parameters",
            "plain Trainer step",
            "NTP step (ratio)",
            "SOPHON iteration (ratio)",
            f"FTS step K={small} / K={large}",
            f"FTS peak memory K={small} / K={large} (ratio)",
            "one attack run",
        ]
    ]
    for name, row in result["models"].items():
        rows.append(
            [
                name,
                f"{row['parameters'] / 1e6:.2f} M",
                f"{1000 * row['plain_step_s']:.0f} ms",
                f"{1000 * row['ntp_step_s']:.0f} ms ({row['ntp_over_plain']:.2f}x)",
                f"{1000 * row['sophon_step_s']:.0f} ms ({row['sophon_over_plain']:.1f}x)",
                f"{row[f'fts_step_k{small}_s']:.2f} / {row[f'fts_step_k{large}_s']:.2f} s",
                f"{row[f'fts_peak_mib_k{small}']:.1f} / {row[f'fts_peak_mib_k{large}']:.1f} MiB "
                f"({row['fts_peak_memory_ratio']:.2f}x)",
                f"{row['attack_run_s']:.1f} s",
            ]
        )
    return _markdown(rows)


def _markdown(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "|".join("---" for _ in rows[0]) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows[1:]])


def write_results(args: BenchArguments, results: dict[str, Any], out: Path) -> str:
    """results.json, results.md and (with the quality section) slc_auc_heatmap.png; returns the Markdown."""
    out.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/bench.py " + " ".join(sys.argv[1:])
    parts = [
        "# hf_ntl benchmarks",
        f"Produced by `{command.strip()}` on {results['machine']}; that run took "
        + ", ".join(f"{name} {results[name]['wall_time_s'] / 60:.1f} min" for name in SECTIONS if name in results)
        + " (stages an earlier run with the same identity had finished were reused, not re-timed; each audit's and "
        "protection's own time is in results.json). Every number below was measured by that command.",
    ]
    if "quality" in results:
        quality_result = results["quality"]
        quality_result["averages"] = quality_averages(quality_result)
        pairs, anchors = quality_tables(quality_result, quality_result["averages"])
        seeds, counts = quality_result["seeds"], quality_result["counts"]
        parts += [
            "## Protection quality",
            f"{args.model}; every ordered pair of {', '.join(args.domains)}; attacks: the default suite plus the NTP "
            f"paper's masked protocol (`full-masked`), n = {counts}, seeds {seeds}, one scratch baseline per target "
            "shared by the pairs attacking it. SLC-AUC > 0: the model helps the attacker; < 0: it is a worse start "
            "than scratch.",
            pairs,
            "### Averages beside the published anchors",
            anchors,
            "![SLC-AUC per pair](slc_auc_heatmap.png)",
        ]
        panels = {}
        for protocol, key in (("masked protocol", "masked"), ("worst case of the suite", "worst_case")):
            for label in LABELS:
                panels[f"{DISPLAY[label]}, {protocol}"] = {
                    (pair["source"], pair["target"]): pair[label][key]["slc_auc_normalized"]
                    for pair in quality_result["pairs"]
                }
        plot_pair_heatmaps(
            panels,
            args.domains,
            out / "slc_auc_heatmap.png",
            title=f"Normalised SLC-AUC per pair ({args.model}, n = {counts})",
            columns=len(LABELS),
            value_label="normalised SLC-AUC (mean accuracy gap to scratch)",
        )
    if "architectures" in results:
        result = results["architectures"]
        first = next(iter(result["models"].values()))
        parts += [
            "## Protection on other architectures",
            f"{first['source']} → {first['target']} with each tiny preset: its source model fitted with the preset's "
            "own `fit-source` recipe, NTP and SOPHON with their defaults, audited as in the quality section against "
            f"scratch of the same architecture (n = {result['counts']}, seeds {result['seeds']}).",
            architectures_table(result, results.get("quality"), args.model),
        ]
    if "budget" in results:
        result = results["budget"]
        parts += [
            "## Is the scratch baseline converged?",
            "Scratch (tiny-resnet from random initialisation) under the whole suite on each target at the suite's "
            f"budget (as in the quality section) and at twice that budget, seeds {result['seeds']}; worst case chosen "
            "on validation and read on test as above. A change well under a point means SLC-AUC measures saved data, "
            "not saved compute.",
            budget_table(result),
        ]
    if "diffusion" in results:
        result = results["diffusion"]
        parts += [
            "## Diffusion (SOPHON, DoS loss)",
            f"Tiny DDPM on {result['source']}, restricted domain {result['target']}: restricted-domain denoising "
            "MSE (higher is worse for the attacker) before and after the attacker's best attack of the diffusion "
            "suite; the paper's figures are CIFAR-100 → CelebA at full scale.",
            diffusion_table(result),
        ]
    if "cost" in results:
        result = results["cost"]
        parts += [
            "## Cost",
            f"Mean wall time per optimiser step (batch {result['data']['batch_size']}, {result['data']['source']} / "
            f"{result['data']['target']}, default settings): plain `Trainer` over {result['timed_steps']['plain']} "
            "steps after 3 warm-up; NTP over one whole ADMM round (its projection and the hard prune included) and "
            "10 retraining steps; a SOPHON iteration (one fine-tuning-suppression step with 2 simulated attackers x "
            f"K = {next(iter(result['models'].values()))['sophon_inner_steps']}, plus one normal-training step) over "
            f"{result['timed_steps']['sophon']} after 1 warm-up. Peak tensor memory of one suppression step with one "
            f"attacker at each K. One attack run: the suite's `full` attack, n = {result['data']['attack_n']}.",
            cost_table(result),
        ]
        if "quality" in results:
            audit_times = [pair["audit_wall_time_s"] for pair in results["quality"]["pairs"]]
            per_model = [
                pair["ntp"]["attack_seconds"] + pair[SCRATCH]["attack_seconds"] for pair in results["quality"]["pairs"]
            ]
            results["cost"]["audit_wall_time_s"] = statistics.mean(audit_times)
            results["cost"]["one_model_slc_auc_s"] = statistics.mean(per_model)
            parts.append(
                f"One full SLC-AUC evaluation of a pair (original, NTP, SOPHON and scratch under the whole suite): "
                f"{statistics.mean(audit_times):.0f} s on average; of it, one model plus its scratch baseline: "
                f"{statistics.mean(per_model):.0f} s (sum of their run times)."
            )
    if "hub" in results:
        result = results["hub"]
        memory = result["audit_peak_rss_mib"]
        parts += [
            "## Hub-scale architectures",
            f"Random weights built from the Hub configs, at 224 px with each checkpoint's image processor (the UNet "
            f"at 32 px); batch {result['batch_size']}, mean over {result['timed_steps']} steps after warm-up. NTP: an "
            "ADMM step; SOPHON: one iteration with one simulated attacker of K = 2 steps plus one normal-training "
            "step (a default iteration has 2 attackers of K = 10); attack step: the `full` attack (the UNet: "
            f"`{DIFFUSION_SUITE[0].name}`), a run's set-up excluded.",
            hub_table(result),
            f"Peak resident memory of a whole audit process (resnet-18 architecture at 224 px on "
            f"{result['audit']['target']}, "
            f"{result['audit']['attack']} attack, n = {result['audit']['counts']}, {result['audit']['steps']} steps, "
            f"{result['audit']['test_samples']} test images): "
            + ", ".join(f"{float(mib) / 1024:.2f} GiB with {size} target train samples" for size, mib in memory.items())
            + ".",
        ]
    markdown = "\n\n".join(parts) + "\n"
    (out / "results.md").write_text(markdown)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return markdown


# ----------------------------------------------------------------------------- --dry_run


def plan(args: BenchArguments, runs: Path) -> Table:
    """What the bench would do now: every stage of the quality and budget sections, finished (reused) or to
    run, their attack runs, and the time of those runs estimated from a few timed steps of each attack."""
    rows = Table(title="Bench plan (nothing trained, nothing written)", title_justify="left", box=None)
    for column in ("stage", "to run", "reused", "attack runs to run"):
        rows.add_column(column, justify="left" if column == "stage" else "right")
    suite, labels = bench_suite(args), len(LABELS)
    runs_per_model = len(suite) * len(args.seeds) * len(args.counts)
    doubled = doubled_budget(suite)
    # (target, suite) -> attack runs still to make (all on the tiny architecture); suites are the quality
    # section's and the budget section's doubled one.
    pending_runs: dict[tuple[str, tuple[AttackSpec, ...]], int] = {}

    def add(
        stage: str, done: list[bool], runs_each: int = 0, target: str | None = None, specs: list | None = None
    ) -> None:
        todo = done.count(False)
        if target and todo:
            key = (target, tuple(specs or suite))
            pending_runs[key] = pending_runs.get(key, 0) + todo * runs_each
        rows.add_row(stage, str(todo), str(done.count(True)), str(todo * runs_each) if runs_each else "")

    if "quality" in args.sections:
        sources = {domain: runs / "sources" / Path(domain).name for domain in args.domains}
        add(
            "source models",
            [finished_run(f, run_identity("source", source_config(args, f, d))) for d, f in sources.items()],
        )
        pairs = list(permutations(args.domains, 2))
        for method in PROTECTIONS:
            done = []
            for source, target in pairs:
                folder = runs / "quality" / f"{Path(source).name}__{Path(target).name}" / method
                config = protect_config(args, folder, sources[source] / MODEL_SUBDIR, source, target, method)
                identity = run_identity("protect", config, method)
                done.append(protection_finished(folder, identity, sources[source] / MODEL_SUBDIR))
            add(f"{method} protections", done)
        for target in args.domains:
            _, _, finished = audit_request(args, scratch_path(runs, target).parent, {}, target, suite)
            add(f"scratch audit on {Path(target).name}", [finished], runs_per_model, target)
        for source, target in pairs:
            folder = runs / "quality" / f"{Path(source).name}__{Path(target).name}"
            models = {"original": sources[source] / MODEL_SUBDIR}
            models |= {method: folder / method / MODEL_SUBDIR for method in PROTECTIONS}
            _, _, finished = audit_request(args, folder / "audit", models, target, suite, scratch_path(runs, target))
            add(f"audit {Path(source).name} -> {Path(target).name}", [finished], labels * runs_per_model, target)
    if "budget" in args.sections:
        for target in args.domains:
            folder = runs / "budget" / Path(target).name
            _, _, finished = audit_request(args, folder, {}, target, doubled)
            add(f"scratch at twice the budget on {Path(target).name}", [finished], runs_per_model, target, doubled)
    for section in ("architectures", "diffusion"):  # their stages are checked as they run
        if section in args.sections:
            rows.add_row(f"{section} section", "-", "-", "(not planned)")
    if "cost" in args.sections:
        done = (runs / "cost.json").is_file()
        rows.add_row("cost section", "0" if done else "1", "1" if done else "0", "(not estimated)")

    # The runs' time, from a few timed steps of each attack on the tiny architecture (scratch's and the
    # protected models'), one thread per process as the audits run, spread over the audit's processes.
    seconds = 0.0
    threads = torch.get_num_threads()
    for target in {target for target, _ in pending_runs}:
        dataset = load_image_classification_dataset(target)
        validation_indices, pool_indices = validation_split(dataset["train"]["label"], args.validation_samples)
        batch = dataset["train"].select(pool_indices[: max(spec.batch_size for spec in suite)])
        sample = EncodedSplit.from_dataset(batch, ImagePreprocessor())
        model = build_tiny_classifier(args.model, dataset["train"].features["label"].num_classes)
        if args.audit_processes > 1:
            torch.set_num_threads(1)
        try:
            estimate = run_seconds(
                model.to(process_state().device), sample, suite, len(validation_indices) + len(dataset["test"])
            )
        finally:
            torch.set_num_threads(threads)
        for (planned_target, specs), count in pending_runs.items():
            if planned_target == target and count:
                per_model = sum(estimate(spec, n) for spec in specs for n in args.counts) * len(args.seeds)
                seconds += per_model * count / runs_per_model
    estimate_text = (
        f"the audits' attack runs: about {format_duration(seconds / args.audit_processes)} on "
        f"{args.audit_processes} processes here (source fits, protections, diffusion and cost not included)"
        if pending_runs
        else "no attack runs to make"
    )
    rows.caption = f"{len(suite)} attacks x {len(args.seeds)} seeds x counts {args.counts} per model; {estimate_text}."
    rows.caption_justify = "left"
    return rows


def run(argv: list[str] | None = None) -> None:
    """The bench itself (see the module docstring); `main` adds the command line's error handling."""
    (args,) = HfArgumentParser([BenchArguments]).parse_args_into_dataclasses(args=argv)
    transformers_logging.disable_progress_bar()
    diffusers_logging.disable_progress_bar()
    datasets.disable_progress_bars()
    if args.audit_request:  # one rank of an audit the bench launched with torchrun
        run_audit(json.loads(Path(args.audit_request).read_text()))
        return
    start = time.perf_counter()
    check_sample_counts(args)
    runs = Path(args.runs_dir)
    if args.dry_run:
        print_tables([plan(args, runs)])
        return
    if args.overwrite and runs.exists():
        shutil.rmtree(runs)
    identity = {k: v for k, v in vars(args).items() if k not in BOOKKEEPING}
    identity_file = runs / "bench_settings.json"
    recorded = json.loads(identity_file.read_text()) if identity_file.is_file() else identity
    if {k: v for k, v in recorded.items() if k not in BOOKKEEPING} != identity:  # older runs recorded more
        raise InputError(
            f"{runs} holds a bench run with other settings ({identity_file}); pass --overwrite or choose another "
            "--runs_dir."
        )
    runs.mkdir(parents=True, exist_ok=True)
    identity_file.write_text(json.dumps(identity, indent=2) + "\n")
    sections = {
        "quality": quality,
        "architectures": architectures,
        "budget": budget,
        "diffusion": diffusion,
        "cost": cost,
        "hub": hub,
    }
    results: dict[str, Any] = {"settings": identity}
    for name in [name for name in SECTIONS if name in args.sections]:  # budget reads quality's audits
        section_start = time.perf_counter()
        compute = partial(sections[name], args, runs)
        results[name] = _cached(runs / f"{name}.json", compute) if name in MEASUREMENTS else _timed(compute)
        print(f"[{name}] done in {time.perf_counter() - section_start:.0f} s")
    print(f"bench finished in {time.perf_counter() - start:.0f} s")
    results["machine"] = f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"
    print("\n" + write_results(args, results, Path(args.output_dir)))


def main(argv: list[str] | None = None) -> None:
    """`python benchmarks/bench.py ...`: input errors print one line and exit 2, as `hf-ntl` does."""
    try:
        run(argv)
    except InputError as err:
        stop_displays()
        if os.environ.get("HF_NTL_DEBUG", "") not in ("", "0"):
            raise
        print(f"bench: error: {' '.join(str(err).split())}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
