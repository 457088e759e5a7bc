"""Attack diffusion pipelines on a restricted domain and measure how well they denoise afterwards.

For every attack, seed and number of restricted images n, a fresh copy of the model under test
(and of the unprotected original, and a randomly initialised UNet of the same architecture: the
scratch baseline) is fine-tuned with the DDPM objective on the first n images of a seeded order of
the restricted train split. Each run reports the denoising MSE on restricted and original-domain
test images (fixed noise, a fixed timestep grid), and the restricted MSE along its steps. The
attacker's best result at each n (lowest MSE over the suite) is the worst case. Higher MSE after
attack is better for the owner; the paper's ordering to beat is protected > scratch > original.

Runs are independent: under `accelerate launch` / `torchrun` each process takes its share.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate.utils import gather_object
from diffusers import DDPMScheduler, UNet2DModel
from rich.console import RenderableType

from .artifacts import claim_output_dir, read_record, run_identity
from .attacks.diffusion import DIFFUSION_SUITE, DiffusionAttackSpec, finetune_unet
from .attacks.suite import suite_from_yaml
from .data import encode_diffusion_split, load_image_classification_dataset, stratified_order
from .data.fingerprint import SampleSet
from .data.loading import SPLIT_SEED, stratified_subset, validation_split
from .errors import InputError
from .evaluation import SCRATCH, process_state
from .leakage import check_audit_overlap
from .metrics.denoising import generate_samples, mean_denoising_mse, timestep_grid
from .metrics.learning_curve import check_counts
from .metrics.plots import plot_denoising_curves, plot_sample_grid
from .metrics.slc_auc import slc_auc
from .models import load_ddpm, requested_mixed_precision
from .terminal import table, titled, track


@dataclass
class DiffusionEvaluateArguments:
    """Which pipelines to attack, on which restricted data, with which attacks and grid."""

    model_name_or_path: str = field(metadata={"help": "The pipeline under test: a folder or a Hub id."})
    original_model_name_or_path: str | None = field(
        default=None, metadata={"help": "The unprotected original pipeline, attacked the same way."}
    )
    target_dataset: str = field(default="uci-digits", metadata={"help": "The restricted domain the attacker has."})
    source_dataset: str | None = field(
        default=None, metadata={"help": "The original domain (default: the one in the model's record)."}
    )
    suite: str = field(
        default="default",
        metadata={
            "help": "`default` (the attacks below) or a YAML list of attacks (`DiffusionAttackSpec` fields: name, "
            "trainable, optimizer, learning_rate, steps, ...)."
        },
    )
    attacks: list[str] | None = field(
        default=None,
        metadata={
            "help": f"Run only these of the suite's attacks (default: all; {[s.name for s in DIFFUSION_SUITE]})."
        },
    )
    steps: int | None = field(default=None, metadata={"help": "Override every attack's number of steps."})
    counts: list[int] = field(
        default_factory=lambda: [20, 100, 500], metadata={"help": "Restricted images the attacker has."}
    )
    seeds: list[int] = field(default_factory=lambda: [0], metadata={"help": "Seeds (image order and runs)."})
    probes: int = field(default=4, metadata={"help": "Restricted-MSE measurements along each run's steps."})
    test_samples: int = field(default=256, metadata={"help": "Test images per domain for the MSE."})
    validation_samples: int = field(
        default=100,
        metadata={
            "help": "Restricted train images held out to choose the strongest attack per n (fixed by the data set; "
            "never given to an attacker)."
        },
    )
    allow_test_overlap: bool = field(
        default=False,
        metadata={
            "help": "Go on when test (or validation) images were trained on (a deliberate experiment; the report "
            "says so)."
        },
    )
    eval_timesteps: int = field(default=10, metadata={"help": "Timesteps of the denoising-MSE grid."})
    mixed_precision: str | None = field(
        default=None,
        metadata={
            "help": "Autocast the attacks' and the MSE's forward passes: no, bf16 or fp16 (default: accelerate "
            "launch's --mixed_precision, else no)."
        },
    )
    sample_images: int = field(default=8, metadata={"help": "Images per row of the sample grid (0: none)."})
    num_inference_steps: int = field(default=100, metadata={"help": "DDPM sampling steps for the sample grid."})
    output_dir: str | None = field(default=None, metadata={"help": "Where to write report.json and the plots."})
    overwrite: bool = field(default=False, metadata={"help": "Replace the report already in output_dir."})

    def __post_init__(self) -> None:
        self.mixed_precision = requested_mixed_precision(self.mixed_precision)
        if not self.seeds:
            raise InputError("Give at least one seed.")
        if self.probes < 1 or self.test_samples < 1 or self.eval_timesteps < 1 or self.validation_samples < 1:
            raise InputError("probes, test_samples, validation_samples and eval_timesteps must be >= 1.")

    def attack_suite(self) -> list[DiffusionAttackSpec]:
        """The suite's attacks (only those named in `attacks`, with `steps` when given)."""
        if self.suite == "default":
            suite = list(DIFFUSION_SUITE)
        elif Path(self.suite).is_file():
            suite = suite_from_yaml(Path(self.suite), DiffusionAttackSpec)
        else:
            raise InputError(f"Unknown diffusion suite {self.suite!r}: not `default` and not a YAML file.")
        known = {spec.name: spec for spec in suite}
        if len(known) != len(suite):
            raise InputError(f"Attack names must be unique within a suite: {[spec.name for spec in suite]}.")
        unknown = sorted(set(self.attacks or []) - set(known))
        if unknown:
            raise InputError(f"Unknown diffusion attacks {unknown}; choose from {sorted(known)}.")
        chosen = [known[name] for name in self.attacks] if self.attacks else suite
        if self.steps is not None:
            chosen = [DiffusionAttackSpec(**{**spec.to_dict(), "steps": self.steps}) for spec in chosen]
        return chosen


