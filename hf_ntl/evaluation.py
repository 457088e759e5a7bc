"""Attack a checkpoint with a suite of fine-tuning attacks and measure SLC-AUC against scratch.

For every attack, seed and sample count, a fresh copy of the model under test (and, optionally,
of the unprotected original) is fine-tuned on the first n samples of a seeded, class-stratified
order of the target train split, and so is a randomly initialised copy of the same architecture
under exactly the same `AttackSpec`. Every run reports its final accuracy on a validation split
(carved from the target train split, fixed by the data set and disjoint from every learning-curve
subset) and on the test split: the worst case picks each n's attack on validation and reports its
test accuracy; nothing is selected on the test split.

Before any fine-tuning, the leakage guard (`hf_ntl.leakage`) checks that no test image is among
the samples the models' records say they were trained on.

Runs are independent, so under `accelerate launch` / `torchrun` each process takes its share and
the results are gathered on every rank; the report is identical to a single-process run.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from accelerate.utils import gather_object
from datasets import Dataset
from rich.console import RenderableType
from transformers import PreTrainedModel

from .artifacts import check_output_dir, claim_output_dir, read_record, run_identity
from .attacks.finetune import (
    AttackSpec,
    EncodedOnDemand,
    EncodedSplit,
    finetune,
    finetuned_accuracies,
    pruning_masks,
    scoring_batch,
)
from .attacks.suite import load_suite
from .data import ImagePreprocessor, class_names, load_image_classification_dataset, stratified_order
from .data.fingerprint import SampleSet
from .data.loading import AUDIT_VALIDATION_SAMPLES, label_encoding, validation_split
from .errors import InputError
from .leakage import check_audit_overlap
from .metrics import predict_accuracy
from .metrics.learning_curve import (
    CurvePoint,
    check_counts,
    counts_from_fractions,
    mean_curve,
    selected_curve,
)
from .metrics.plots import plot_learning_curves
from .metrics.slc_auc import slc_auc
from .models import head_linear, last_stage, load_classifier, requested_mixed_precision, scratch_copy
from .pruning import mask_sparsity
from .terminal import signed, table, titled, track

SCRATCH = "scratch"


@dataclass
class EvaluateArguments:
    """Which checkpoint to attack, on which target data, with which suite and grid."""

    model_name_or_path: str = field(metadata={"help": "The checkpoint under test: a folder or a Hub model id."})
    target_dataset: str = field(
        default="uci-digits", metadata={"help": "Unauthorised target: embedded domain, folder or Hub dataset id."}
    )
    image_column: str | None = field(default=None, metadata={"help": "Image column of the target."})
    label_column: str | None = field(default=None, metadata={"help": "Label column of the target."})
    suite: str = field(default="default", metadata={"help": "Attack suite: default, quick, or a YAML file."})
    attacks: list[str] | None = field(default=None, metadata={"help": "Run only these attacks of the suite."})
    steps: int | None = field(default=None, metadata={"help": "Override every attack's number of steps."})
    counts: list[int] = field(
        default_factory=lambda: [10, 50, 200], metadata={"help": "Target sample counts (at least two)."}
    )
    fractions: list[float] | None = field(
        default=None,
        metadata={"help": "Fractions of the target train split (less the validation split) instead of counts."},
    )
    validation_samples: int = field(
        default=AUDIT_VALIDATION_SAMPLES,
        metadata={
            "help": "Target train samples held out to choose the worst-case attack per n (fixed by the data set; "
            "never in a learning-curve subset)."
        },
    )
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2], metadata={"help": "Seeds (subset order and runs)."})
    original_model_name_or_path: str | None = field(
        default=None, metadata={"help": "The unprotected original, attacked the same way for comparison."}
    )
    replace_head: bool = field(
        default=False,
        metadata={"help": "Give the model a fresh head of the target's class count when the counts differ."},
    )
    allow_test_overlap: bool = field(
        default=False,
        metadata={
            "help": "Go on when test (or validation) images were trained on (a deliberate experiment; the report "
            "and card say so)."
        },
    )
    mixed_precision: str | None = field(
        default=None,
        metadata={
            "help": "Autocast the attacks' forward passes: no, bf16 or fp16 (default: accelerate launch's "
            "--mixed_precision, else no)."
        },
    )
    output_dir: str | None = field(default=None, metadata={"help": "Where to write report.json and the plot."})
    overwrite: bool = field(default=False, metadata={"help": "Replace the report already in output_dir."})
    dry_run: bool = field(
        default=False,
        metadata={"help": "Check everything and print the plan (runs, budget, estimated time); train nothing."},
    )

    def __post_init__(self) -> None:
        self.mixed_precision = requested_mixed_precision(self.mixed_precision)
        if not self.seeds:
            raise InputError("Give at least one seed.")
        if self.validation_samples < 10:
            raise InputError(
                f"validation_samples must be at least 10 to choose between attacks, got {self.validation_samples}."
            )


@dataclass(frozen=True)
class _Run:
    label: str
    spec: AttackSpec
    seed: int
    num_samples: int


def _fit_to_target(
    model: PreTrainedModel, path: str, names: list[str], suite: list[AttackSpec], replace_head: bool
) -> PreTrainedModel:
    """`model` itself when its head matches the target's classes; else reloaded with a fresh head."""
    outputs = head_linear(model).out_features
    if outputs == len(names):
        return model
    keeping = [spec.name for spec in suite if spec.keeps_head]
    if keeping and not replace_head:
        raise InputError(
            f"{path} has a {outputs}-way head but the target has {len(names)} classes, and attacks {keeping} "
            "keep the head. Pass --replace_head to give it a fresh head of the target's size, or use attacks "
            "with reinit_head: true."
        )
    return load_classifier(path, class_names=names)


