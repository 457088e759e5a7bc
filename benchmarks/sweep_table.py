"""The table of several `hf-ntl tune --sampler grid` studies of one space, and the setting they choose together.

A default must hold on every pair it will meet, not on the one it was tuned on: this reads grid studies of the same
search space run on different pairs (`--sampler grid --pruner none`, e.g. `benchmarks/ntp_sweep.yaml`) and chooses
the setting that kept the source floor on every pair and beat the unprotected original's proxy figure on every pair,
with the lowest proxy worst-case SLC-AUC averaged over the pairs. It reads validation figures only (the trials'
source validation split, the proxy audit on the target validation split), never a test split.

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

from hf_ntl.artifacts import read_record
from hf_ntl.errors import InputError
from hf_ntl.source import MODEL_SUBDIR
from hf_ntl.tune import trial_summary

Setting = tuple[tuple[str, Any], ...]


def read_study(folder: Path) -> dict[str, Any]:
    """A grid study's pair, search space and, per setting, its finished trial's figures; the original's."""
    needed = ("hf_ntl_tune.json", "study.db", "proxy_original.json")
    missing = [name for name in needed if not (folder / name).is_file()]
    if missing:
        raise InputError(f"{folder} is not a started `hf-ntl tune` study (no {', '.join(missing)}).")
    identity = json.loads((folder / "hf_ntl_tune.json").read_text())
    storage = f"sqlite:///{folder / 'study.db'}"
    (name,) = optuna.get_all_study_names(storage)  # the default storage holds its folder's study only
    trials: dict[Setting, dict[str, Any]] = {}
    original_source = None
    for trial in optuna.load_study(study_name=name, storage=storage).trials:
        summary = trial_summary(trial, "source_accuracy")
        if summary["state"] not in ("complete", "pruned"):
            continue  # failed, or running: a retried point has a finished trial of its own
        if summary["pruned_by"] not in (None, "source floor"):
            raise InputError(
                f"{folder}: trial {summary['number']} was stopped by the median pruner; run with --pruner none."
            )
        model = folder / summary["folder"] / MODEL_SUBDIR
        original_source = original_source or read_record(model)["source_accuracy_before"]
        report = folder / summary["folder"] / "proxy_report.json"
        masked = (
            json.loads(report.read_text())["slc_auc"]["per_attack"].get("full-masked") if report.is_file() else None
        )
        trials[tuple(sorted(summary["params"].items()))] = summary | {"masked": masked and masked["slc_auc"]}
    return {
        "pair": f"{identity['source_dataset']} → {identity['target_dataset']}",
        "space": identity["search_space"],
        "original_source": original_source,
        "original_proxy": json.loads((folder / "proxy_original.json").read_text())["slc_auc"]["worst_case"]["slc_auc"],
        "trials": trials,
    }


def cell(study: dict[str, Any], setting: Setting) -> str:
    """One pair's figures for a setting: source accuracy change (points), proxy worst case / masked protocol."""
    trial = study["trials"].get(setting)
    if trial is None:
        return "not run"
    text = f"{100 * (trial['source_accuracy'] - study['original_source']):+.1f}"
    if trial["worst_case_slc_auc"] is not None:  # audited: kept the floor, or the defaults
        text += f" · {trial['worst_case_slc_auc']:+.3f}"
        text += "" if trial["masked"] is None else f" / {trial['masked']:+.3f}"
    text += "" if trial["feasible"] else " (below floor)"
    return f"**{text}**" if trial["defaults"] else text


def table(studies: list[dict[str, Any]]) -> tuple[str, Setting | None]:
    """The markdown table (the settings that qualify on every pair first, best first) and the chosen setting."""
    settings = sorted(set().union(*(study["trials"] for study in studies)))

    def qualifies(setting: Setting) -> bool:
        runs = [(study, study["trials"].get(setting)) for study in studies]
        return all(t and t["feasible"] and t["worst_case_slc_auc"] < study["original_proxy"] for study, t in runs)

    def mean_worst(setting: Setting) -> float:
        return mean(study["trials"][setting]["worst_case_slc_auc"] for study in studies)

    def worst_source_change(setting: Setting) -> float:
        runs = [(study, study["trials"].get(setting)) for study in studies]
        return min(t["source_accuracy"] - study["original_source"] if t else -1.0 for study, t in runs)

    chosen = sorted((s for s in settings if qualifies(s)), key=lambda s: (mean_worst(s), s))
    # The rest by what they cost the owner at worst: what would have to give for them to qualify.
    rest = sorted((s for s in settings if not qualifies(s)), key=lambda s: (-worst_source_change(s), s))
    names = [name for name, _ in settings[0]]
    header = [*names, *(f"{study['pair']}: source Δ · worst / masked" for study in studies), "mean worst case"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    original = [f"{100 * study['original_source']:.1f} % · {study['original_proxy']:+.3f}" for study in studies]
    mean_original = mean(study["original_proxy"] for study in studies)
    lines.append("| " + " | ".join(["original", *[""] * (len(names) - 1), *original, f"{mean_original:+.3f}"]) + " |")
    for setting in chosen + rest:
        row = [str(value) for _, value in setting] + [cell(study, setting) for study in studies]
        row.append(f"{mean_worst(setting):+.3f}" if setting in chosen else "–")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines), (chosen[0] if chosen else None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("studies", nargs="+", type=Path, help="Output folders of grid studies of one search space.")
    parser.add_argument("--output", type=Path, help="Also write the table (markdown) here.")
    args = parser.parse_args()
    try:
        studies = [read_study(folder) for folder in args.studies]
    except InputError as error:
        raise SystemExit(f"sweep_table.py: error: {error}") from None
    if any(study["space"] != studies[0]["space"] for study in studies):
        raise SystemExit("The studies searched different spaces: a setting must have been tried on every pair.")
    text, chosen = table(studies)
    if chosen is None:
        text += "\n\nNo setting kept the source floor and beat the original on every pair."
    else:
        text += (
            f"\n\nChosen (kept the floor and beat the original on every pair, lowest mean worst case): {dict(chosen)}"
        )
    text += (
        "\nSource Δ: points of source validation accuracy against the original (its own row: the accuracy); "
        "worst / masked: the proxy's worst-case and full-masked SLC-AUC (raw, target validation split), for the "
        "settings that kept the floor and the defaults (in bold)."
    )
    print(text)
    if args.output:
        args.output.write_text(text + "\n")


if __name__ == "__main__":
    main()