@dataclass(frozen=True)
class DenoisingPoint:
    """One attack run: restricted (test and validation) and original-domain MSE after it, and restricted MSE
    along its steps."""

    model: str
    attack: str
    num_samples: int
    seed: int
    restricted_mse: float
    restricted_validation_mse: float
    original_mse: float
    restricted_mse_by_step: dict[int, float]
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def scratch_unet(reference: UNet2DModel, seed: int) -> UNet2DModel:
    """A randomly initialised UNet of `reference`'s architecture (the attacker without the model)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UNet2DModel.from_config(reference.config)


@dataclass
class DiffusionPlan:
    """What an audit of diffusion pipelines attacks, with what, and how it scores: loaded and encoded once.

    `train` is the restricted train pool (less the validation images), `orders[seed]` each seed's order of it (an
    attacker with n images gets the first n); `tests` the scored restricted and original test images.
    """

    args: DiffusionEvaluateArguments
    suite: list[DiffusionAttackSpec]
    record: dict[str, Any]
    source_dataset: str
    models: dict[str, UNet2DModel]
    scheduler: DDPMScheduler
    counts: list[int]
    train: torch.Tensor
    validation: torch.Tensor
    tests: dict[str, torch.Tensor]
    orders: dict[int, torch.Tensor]
    grid: list[int]
    samples: dict[str, Any]
    test_overlap: dict[str, Any]
    validation_overlap: dict[str, Any]

    def mse(self, model: torch.nn.Module, domain: str) -> float:
        """Denoising MSE of `model` on `validation`, or on the `restricted` or `original` test images."""
        images = self.validation if domain == "validation" else self.tests[domain]
        return mean_denoising_mse(model, self.scheduler, images, self.grid, mixed_precision=self.args.mixed_precision)


def plan_evaluation_diffusion(args: DiffusionEvaluateArguments) -> DiffusionPlan:
    """Load the pipelines and data, split and encode them, and run the leakage guard; nothing is trained yet."""
    suite = args.attack_suite()
    record = read_record(args.model_name_or_path) if Path(args.model_name_or_path).is_dir() else {}
    source_dataset = args.source_dataset or record.get("dataset")
    if not source_dataset:
        raise InputError(f"{args.model_name_or_path} has no hf_ntl record naming its domain: pass --source_dataset.")
    unet, scheduler = load_ddpm(args.model_name_or_path)
    models = {"model": unet}
    if args.original_model_name_or_path:
        original, _ = load_ddpm(args.original_model_name_or_path)
        if (
            original.config.sample_size != unet.config.sample_size
            or original.config.in_channels != unet.config.in_channels
        ):
            raise InputError("The original and the model under test take images of different shapes.")
        models["original"] = original
    size, channels = unet.config.sample_size, unet.config.in_channels
    target = load_image_classification_dataset(args.target_dataset, image_size=size)
    source = load_image_classification_dataset(source_dataset, image_size=size)
    validation_indices, pool_indices = validation_split(target["train"]["label"], args.validation_samples)
    what = f"the restricted train split less {args.validation_samples} validation images"
    counts = check_counts(args.counts, len(pool_indices), what=what)
    paths = {"model": args.model_name_or_path}
    if args.original_model_name_or_path:
        paths["original"] = args.original_model_name_or_path
    overlap = check_audit_overlap(
        paths,
        target,
        size,
        lambda other: load_image_classification_dataset(args.target_dataset, image_size=other),
        validation_indices,
        args.allow_test_overlap,
    )

    def scored(split):  # a stratified subset fixed by the data set when the split is larger than test_samples
        return stratified_subset(split, args.test_samples, seed=SPLIT_SEED) if len(split) > args.test_samples else split

    splits = {
        "restricted train pool": (target["train"].select(pool_indices), args.target_dataset, "train"),
        "restricted validation": (target["train"].select(validation_indices), args.target_dataset, "train"),
        "restricted test": (scored(target["test"]), args.target_dataset, "test"),
        "original test": (scored(source["test"]), source_dataset, "test"),
    }
    samples = {role: SampleSet.of(split, name, which, size).summary() for role, (split, name, which) in splits.items()}
    train, validation, *scored_tests = (
        encode_diffusion_split(split, size, channels) for split, _, _ in splits.values()
    )
    pool_labels = np.asarray(target["train"]["label"])[pool_indices]
    return DiffusionPlan(
        args=args,
        suite=suite,
        record=record,
        source_dataset=source_dataset,
        models=models,
        scheduler=scheduler,
        counts=counts,
        train=train,
        validation=validation,
        tests=dict(zip(("restricted", "original"), scored_tests, strict=True)),
        orders={seed: torch.from_numpy(stratified_order(pool_labels, seed)) for seed in args.seeds},
        grid=timestep_grid(scheduler, args.eval_timesteps),
        samples=samples,
        test_overlap=overlap["test"],
        validation_overlap=overlap["validation"],
    )


def run_denoising_attacks(
    plan: DiffusionPlan,
    labels: list[str],
    suite: list[DiffusionAttackSpec],
    description: str = "audit",
    progress: bool = True,
) -> list[DenoisingPoint]:
    """Every run of `suite` on the models `labels` (keys of `plan.models`, or `SCRATCH`) for each seed and count.

    Under `accelerate launch` each process takes its share; every process gets all points back.
    """
    reference = plan.models["model"]
    runs = [
        (label, spec, seed, n) for spec in suite for label in labels for seed in plan.args.seeds for n in plan.counts
    ]
    state = process_state()
    mine = []
    with state.split_between_processes(runs) as share:
        if state.num_processes > 1:
            description = f"{description} (rank 0's share of {len(runs)} runs)"
        for label, spec, seed, n in track(share, description, len(share), show=progress and state.is_main_process):
            model = scratch_unet(reference, seed) if label == SCRATCH else plan.models[label]
            began = time.perf_counter()
            attacked, by_step = finetune_unet(
                model.to(state.device),
                plan.scheduler,
                plan.train[plan.orders[seed][:n]],
                spec,
                seed,
                probe=lambda m: plan.mse(m, "restricted"),
                probe_every=max(1, spec.steps // plan.args.probes),
                mixed_precision=plan.args.mixed_precision,
            )
            final, seconds = by_step[spec.steps], time.perf_counter() - began
            validation_mse, original_mse = plan.mse(attacked, "validation"), plan.mse(attacked, "original")
            mine.append(
                DenoisingPoint(label, spec.name, n, seed, final, validation_mse, original_mse, by_step, seconds)
            )
    return gather_object(mine) if state.num_processes > 1 else mine


def run_evaluation_diffusion(args: DiffusionEvaluateArguments, progress: bool = True) -> dict[str, Any]:
    """Load, attack, score; write `report.json`, `denoising_curves.png` and `samples.png` to `output_dir`."""
    start = time.perf_counter()
    if args.output_dir:
        with process_state().main_process_first():
            identity = run_identity("evaluate-diffusion", args)
            claim_output_dir(args.output_dir, identity, args.overwrite, finished="report.json")
    plan = plan_evaluation_diffusion(args)
    models, tests = plan.models, plan.tests
    before = {label: {domain: plan.mse(m, domain) for domain in tests} for label, m in models.items()}
    labels = [*models, SCRATCH]
    points = run_denoising_attacks(plan, labels, plan.suite, progress=progress)
    report: dict[str, Any] = {
        "model": args.model_name_or_path,
        "original": args.original_model_name_or_path,
        "source": plan.record,
        "source_dataset": plan.source_dataset,
        "target": args.target_dataset,
        "counts": plan.counts,
        "seeds": list(args.seeds),
        "timestep_grid": plan.grid,
        "test_samples": {domain: len(images) for domain, images in tests.items()},
        "validation_samples": len(plan.validation),
        "samples": plan.samples,
        "test_overlap": plan.test_overlap,
        "validation_overlap": plan.validation_overlap,
        "mixed_precision": args.mixed_precision,
        "suite": [spec.to_dict() for spec in plan.suite],
        "mse_before_attack": before,
        **summarise_denoising(points, plan.suite, labels, plan.counts),
        "points": [p.to_dict() for p in points],
    }
    if args.output_dir and process_state().is_main_process:
        folder = Path(args.output_dir)
        folder.mkdir(parents=True, exist_ok=True)
        if args.sample_images:
            rows = sample_rows(models, plan.scheduler, plan.train, plan.orders, report, plan.suite, args)
            plot_sample_grid(rows, folder / "samples.png", title=_title(report))
    report["wall_time_s"] = round(time.perf_counter() - start, 1)
    if args.output_dir and process_state().is_main_process:
        write_report(report, folder)
    return report


def summarise_denoising(
    points: list[DenoisingPoint], suite: list[DiffusionAttackSpec], labels: list[str], counts: list[int]
) -> dict[str, Any]:
    """Mean MSE per model, attack and n; the worst case and its attack; the worst case's denoising SLC-AUC.

    The worst case at each n is the attack with the lowest restricted *validation* MSE (what an attacker
    can measure), reported with its restricted *test* MSE. The denoising SLC-AUC of a model (given two
    counts or more) is SLC-AUC with -ln(MSE) in place of accuracy: the area between its worst-case curve
    and scratch's over ln n; normalised, the mean over ln n of ln(scratch's MSE / the model's). Positive:
    after the attack the model denoises the restricted domain better than scratch does (a head start);
    negative: it is a worse start than random weights. A ratio, so it does not depend on the MSE's scale.
    """

    def runs(label: str, attack: str, n: int) -> list[DenoisingPoint]:
        return [p for p in points if (p.model, p.attack, p.num_samples) == (label, attack, n)]

    def mean_curves(value: str) -> dict[str, dict[str, dict[int, float]]]:
        return {
            label: {
                spec.name: {n: float(np.mean([getattr(p, value) for p in runs(label, spec.name, n)])) for n in counts}
                for spec in suite
            }
            for label in labels
        }

    restricted, original = mean_curves("restricted_mse"), mean_curves("original_mse")
    validation = mean_curves("restricted_validation_mse")
    strongest = {
        label: {n: min(validation[label], key=lambda attack: validation[label][attack][n]) for n in counts}
        for label in labels
    }
    worst = {label: {n: restricted[label][strongest[label][n]][n] for n in counts} for label in labels}
    largest = max(counts)
    by_step = {}
    for label in labels:
        histories = [p.restricted_mse_by_step for p in runs(label, strongest[label][largest], largest)]
        by_step[label] = {step: float(np.mean([h[step] for h in histories])) for step in histories[0]}
    scores = {}
    if len(counts) > 1 and SCRATCH in labels:

        def log_curve(label: str) -> list[float]:
            return [-float(np.log(worst[label][n])) for n in counts]

        scores = {label: slc_auc(counts, log_curve(label), log_curve(SCRATCH)) for label in labels if label != SCRATCH}
    return {
        "slc_auc": scores,
        "restricted_mse": restricted,
        "restricted_validation_mse": validation,
        "original_mse_after_attack": original,
        "worst_case_restricted_mse": worst,
        "strongest_attack": strongest,
        "worst_case_restricted_mse_by_step": by_step,
    }


def sample_rows(models, scheduler, train, orders, report, suite, args) -> dict[str, np.ndarray]:
    """Generated images before attack and after each model's strongest attack at the largest n (first seed)."""
    seed, largest = args.seeds[0], max(report["counts"])
    specs = {spec.name: spec for spec in suite}
    rows = {}
    for label, model in models.items():
        rows[f"{label}, before attack"] = generate_samples(
            model, scheduler, args.sample_images, num_inference_steps=args.num_inference_steps
        )
    for label in [*models, SCRATCH]:
        attack = report["strongest_attack"][label][largest]
        model = scratch_unet(models["model"], seed) if label == SCRATCH else models[label]
        attacked, _ = finetune_unet(
            model, scheduler, train[orders[seed][:largest]], specs[attack], seed, mixed_precision=args.mixed_precision
        )
        rows[f"{label}, after {attack} (n={largest})"] = generate_samples(
            attacked, scheduler, args.sample_images, num_inference_steps=args.num_inference_steps
        )
    return rows