def process_state() -> PartialState:
    """This process's place among those `accelerate launch` / `torchrun` started (one if neither).

    Without an accelerator, accelerate forms a CPU process group only when asked to (`cpu=True`);
    otherwise every rank of a CPU launch would run the whole audit on its own.
    """
    return PartialState(cpu=not torch.accelerator.is_available())


def leave_process_group() -> None:
    """Leave the process group of a launch together, at the end of a command or script: a rank that exits while
    another still holds the group can abort the whole launch (gloo on CPU: `terminate called without an active
    exception`). Nothing to do in a single process."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        process_state().wait_for_everyone()
        torch.distributed.destroy_process_group()


def sparsity(model: PreTrainedModel) -> float:
    """Fraction of exact zeros among the encoder's weight matrices and kernels that hold any."""
    return mask_sparsity(pruning_masks(model))


def run_attacks(
    models: dict[str, PreTrainedModel],
    train: EncodedSplit | EncodedOnDemand,
    validation: EncodedSplit,
    test: EncodedSplit,
    suite: list[AttackSpec],
    counts: list[int],
    seeds: list[int],
    progress: bool = True,
    reference: PreTrainedModel | None = None,
    with_scratch: bool = True,
    mixed_precision: str = "no",
) -> list[CurvePoint]:
    """Every (model, attack, seed, count) run, plus the scratch baseline, spread over processes.

    `models` maps labels ("model", "original") to checkpoints; the scratch baseline is a fresh,
    seed-initialised copy of `reference`'s architecture (default: the first model's; with no
    models, only scratch runs). `with_scratch=False` leaves scratch out (for a caller that shares
    one baseline between audits). `train` is the pool learning-curve subsets are drawn from (the
    target train split less `validation`). Forward passes autocast to `mixed_precision`.
    """
    labels = [*models, SCRATCH] if with_scratch else list(models)
    runs = [_Run(label, spec, seed, n) for spec in suite for label in labels for seed in seeds for n in counts]
    orders = {seed: torch.from_numpy(stratified_order(train.labels.numpy(), seed)) for seed in seeds}
    if reference is None and not models:
        raise ValueError("run_attacks needs a model, or a `reference` architecture for scratch-only runs.")
    reference = reference if reference is not None else next(iter(models.values()))
    state = process_state()
    mine = []
    with state.split_between_processes(runs) as share:
        description = "audit" if state.num_processes == 1 else f"audit (rank 0's share of {len(runs)} runs)"
        for run in track(share, description, len(share), show=progress and state.is_main_process):
            model = scratch_copy(reference, run.seed) if run.label == SCRATCH else models[run.label]
            model = model.to(state.device)
            start = time.perf_counter()
            subset = train.select(orders[run.seed][: run.num_samples])
            scored = {"test": test, "validation": validation}
            scores = finetuned_accuracies(model, subset, scored, run.spec, run.seed, mixed_precision)
            mine.append(
                CurvePoint(
                    run.label,
                    run.spec.name,
                    run.num_samples,
                    run.seed,
                    accuracy=scores["test"],
                    validation_accuracy=scores["validation"],
                    steps=run.spec.steps_for(run.num_samples),
                    seconds=time.perf_counter() - start,
                )
            )
    return gather_object(mine) if state.num_processes > 1 else mine


