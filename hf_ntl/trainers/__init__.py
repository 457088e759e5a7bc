"""Protection methods, each one config (a `TrainingArguments` subclass) and one `Trainer` subclass."""

from .ntp_config import NTPConfig
from .ntp_trainer import NTPTrainer
from .sophon_config import SophonConfig
from .sophon_trainer import SimulatedAttack, SophonTrainer

__all__ = ["NTPConfig", "NTPTrainer", "SimulatedAttack", "SophonConfig", "SophonTrainer"]