def write_report(report: dict[str, Any], folder: Path) -> None:
    """`report.json` and `denoising_curves.png` (worst-case restricted MSE against n)."""
    worst = report["worst_case_restricted_mse"]
    curves = {f"{label} (attacker's best)": worst[label] for label in worst}
    plot_denoising_curves(curves, folder / "denoising_curves.png", _title(report), "restricted images (log scale)")
    (folder / "report.json").write_text(json.dumps(report, indent=2) + "\n")


def read_report_diffusion(path: str | Path) -> dict[str, Any]:
    """Load an `evaluate-diffusion` `report.json`, turning the sample counts JSON made into strings back into ints."""
    report = json.loads(Path(path).read_text())
    if "slc_auc" not in report:
        raise InputError(
            f"{path} was written by an older hf_ntl, before the denoising SLC-AUC: rerun `hf-ntl evaluate-diffusion`."
        )
    for key in ("worst_case_restricted_mse", "strongest_attack", "worst_case_restricted_mse_by_step"):
        report[key] = {label: {int(n): v for n, v in curve.items()} for label, curve in report[key].items()}
    for key in ("restricted_mse", "restricted_validation_mse", "original_mse_after_attack"):
        report[key] = {
            label: {attack: {int(n): v for n, v in curve.items()} for attack, curve in attacks.items()}
            for label, attacks in report[key].items()
        }
    return report


