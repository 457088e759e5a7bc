"""Hub model cards for protected (or audited) checkpoints, and pushing them to the Hub.

A card is rendered from the model folder's `hf_ntl.json` record and an evaluation `report.json`
with `huggingface_hub.ModelCard` and the Jinja template shipped in `hf_ntl/templates/`. Its
`model-index` holds the numbers a reader compares (every value a plain float, so the YAML stays
safe to load): SLC-AUC of the worst case over the suite and of the strongest single attack, raw
and normalised, named as such; original-domain accuracy before and after protection; NTP's
sparsity. The body shows the learning-curve plot, the per-attack table, how to reproduce the
numbers, and what the threat model does not cover.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData
from huggingface_hub.errors import HfHubHTTPError

from .artifacts import read_record
from .errors import InputError
from .evaluation import SCRATCH, read_report

TEMPLATE = Path(__file__).parent / "templates" / "model_card.md"
DIFFUSION_TEMPLATE = Path(__file__).parent / "templates" / "model_card_diffusion.md"
PLOT = "learning_curves.png"
DIFFUSION_PLOTS = ("denoising_curves.png", "samples.png")  # written by `hf-ntl evaluate-diffusion`
TRIALS_PLOT = "trials.png"  # written by `hf-ntl tune` into the model folder it chose
EMBEDDED_DOMAINS_NOTE = "embedded hf_ntl domain (generated locally, not on the Hub)"
# Class names a card lists when the labels were encoded from strings; config.json's id2label has them all.
LABEL_NAMES_SHOWN = 20


def _is_hub_id(name: str | None) -> bool:
    """Whether `name` looks like a Hub repository id (`owner/name`) rather than a local path or embedded name."""
    return bool(name) and name.count("/") == 1 and not Path(name).exists() and not name.startswith((".", "/"))


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f} %"


def _eval_results(record: dict[str, Any], report: dict[str, Any], label: str) -> list[EvalResult]:
    target, source = report["target"], record.get("dataset")
    scores = report["slc_auc"][label]
    strongest = scores["strongest_attack"]
    results = []

    def add(dataset: str, split: str, metric_type: str, value: float, name: str) -> None:
        results.append(
            EvalResult(
                task_type="image-classification",
                task_name="Image classification",
                dataset_type=dataset,
                dataset_name=dataset,
                dataset_split=split,
                metric_type=metric_type,
                metric_value=float(value),  # numpy/torch scalars would become !!python/object YAML
                metric_name=name,
            )
        )

    add(target, "test", "slc_auc", scores["worst_case"]["slc_auc"], "Worst-case SLC-AUC over the suite (raw)")
    add(
        target,
        "test",
        "slc_auc_normalized",
        scores["worst_case"]["slc_auc_normalized"],
        "Worst-case SLC-AUC over the suite (normalised by the log-count range)",
    )
    strongest_score = scores["per_attack"][strongest]
    add(target, "test", "slc_auc", strongest_score["slc_auc"], f"SLC-AUC of the strongest attack, {strongest} (raw)")
    add(
        target,
        "test",
        "slc_auc_normalized",
        strongest_score["slc_auc_normalized"],
        f"SLC-AUC of the strongest attack, {strongest} (normalised)",
    )
    if "full-masked" in scores["per_attack"]:
        masked = scores["per_attack"]["full-masked"]
        add(target, "test", "slc_auc", masked["slc_auc"], "SLC-AUC, masked fine-tuning (NTP paper protocol, raw)")
    if source and record.get("source_accuracy_after") is not None:
        add(source, "test", "accuracy", record["source_accuracy_after"], "Original-domain accuracy (this model)")
    if source and record.get("source_accuracy_before") is not None:
        add(source, "test", "accuracy", record["source_accuracy_before"], "Original-domain accuracy before protection")
    if source and "sparsity" in record:
        add(source, "test", "sparsity", record["sparsity"]["overall"], "Sparsity of the prunable weights")
    return results


def _attack_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    labels = list(report["slc_auc"])
    rows = []
    for spec in report["suite"]:
        row = {"name": spec["name"], "spec": _describe_attack(spec)}
        for label in labels:
            score = report["slc_auc"][label]["per_attack"][spec["name"]]
            row[label] = f"{score['slc_auc']:+.3f} / {score['slc_auc_normalized']:+.3f}"
        rows.append(row)
    return rows


def _describe_attack(spec: dict[str, Any]) -> str:
    trained = {"all": "all weights", "head": "head only", "lora": f"LoRA r={spec['lora_rank']} + head"}
    budget = f"{spec['steps']} steps"
    if spec.get("epochs") is not None:
        ceiling = f", at most {spec['max_steps']}" if spec.get("max_steps") is not None else ""
        budget = f"{spec['epochs']:g} epochs, at least {spec['steps']} steps{ceiling}"
    optimiser = f"{spec['optimizer']} lr {spec['learning_rate']:g}"
    if spec.get("weight_decay"):
        optimiser += f" wd {spec['weight_decay']:g}"
    if spec.get("lr_scheduler", "constant") != "constant":
        warmup = f" after {spec['warmup_ratio']:.0%} warm-up" if spec.get("warmup_ratio") else ""
        optimiser += f" ({spec['lr_scheduler']}{warmup})"
    parts = [trained[spec["trainable"]], optimiser, budget]
    if spec.get("reinit_last_stage"):
        parts.append("fresh last stage")
    if spec["reinit_head"]:
        parts.append("fresh head")
    if spec["mask"] == "masked":
        parts.append("pruned weights kept at zero")
    return ", ".join(parts)


def build_card(
    model_dir: str | os.PathLike,
    report_dir: str | os.PathLike,
    model_name: str | None = None,
    license: str = "apache-2.0",
) -> ModelCard:
    """Render the card of the checkpoint in `model_dir` from its record and the report in `report_dir`.

    Args:
        model_dir: a folder written by `hf-ntl protect-*` (or `fit-source`), holding `hf_ntl.json`.
        report_dir: the `--output_dir` of `hf-ntl evaluate` run on that checkpoint (`report.json`).
        model_name: the card's title and `model-index` name (default: the folder's name).
        license: the card's license tag.
    """
    model_dir, report_dir = Path(model_dir), Path(report_dir)
    if is_pipeline(model_dir):
        return build_diffusion_card(model_dir, report_dir, model_name, license)
    record = _checked_record(model_dir, report_dir, "evaluate")
    report = read_report(report_dir / "report.json")
    _check_report_is_of(report, record, model_dir, report_dir)
    method = record.get("method", "none")
    name = model_name or model_dir.name
    base = record.get("base_model")
    card_data = ModelCardData(
        model_name=name,
        license=license,
        library_name="transformers",
        pipeline_tag="image-classification",
        tags=["hf-ntl", "non-transferable-learning", "image-classification"] + ([method] if method != "none" else []),
        base_model=base if _is_hub_id(base) else None,
        datasets=[d for d in (record.get("dataset"), report["target"]) if _is_hub_id(d)] or None,
        metrics=["accuracy", "slc_auc"],
        eval_results=_eval_results(record, report, "model"),
    )
    worst, chosen = report["worst_case_curves"], report["worst_case_attacks"]
    labels = list(report["slc_auc"])
    steps = report["steps_per_count"]
    return ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATE),
        model_name=name,
        method=method,
        record=record,
        report=report,
        labels=labels,
        attack_rows=_attack_rows(report),
        accuracy_rows=[
            {"n": n, **{label: f"{_percent(worst[label][n])} ({chosen[label][n]})" for label in [*labels, SCRATCH]}}
            for n in report["counts"]
        ],
        steps_note=", ".join(f"n = {n}: {'/'.join(map(str, steps[n]))} steps" for n in report["counts"]),
        max_steps=max(max(per_count) for per_count in steps.values()),
        leakage_note=_leakage_note(report["test_overlap"], report.get("validation_overlap")),
        label_encoding_note=_label_encoding_note(record.get("label_encoding")),
        scratch=SCRATCH,
        percent=_percent,
        embedded_note=EMBEDDED_DOMAINS_NOTE,
        has_plot=(report_dir / PLOT).is_file(),
        has_trials_plot=(model_dir / TRIALS_PLOT).is_file(),
        config_items=config_items(record),
    )


def config_items(record: dict[str, Any]) -> list[tuple[str, Any]]:
    """The record's configuration, sorted; a setting the method took from the model (None in the configuration:
    NTP's sparsity) is shown with the value it took."""
    config = dict(record.get("config", {}))
    if "sparsity" in config and config["sparsity"] is None and "target" in record.get("sparsity", {}):
        config["sparsity"] = f"{record['sparsity']['target']} (the default for this architecture)"
    return sorted(config.items())