def summarise(points: list[CurvePoint], suite: list[AttackSpec], labels: list[str]) -> dict[str, Any]:
    """Mean curves per model and attack, worst cases, and SLC-AUC (raw and normalised) of each.

    Every choice is made on validation and reported on test: the worst case takes, at each n and
    for each model (scratch included: an attacker without the model would also pick its best
    recipe), the attack with the best validation accuracy; the strongest single attack is the one
    whose validation SLC-AUC against its own scratch run is highest.
    """

    def curves_of(key: str) -> dict[str, dict[str, dict[int, float]]]:
        return {
            label: {
                spec.name: mean_curve((p for p in points if p.model == label and p.attack == spec.name), key)
                for spec in suite
            }
            for label in [*labels, SCRATCH]
        }

    curves, validation_curves = curves_of("accuracy"), curves_of("validation_accuracy")
    worst, chosen = {}, {}
    for label in curves:
        worst[label], chosen[label] = selected_curve(curves[label], validation_curves[label])

    def score(label: str, attack: str, on: dict[str, dict[str, dict[int, float]]]) -> dict[str, float]:
        model_curve, scratch_curve = on[label][attack], on[SCRATCH][attack]
        return slc_auc(list(model_curve), list(model_curve.values()), list(scratch_curve.values()))

    scores: dict[str, Any] = {}
    for label in labels:
        per_attack = {spec.name: score(label, spec.name, curves) for spec in suite}
        per_attack_validation = {spec.name: score(label, spec.name, validation_curves) for spec in suite}
        worst_score = slc_auc(list(worst[label]), list(worst[label].values()), list(worst[SCRATCH].values()))
        strongest = max(per_attack_validation, key=lambda name: per_attack_validation[name]["slc_auc"])
        scores[label] = {
            "per_attack": per_attack,
            "per_attack_validation": per_attack_validation,
            "worst_case": worst_score,
            "strongest_attack": strongest,
        }
    return {
        "curves": curves,
        "validation_curves": validation_curves,
        "worst_case_curves": worst,
        "worst_case_attacks": chosen,
        "slc_auc": scores,
    }


@dataclass
class AuditPlan:
    """An audit loaded and checked, before any encoding or fine-tuning (`plan_evaluation`)."""

    preprocessor: ImagePreprocessor
    names: list[str]
    models: dict[str, PreTrainedModel]
    model_sparsity: float
    suite: list[AttackSpec]
    counts: list[int]
    seeds: list[int]
    splits: dict[str, Dataset]
    samples: dict[str, Any]
    test_overlap: dict[str, Any]
    validation_overlap: dict[str, Any]

    @property
    def runs(self) -> int:
        """Fine-tuning runs the audit makes: every attack, model (and scratch), seed and count."""
        return len(self.suite) * (len(self.models) + 1) * len(self.seeds) * len(self.counts)


