"""The table of several `hf-ntl tune --sampler grid` studies of one space, and the setting they choose together.

A default must hold on every pair it will meet, not on the one it was tuned on: this reads grid studies of the same
search space run on different pairs (`--sampler grid --pruner none`, e.g. `benchmarks/ntp_sweep.yaml`) and chooses
the setting that kept the source floor on every pair with the lowest proxy worst-case SLC-AUC averaged over them.
Every figure is a validation figure (the trials' source validation split, the proxy audit on the target
validation split): the test splits are read only by the bench that confirms the choice.

    python benchmarks/sweep_table.py runs/sweep/font-digits__uci-digits runs/sweep/textured-digits__font-digits \
        --output runs/sweep/table.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from statistics import mean
from typing import Any

import optuna
from datasets import load_from_disk

from hf_ntl.attacks.finetune import EncodedSplit
from hf_ntl.data import ImagePreprocessor
from hf_ntl.metrics import predict_accuracy
from hf_ntl.models import load_classifier
from hf_ntl.tune import trial_summary


def read_study(folder: Path) -> dict[str, Any]:
    """A grid study's settings and, per setting, its trial's figures; the original's on the same splits."""
    identity = json.loads((folder / "hf_ntl_tune.json").read_text())
    storage = f"sqlite:///{folder / 'study.db'}"
    (name,) = optuna.get_all_study_names(storage)  # the default storage holds its folder's study only
    study = optuna.load_study(study_name=name, storage=storage)
    model = identity["model_name_or_path"]
    source = EncodedSplit.from_dataset(
        load_from_disk(str(folder / "data" / "source"))["test"], ImagePreprocessor.from_pretrained(model)
    )
    trials = {}
    for trial in study.trials:
        summary = trial_summary(trial, "source_accuracy")
        if summary["state"] in ("complete", "pruned"):
            report = folder / summary["folder"] / "proxy_report.json"
            masked = (
                json.loads(report.read_text())["slc_auc"]["per_attack"].get("full-masked") if report.is_file() else None
            )
            trials[settings_key(summary["params"])] = summary | {"masked": masked and masked["slc_auc"]}
    return {
        "pair": f"{identity['source_dataset']} → {identity['target_dataset']}",
        "original_source": predict_accuracy(load_classifier(model), source.pixel_values, source.labels),
        "original_proxy": json.loads((folder / "proxy_original.json").read_text())["slc_auc"]["worst_case"]["slc_auc"],
        "floor": identity["max_source_drop"],
        "trials": trials,
    }


def settings_key(params: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    return tuple(sorted(params.items()))


def table(studies: list[dict[str, Any]]) -> tuple[str, tuple | None]:
    """The markdown table (chosen-on-every-pair settings first, best first) and the chosen setting."""
    keys = set.intersection(*(set(study["trials"]) for study in studies))

    def kept_everywhere(key: tuple) -> bool:
        return all(study["trials"][key]["feasible"] for study in studies)

    def mean_worst(key: tuple) -> float:
        return mean(study["trials"][key]["worst_case_slc_auc"] for study in studies)

    feasible = sorted((k for k in keys if kept_everywhere(k)), key=mean_worst)
    # The rest by how much source accuracy they cost at worst: what would have to give for them to qualify.
    rest = sorted(
        set(keys) - set(feasible),
        key=lambda k: -min(s["trials"][k]["source_accuracy"] - s["original_source"] for s in studies),
    )
    names = [name for name, _ in sorted(keys)[0]] if keys else []
    header = [*names, *(f"{s['pair']}: source Δ · worst / masked" for s in studies), "mean worst case"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines.append(
        "| original"
        + " |" * (len(names) - 1)
        + " | "
        + " | ".join(f"{100 * s['original_source']:.1f} % · {s['original_proxy']:+.3f}" for s in studies)
        + f" | {mean(s['original_proxy'] for s in studies):+.3f} |"
    )
    for key in feasible + rest:
        cells = [str(value) for _, value in key]
        for study in studies:
            trial = study["trials"][key]
            delta = 100 * (trial["source_accuracy"] - study["original_source"])
            cell = f"{delta:+.1f}"
            if trial["worst_case_slc_auc"] is not None:
                masked = f" / {trial['masked']:+.3f}" if trial["masked"] is not None else ""
                cell += f" · {trial['worst_case_slc_auc']:+.3f}{masked}"
            cell += "" if trial["feasible"] else " (below floor)"
            cells.append(f"**{cell}**" if trial["defaults"] else cell)
        cells.append(f"{mean_worst(key):+.3f}" if key in feasible else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines), (feasible[0] if feasible else None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("studies", nargs="+", type=Path, help="Output folders of grid studies of one search space.")
    parser.add_argument("--output", type=Path, help="Also write the table (markdown) here.")
    args = parser.parse_args()
    studies = [read_study(folder) for folder in args.studies]
    text, chosen = table(studies)
    if chosen is None:
        text += "\n\nNo setting kept the source floor on every pair."
    else:
        text += f"\n\nChosen (kept the floor on every pair, lowest mean proxy worst case): {dict(chosen)}"
    text += "\nSource Δ: points of source validation accuracy against the original; worst / masked: the proxy's "
    text += "worst-case and full-masked SLC-AUC (raw, validation); the defaults' row in bold."
    print(text)
    if args.output:
        args.output.write_text(text + "\n")


if __name__ == "__main__":
    main()
