"""Metrics: accuracy (in-house: `evaluate.load("accuracy")` needs the Hub) and learning curves."""

from .accuracy import compute_accuracy, predict_accuracy

__all__ = ["compute_accuracy", "predict_accuracy"]
