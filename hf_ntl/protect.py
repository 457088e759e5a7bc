"""The protect stage: load the source model and data, run a protection trainer, save the result.

The protected model is written with `save_pretrained` (safetensors; pruned weights stored as
zeros) plus its preprocessing and an `hf_ntl.json` protection record (method, configuration,
achieved sparsity, data used, source accuracy before and after, measured on the same test split
with the saved weights), into `OUTPUT_DIR/model`, only once complete.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

from transformers import TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from .artifacts import read_record, replacing_directory, write_record
from .data import ImagePreprocessor, load_image_classification_dataset, stratified_subset
from .models import head_linear, load_classifier
from .source import MODEL_SUBDIR
from .trainers import NTPConfig, NTPTrainer

# Recorded in the protection record: NTP's own fields and the optimiser settings that matter.
_TRAINING_ARGUMENTS = {f.name for f in dataclasses.fields(TrainingArguments)}
NTP_RECORD_FIELDS = [f.name for f in dataclasses.fields(NTPConfig) if f.name not in _TRAINING_ARGUMENTS] + [
    "learning_rate",
    "weight_decay",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "seed",
]


def run_ntp(config: NTPConfig, progress: bool = True) -> dict[str, Any]:
    """Protect `config.model_name_or_path` with NTP; returns the protection record."""
    if not config.model_name_or_path:
        raise ValueError("Say which model to protect: model_name_or_path (a source model folder or Hub id).")
    start = time.perf_counter()
    preprocessor = ImagePreprocessor.from_pretrained(config.model_name_or_path)
    datasets = {
        role: load_image_classification_dataset(name, image_size=preprocessor.image_size, seed=config.seed)
        for role, name in (("source", config.source_dataset), ("target", config.target_dataset))
    }
    model = load_classifier(config.model_name_or_path)
    source_classes = datasets["source"]["train"].features["label"].num_classes
    if head_linear(model).out_features != source_classes:
        raise ValueError(
            f"{config.model_name_or_path} has a {head_linear(model).out_features}-way head but {config.source_dataset} "
            f"has {source_classes} classes: protect the model on the data it was trained for."
        )
    subsets = {
        role: stratified_subset(data["train"], max(1, round(fraction * len(data["train"]))), seed=config.seed)
        for (role, data), fraction in zip(
            datasets.items(), (config.source_fraction, config.target_fraction), strict=True
        )
    }
    trainer = NTPTrainer(
        model,
        config,
        source_train=subsets["source"],
        target_train=subsets["target"],
        preprocessor=preprocessor,
        source_eval=datasets["source"]["test"],
    )
    output = Path(config.output_dir)
    checkpoint = get_last_checkpoint(str(output)) if output.is_dir() else None
    before = None if checkpoint else trainer.evaluate()["eval_accuracy"]
    trainer.train(resume_from_checkpoint=checkpoint)
    after = trainer.evaluate()["eval_accuracy"]
    source_record = read_record(config.model_name_or_path) if Path(config.model_name_or_path).is_dir() else {}
    record = {
        "stage": "protected",
        "method": "ntp",
        "base_model": source_record.get("base_model", config.model_name_or_path),
        "source_model": config.model_name_or_path,
        "dataset": config.source_dataset,
        "target_dataset": config.target_dataset,
        "config": {name: getattr(config, name) for name in NTP_RECORD_FIELDS},
        "sparsity": trainer.sparsity(),
        "data": {"source_train_samples": len(subsets["source"]), "target_train_samples": len(subsets["target"])},
        "source_accuracy_before": before if before is not None else source_record.get("test_accuracy"),
        "source_accuracy_after": after,
        "wall_time_s": round(time.perf_counter() - start, 1),
    }
    if trainer.is_world_process_zero():
        with replacing_directory(output / MODEL_SUBDIR) as staging:
            trainer.model.save_pretrained(staging)
            preprocessor.save_pretrained(staging)
            write_record(staging, record)
    return record
