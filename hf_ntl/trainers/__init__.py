"""Protection methods, each one config (a `TrainingArguments` subclass) and one `Trainer` subclass."""

from .ntp_config import NTPConfig
from .ntp_trainer import NTPTrainer

__all__ = ["NTPConfig", "NTPTrainer"]
