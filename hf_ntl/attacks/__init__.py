"""Attacks: fine-tune a fresh copy of a checkpoint on a few target samples, as an attacker would."""

from .finetune import EncodedSplit, FinetuneSpec, finetune, finetuned_accuracy

__all__ = ["EncodedSplit", "FinetuneSpec", "finetune", "finetuned_accuracy"]