def plan_evaluation(args: EvaluateArguments) -> AuditPlan:
    """Load the models and the target data, and check everything an audit depends on (sample counts, the
    leakage guard, the suite, class counts) without encoding or fine-tuning anything."""
    # The model first: a name that is no checkpoint fails here, before its preprocessing is looked for.
    model = load_classifier(args.model_name_or_path)
    preprocessor = ImagePreprocessor.from_pretrained(args.model_name_or_path)

    def load_target(image_size: int):
        return load_image_classification_dataset(
            args.target_dataset, image_column=args.image_column, label_column=args.label_column, image_size=image_size
        )

    dataset = load_target(preprocessor.image_size)
    names = class_names(dataset)
    validation_indices, pool_indices = validation_split(dataset["train"]["label"], args.validation_samples)
    available = len(pool_indices)
    counts = counts_from_fractions(args.fractions, available) if args.fractions else args.counts
    counts = check_counts(counts, available, what=f"the target train split less {args.validation_samples} validation")
    if len(counts) < 2:
        raise InputError(f"SLC-AUC needs at least two distinct sample counts, got {counts}.")
    paths = {"model": args.model_name_or_path}
    if args.original_model_name_or_path:
        paths["original"] = args.original_model_name_or_path
    overlap = check_audit_overlap(
        paths, dataset, preprocessor.image_size, load_target, validation_indices, args.allow_test_overlap
    )

    model_sparsity = sparsity(model)
    suite = load_suite(args.suite, pruned=model_sparsity >= 0.01, steps=args.steps, only=args.attacks)
    if any(spec.reinit_last_stage for spec in suite):
        last_stage(model)  # an architecture without a stack of stages fails here, not after the other attacks
    models = {"model": _fit_to_target(model, args.model_name_or_path, names, suite, args.replace_head)}
    if args.original_model_name_or_path:
        original = load_classifier(args.original_model_name_or_path)
        path = args.original_model_name_or_path
        models["original"] = _fit_to_target(original, path, names, suite, args.replace_head)

    roles = {
        "train pool": (dataset["train"].select(pool_indices), "train"),
        "validation": (dataset["train"].select(validation_indices), "train"),
        "test": (dataset["test"], "test"),
    }
    samples = {
        role: SampleSet.of(split, args.target_dataset, name, preprocessor.image_size).summary()
        for role, (split, name) in roles.items()
    }
    return AuditPlan(
        preprocessor=preprocessor,
        names=names,
        models=models,
        model_sparsity=model_sparsity,
        suite=suite,
        counts=counts,
        seeds=list(args.seeds),
        splits={role: split for role, (split, _) in roles.items()},
        samples=samples,
        test_overlap=overlap["test"],
        validation_overlap=overlap["validation"],
    )


def run_evaluation(args: EvaluateArguments, progress: bool = True) -> dict[str, Any]:
    """Load, attack, score; write `report.json` and `learning_curves.png` to `args.output_dir`."""
    start = time.perf_counter()
    if args.output_dir:
        with process_state().main_process_first():
            claim_output_dir(args.output_dir, run_identity("evaluate", args), args.overwrite, finished="report.json")
    plan = plan_evaluation(args)
    models, suite, counts = plan.models, plan.suite, plan.counts
    train = EncodedOnDemand(plan.splits["train pool"], plan.preprocessor)
    validation = EncodedSplit.from_dataset(plan.splits["validation"], plan.preprocessor)
    test = EncodedSplit.from_dataset(plan.splits["test"], plan.preprocessor)
    batch_size = max(scoring_batch(spec, test) for spec in suite)
    zero_shot = {
        label: predict_accuracy(m, test.pixel_values, test.labels, batch_size, args.mixed_precision)
        for label, m in models.items()
        if m.config.num_labels == len(plan.names) and not args.replace_head
    }
    points = run_attacks(
        models, train, validation, test, suite, counts, args.seeds, progress, mixed_precision=args.mixed_precision
    )
    available = len(train)
    report: dict[str, Any] = {
        "model": args.model_name_or_path,
        "original": args.original_model_name_or_path,
        "target": args.target_dataset,
        "source": read_record(args.model_name_or_path) if Path(args.model_name_or_path).is_dir() else {},
        "classes": len(plan.names),
        "target_label_encoding": label_encoding(plan.splits["test"]),
        "target_train_samples": available,
        "target_validation_samples": len(validation),
        "target_test_samples": len(test),
        "samples": plan.samples,
        "test_overlap": plan.test_overlap,
        "validation_overlap": plan.validation_overlap,
        "counts": counts,
        "fractions": [n / available for n in counts],
        "seeds": list(args.seeds),
        "suite": [spec.to_dict() for spec in suite],
        "steps_per_count": {n: sorted({spec.steps_for(n) for spec in suite}) for n in counts},
        "model_sparsity": plan.model_sparsity,
        "mixed_precision": args.mixed_precision,
        "zero_shot_accuracy": zero_shot,
        **summarise(points, suite, list(models)),
        "points": [p.to_dict() for p in sorted(points, key=lambda p: (p.attack, p.model, p.seed, p.num_samples))],
        "wall_time_s": round(time.perf_counter() - start, 1),
    }
    if args.output_dir and process_state().is_main_process:
        write_report(report, Path(args.output_dir))
    return report