def is_pipeline(model_dir: Path) -> bool:
    """Whether `model_dir` holds a diffusers pipeline (written by `fit-ddpm` or `protect-sophon-diffusion`)."""
    return (model_dir / "model_index.json").is_file()


def _checked_record(model_dir: Path, report_dir: Path, command: str) -> dict[str, Any]:
    """The model's record, once its folder and the report's are known to be hf_ntl's."""
    if not (report_dir / "report.json").is_file():
        raise InputError(f"No report.json in {report_dir}: run `hf-ntl {command} --output_dir {report_dir}`.")
    record = read_record(model_dir)
    if not record:
        raise InputError(f"No hf_ntl.json in {model_dir}: cards are written for folders hf_ntl produced.")
    return record


def _check_report_is_of(report: dict[str, Any], record: dict[str, Any], model_dir: Path, report_dir: Path) -> None:
    # `hf-ntl tune` audits the chosen trial's folder, then releases a copy of it whose record says so.
    audited_as = record.get("tuning", {}).get("audited_as")
    same = Path(report["model"]).resolve() in {model_dir.resolve(), Path(audited_as or model_dir).resolve()}
    if not same and report.get("source", {}) != record:
        raise InputError(f"{report_dir}/report.json evaluates {report['model']}, not {model_dir}.")


