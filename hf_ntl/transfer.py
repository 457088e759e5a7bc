"""Transfer check: how much a checkpoint helps an attacker on a target domain, against scratch.

For each target: zero-shot accuracy (when the label spaces match) and the learning curve of
fine-tuning the checkpoint versus a randomly initialised copy of the same architecture, under one
identical fine-tuning recipe. The attack-suite stage generalises this to many attacks and SLC-AUC.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .artifacts import read_record
from .attacks.finetune import EncodedSplit, FinetuneSpec
from .data import ImagePreprocessor, class_names, load_image_classification_dataset
from .metrics import predict_accuracy
from .metrics.learning_curve import check_counts, learning_curve, mean_by_count, scratch_copy
from .metrics.plots import plot_learning_curves
from .models import load_classifier


@dataclass
class TransferArguments:
    """Which checkpoint to test on which target domains, with which fine-tuning recipe."""

    model_name_or_path: str = field(metadata={"help": "A save_pretrained folder or a Hub model id."})
    target_datasets: list[str] = field(
        default_factory=lambda: ["uci-digits", "textured-digits"],
        metadata={"help": "Target data sets (embedded domain, folder or Hub id)."},
    )
    image_column: str | None = field(default=None, metadata={"help": "Image column of the targets."})
    label_column: str | None = field(default=None, metadata={"help": "Label column of the targets."})
    counts: list[int] = field(default_factory=lambda: [10, 50, 200], metadata={"help": "Target sample counts."})
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2], metadata={"help": "Seeds (subsets and runs)."})
    optimizer: str = field(default="adam", metadata={"help": "sgd, sgd-momentum, adam or adamw."})
    learning_rate: float = field(default=1e-3, metadata={"help": "Fine-tuning learning rate."})
    steps: int = field(default=150, metadata={"help": "Fine-tuning steps per run (same for every count)."})
    batch_size: int = field(default=32, metadata={"help": "Fine-tuning batch size."})
    output_dir: str | None = field(default=None, metadata={"help": "Where to write transfer.json and plots."})

    def spec(self) -> FinetuneSpec:
        return FinetuneSpec(
            name="full",
            optimizer=self.optimizer,
            learning_rate=self.learning_rate,
            steps=self.steps,
            batch_size=self.batch_size,
        )


def run_transfer(args: TransferArguments, progress: bool = True) -> dict[str, Any]:
    """Measure zero-shot and fine-tuned accuracy versus scratch on every target; write the report."""
    spec = args.spec()  # validate the recipe before loading anything
    if not args.seeds:
        raise ValueError("Give at least one seed.")
    preprocessor = ImagePreprocessor.from_pretrained(args.model_name_or_path)
    source_record = read_record(args.model_name_or_path) if Path(args.model_name_or_path).is_dir() else {}
    report: dict[str, Any] = {"model": args.model_name_or_path, "spec": asdict(spec), "targets": {}}
    for target in args.target_datasets:
        dataset = load_image_classification_dataset(
            target,
            image_column=args.image_column,
            label_column=args.label_column,
            image_size=preprocessor.image_size,
        )
        names = class_names(dataset)
        check_counts(args.counts, len(dataset["train"]))
        model = load_classifier(args.model_name_or_path)
        same_labels = model.config.num_labels == len(names)
        if not same_labels:  # a new head of the target's size; zero-shot is then meaningless
            model = load_classifier(args.model_name_or_path, class_names=names)
        train = EncodedSplit.from_dataset(dataset["train"], preprocessor)
        test = EncodedSplit.from_dataset(dataset["test"], preprocessor)
        start = time.perf_counter()
        zero_shot = predict_accuracy(model, test.pixel_values, test.labels) if same_labels else None
        tuned = learning_curve(model, train, test, args.counts, spec, args.seeds, "fine-tuned", progress)
        scratch = learning_curve(
            scratch_copy(model, seed=args.seeds[0]), train, test, args.counts, spec, args.seeds, "scratch", progress
        )
        report["targets"][target] = {
            "classes": len(names),
            "zero_shot_accuracy": zero_shot,
            "fine_tuned": mean_by_count(tuned),
            "scratch": mean_by_count(scratch),
            "points": [p.to_dict() for p in tuned + scratch],
            "wall_time_s": round(time.perf_counter() - start, 1),
        }
    report["source"] = {key: source_record.get(key) for key in ("base_model", "dataset", "test_accuracy")}
    if args.output_dir:
        _write_report(report, Path(args.output_dir))
    return report


def _write_report(report: dict[str, Any], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for target, result in report["targets"].items():
        plot_learning_curves(
            {"fine-tuned from the checkpoint": result["fine_tuned"], "from scratch": result["scratch"]},
            folder / f"transfer-{target.replace('/', '_')}.png",
            title=f"{_model_title(report)} -> {target}",
            chance=1 / result["classes"],
        )
    (folder / "transfer.json").write_text(json.dumps(report, indent=2) + "\n")


def _model_title(report: dict[str, Any]) -> str:
    source = report["source"]
    if source.get("base_model") and source.get("dataset"):
        return f"{source['base_model']} trained on {source['dataset']}"
    return report["model"]


def format_transfer_table(report: dict[str, Any]) -> str:
    """A short terminal table: one row per target and sample count."""
    rows = [("target", "n", "fine-tuned", "scratch", "gain")]
    for target, result in report["targets"].items():
        zero = result["zero_shot_accuracy"]
        rows.append((target, "0", "-" if zero is None else f"{100 * zero:.1f}%", "-", "(zero-shot)"))
        for n, accuracy in result["fine_tuned"].items():
            scratch = result["scratch"][n]
            rows.append(
                (
                    target,
                    str(n),
                    f"{100 * accuracy:.1f}%",
                    f"{100 * scratch:.1f}%",
                    f"{100 * (accuracy - scratch):+.1f}",
                )
            )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths, strict=True)))
        for row in rows
    ]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)