def run_seconds(
    model: PreTrainedModel, sample: EncodedSplit, suite: list[AttackSpec], scored: int, timed_steps: int = 4
) -> Callable[[AttackSpec, int], float]:
    """An estimate of one audit run's seconds, `(spec, n) -> seconds`, from a few timed steps of each attack.

    Each attack of `suite` fine-tunes `model` on the batch `sample` for one step and for `timed_steps` + 1
    steps: the difference is the cost of a step (scaled to a run's batch), the rest its set-up; scoring
    `scored` samples is timed on the batch and scaled. Scratch runs share the model's architecture, so
    the estimate holds for them.
    """
    # The first steps of a process are slow (allocator, kernel selection): warm up before timing.
    finetune(model, sample, replace(suite[0], steps=timed_steps, epochs=None, max_steps=None), seed=0)
    seconds_per_step, setup_seconds = {}, {}
    for spec in suite:
        times = []
        for steps in (1, timed_steps + 1):
            # The faster of two tries, so that a moment of load elsewhere on the machine does not count.
            tries = []
            for _ in range(2):
                began = time.perf_counter()
                finetune(model, sample, replace(spec, steps=steps, epochs=None, max_steps=None), seed=0)
                tries.append(time.perf_counter() - began)
            times.append(min(tries))
        seconds_per_step[spec.name] = max(times[1] - times[0], 0.0) / timed_steps
        setup_seconds[spec.name] = max(times[0] - seconds_per_step[spec.name], 0.0)
    began = time.perf_counter()
    predict_accuracy(model, sample.pixel_values, sample.labels)
    scoring_seconds = (time.perf_counter() - began) * scored / len(sample)

    def estimate(spec: AttackSpec, num_samples: int) -> float:
        # A run on fewer samples than a batch steps on all of them: a step's cost scales with its batch.
        step = seconds_per_step[spec.name] * min(spec.batch_size, num_samples, len(sample)) / len(sample)
        return setup_seconds[spec.name] + spec.steps_for(num_samples) * step + scoring_seconds

    return estimate


def dry_run(args: EvaluateArguments) -> dict[str, Any]:
    """What `run_evaluation(args)` would do, checked and timed, without running the audit or writing anything.

    Every check of a real run is made (output folder, counts, leakage guard, suite, class counts); the time is estimated
    by `run_seconds` on one batch of target samples, on this machine in one process.
    """
    if args.output_dir:
        check_output_dir(args.output_dir, run_identity("evaluate", args), args.overwrite, finished="report.json")
    plan = plan_evaluation(args)
    model = next(iter(plan.models.values())).to(process_state().device)
    pool = plan.splits["train pool"]
    batch = min(max(spec.batch_size for spec in plan.suite), len(pool))
    sample = EncodedSplit.from_dataset(pool.select(range(batch)), plan.preprocessor)
    seconds = run_seconds(model, sample, plan.suite, len(plan.splits["validation"]) + len(plan.splits["test"]))
    per_seed_and_model = sum(seconds(spec, n) for spec in plan.suite for n in plan.counts)
    return {
        "models": {"model": args.model_name_or_path, "original": args.original_model_name_or_path},
        "target": args.target_dataset,
        "samples": {role: len(split) for role, split in plan.splits.items()},
        "attacks": [spec.name for spec in plan.suite],
        "counts": plan.counts,
        "seeds": plan.seeds,
        "runs": plan.runs,
        "steps_per_count": {n: sorted({spec.steps_for(n) for spec in plan.suite}) for n in plan.counts},
        "test_overlap": plan.test_overlap["total"],
        "validation_overlap": plan.validation_overlap["total"],
        "estimated_seconds": per_seed_and_model * (len(plan.models) + 1) * len(plan.seeds),
    }