def build_diffusion_card(
    model_dir: Path, report_dir: Path, model_name: str | None = None, license: str = "apache-2.0"
) -> ModelCard:
    """`build_card` for a diffusion pipeline, from its record and an `hf-ntl evaluate-diffusion` report."""
    # Imported here: diffusers loads only for pipelines, not for every classifier's card.
    from .attacks.diffusion import describe_attack
    from .evaluation_diffusion import read_report_diffusion

    record = _checked_record(model_dir, report_dir, "evaluate-diffusion")
    if "worst_case_restricted_mse" not in json.loads((report_dir / "report.json").read_text()):
        raise InputError(f"{report_dir}/report.json audits a classifier; {model_dir} is a diffusion pipeline.")
    report = read_report_diffusion(report_dir / "report.json")
    _check_report_is_of(report, record, model_dir, report_dir)
    if not report["slc_auc"]:
        raise InputError(
            f"{report_dir}/report.json was measured at one sample count; the card's denoising SLC-AUC needs two or "
            "more: rerun `hf-ntl evaluate-diffusion` with e.g. --counts 20 100 500."
        )
    method = record.get("method", "none")
    name = model_name or model_dir.name
    base = record.get("base_model")
    source_dataset = report["source_dataset"]
    scores = report["slc_auc"]["model"]

    def result(dataset: str, metric_type: str, value: float, metric_name: str) -> EvalResult:
        return EvalResult(
            task_type="unconditional-image-generation",
            task_name="Unconditional image generation",
            dataset_type=dataset,
            dataset_name=dataset,
            dataset_split="test",
            metric_type=metric_type,
            metric_value=float(value),
            metric_name=metric_name,
        )

    results = [
        result(report["target"], "slc_auc", scores["slc_auc"], "Worst-case denoising SLC-AUC over the suite (raw)"),
        result(
            report["target"],
            "slc_auc_normalized",
            scores["slc_auc_normalized"],
            "Worst-case denoising SLC-AUC (normalised: mean ln of scratch's MSE over this model's)",
        ),
        result(source_dataset, "mse", report["mse_before_attack"]["model"]["original"], "Source denoising MSE"),
    ]
    card_data = ModelCardData(
        model_name=name,
        license=license,
        library_name="diffusers",
        pipeline_tag="unconditional-image-generation",
        tags=["hf-ntl", "non-transferable-learning", "diffusers", "unconditional-image-generation"]
        + ([method] if method != "none" else []),
        base_model=base if _is_hub_id(base) else None,
        datasets=[d for d in (source_dataset, report["target"]) if _is_hub_id(d)] or None,
        metrics=["mse", "slc_auc"],
        eval_results=results,
    )
    worst, chosen = report["worst_case_restricted_mse"], report["strongest_attack"]
    labels = [label for label in worst if label != SCRATCH]
    return ModelCard.from_template(
        card_data,
        template_path=str(DIFFUSION_TEMPLATE),
        model_name=name,
        method=method,
        record=record,
        report=report,
        labels=labels,
        source_dataset=source_dataset,
        mse_rows=[
            {"n": n, **{label: f"{worst[label][n]:.4f} ({chosen[label][n]})" for label in worst}}
            for n in report["counts"]
        ],
        describe=describe_attack,
        max_steps=max(spec["steps"] for spec in report["suite"]),
        leakage_note=_leakage_note(report["test_overlap"], report.get("validation_overlap")),
        scratch=SCRATCH,
        embedded_note=EMBEDDED_DOMAINS_NOTE,
        has_plot=(report_dir / DIFFUSION_PLOTS[0]).is_file(),
        has_samples=(report_dir / DIFFUSION_PLOTS[1]).is_file(),
        has_trials_plot=(model_dir / TRIALS_PLOT).is_file(),
        config_items=config_items(record),
    )