def _title(report: dict[str, Any]) -> str:
    source = report["source"]
    name = Path(report["model"]).name
    if source.get("method"):
        name = f"{source.get('base_model', name)} ({source['method']}, {source.get('dataset')})"
    return f"{name} -> {report['target']}"


def denoising_tables(report: dict[str, Any]) -> list[RenderableType]:
    """The report on a terminal: restricted MSE after the attacker's best attack per n, and MSE before attack."""
    labels = list(report["worst_case_restricted_mse"])
    after = table(["n", *labels])
    for n in report["counts"]:
        after.add_row(
            str(n),
            *[
                f"{report['worst_case_restricted_mse'][label][n]:.4f} ({report['strongest_attack'][label][n]})"
                for label in labels
            ],
        )
    if report.get("slc_auc"):
        scores = report["slc_auc"]
        after.add_row(
            "denoising SLC-AUC", *[f"{scores[label]['slc_auc']:+.3f}" if label in scores else "" for label in labels]
        )
    before = table(["", *report["mse_before_attack"]])
    for domain in ("restricted", "original"):
        before.add_row(domain, *[f"{mse[domain]:.4f}" for mse in report["mse_before_attack"].values()])
    return [
        titled("Restricted denoising MSE after the attack chosen on validation (higher: less learned)", after),
        titled("Denoising MSE before attack", before),
    ]