def write_report(report: dict[str, Any], folder: Path) -> None:
    """`report.json` and `learning_curves.png` (worst cases of model, original, scratch)."""
    folder.mkdir(parents=True, exist_ok=True)
    worst = report["worst_case_curves"]
    curves = {f"{label} (worst case over suite)": worst[label] for label in worst if label != SCRATCH}
    curves[f"{SCRATCH} (best over suite)"] = worst[SCRATCH]
    plot_learning_curves(curves, folder / "learning_curves.png", title=_title(report), chance=1 / report["classes"])
    (folder / "report.json").write_text(json.dumps(report, indent=2) + "\n")


def read_report(path: str | Path) -> dict[str, Any]:
    """Load a `report.json`, turning the sample counts JSON made into strings back into ints."""
    report = json.loads(Path(path).read_text())
    if "validation_curves" not in report:
        raise InputError(
            f"{path} was written by an older hf_ntl, before attacks were chosen on a validation split: rerun "
            "`hf-ntl evaluate` to measure it under the current protocol."
        )
    report["curves"] = {
        label: {attack: {int(n): a for n, a in curve.items()} for attack, curve in attacks.items()}
        for label, attacks in report["curves"].items()
    }
    report["validation_curves"] = {
        label: {attack: {int(n): a for n, a in curve.items()} for attack, curve in attacks.items()}
        for label, attacks in report["validation_curves"].items()
    }
    for key in ("worst_case_curves", "worst_case_attacks"):
        report[key] = {label: {int(n): v for n, v in curve.items()} for label, curve in report[key].items()}
    report["steps_per_count"] = {int(n): steps for n, steps in report["steps_per_count"].items()}
    return report


def _title(report: dict[str, Any]) -> str:
    source = report["source"]
    model = Path(report["model"]).name
    if source.get("base_model") and source.get("dataset"):
        model = f"{source['base_model']} ({source.get('method', source['stage'])}, {source['dataset']})"
    return f"{model} -> {report['target']}"


def report_tables(report: dict[str, Any]) -> list[RenderableType]:
    """The report on a terminal: SLC-AUC per attack and worst case (coloured by sign), worst-case accuracies."""
    labels = list(report["slc_auc"])
    attacks = [spec["name"] for spec in report["suite"]]
    scores = table(["attack", *labels])
    for attack in [*attacks, "worst case"]:
        if attack == "worst case":
            scores.add_section()
        cells = []
        for label in labels:
            by_label = report["slc_auc"][label]
            score = by_label["worst_case"] if attack == "worst case" else by_label["per_attack"][attack]
            cells.append(signed(score["slc_auc"], f"{score['slc_auc']:+.3f} / {score['slc_auc_normalized']:+.3f}"))
        scores.add_row(attack, *cells)
    worst = report["worst_case_curves"]
    accuracies = table(["n", *[f"{label} (worst case)" for label in labels], f"{SCRATCH} (best)"])
    for n in report["counts"]:
        accuracies.add_row(str(n), *[f"{100 * worst[label][n]:.1f}%" for label in [*labels, SCRATCH]])
    return [
        titled("SLC-AUC against scratch, raw / normalised (above 0: a better start than scratch)", scores),
        titled("Test accuracy after the attack chosen on validation", accuracies),
    ]