def _label_encoding_note(encoding: dict[str, Any] | None) -> str | None:
    """The line saying which class id each name got, when the record says the labels were strings."""
    if not encoding:
        return None
    classes = list(encoding["classes"].items())
    shown = ", ".join(f"{class_id} = {name}" for class_id, name in classes[:LABEL_NAMES_SHOWN])
    more = len(classes) - LABEL_NAMES_SHOWN
    rest = f", and {more} more (all in `config.json`'s `id2label`)" if more > 0 else ""
    return f"Labels were encoded from the string column `{encoding['column']}`: {shown}{rest}."


def _leakage_note(overlap: dict[str, Any], validation: dict[str, Any] | None) -> str:
    """What the card says of the leakage guard's check of the test split (and of the validation split the worst
    case is chosen on; `None` for a report written before that was checked) against the training records."""
    sets = sum(len(per_model) for per_model in overlap["counts"].values())
    unrecorded = sorted({path for paths in overlap["unrecorded"].values() for path in paths})
    if overlap["total"]:
        note = (
            f"**{overlap['total']} test images were trained on** (allowed for a deliberate experiment): the figures "
            "below overstate what an attacker gets from unseen data."
        )
    elif not sets:
        note = "not possible: no record of this model's (or its original's) training data was found."
    else:
        note = (
            f"the {sets} sample sets this model's records (and its original's) say were trained on hold none of the "
            "test images (hashes of every image compared before any fine-tuning)."
        )
    if validation is None:
        note += " The validation images the worst case is chosen on were not checked (an older report)."
    elif validation["total"]:
        note += (
            f" **{validation['total']} of the validation images the worst case is chosen on were trained on** "
            "(allowed): the choice of attack may favour the model."
        )
    elif sets:
        note += " None of the validation images the worst case is chosen on was trained on."
    if unrecorded:
        note += f" No record of training data for: {', '.join(unrecorded)} (not checked)."
    return note


def write_card(model_dir: str | os.PathLike, report_dir: str | os.PathLike, model_name: str | None = None) -> ModelCard:
    """Write `README.md` (the card) and the learning-curve plot into `model_dir`, ready to push."""
    card = build_card(model_dir, report_dir, model_name)
    model_dir, report_dir = Path(model_dir), Path(report_dir)
    for plot in DIFFUSION_PLOTS if is_pipeline(model_dir) else (PLOT,):
        if (report_dir / plot).is_file() and report_dir.resolve() != model_dir.resolve():
            shutil.copyfile(report_dir / plot, model_dir / plot)
    # Written beside, then renamed: an interrupted write never leaves a half card in place.
    staging = model_dir / ".README.md.partial"
    card.save(staging)
    os.replace(staging, model_dir / "README.md")
    return card


def push_to_hub(
    model_dir: str | os.PathLike,
    repo_id: str,
    private: bool = True,
    token: str | None = None,
    commit_message: str = "Upload hf_ntl protected model",
) -> str:
    """Create (if needed) the model repo `repo_id` and upload the folder: weights, card, plot, record.

    Refuses a folder without a card, so that nothing reaches the Hub undocumented. Returns the
    commit URL.
    """
    folder = Path(model_dir)
    # A pipeline keeps its weights in per-component folders (unet/, scheduler/), indexed by model_index.json.
    needed = ("model_index.json",) if is_pipeline(folder) else ("model.safetensors", "config.json")
    missing = [f for f in (*needed, "README.md") if not (folder / f).is_file()]
    if missing:
        hint = " (write the card with `hf-ntl card` first)" if "README.md" in missing else ""
        raise InputError(f"{folder} lacks {', '.join(missing)}{hint}.")
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        commit = api.upload_folder(
            repo_id=repo_id,
            folder_path=str(folder),
            repo_type="model",
            commit_message=commit_message,
            allow_patterns=["*.safetensors", "*.json", "README.md", "*.png"],
        )
    except (HfHubHTTPError, OSError) as err:  # refused (token, rights, name), no token, or no connection
        raise InputError(
            f"Uploading {folder} to {repo_id} failed: {err} (log in with `hf auth login` or pass --token)."
        ) from err
    return str(commit)
