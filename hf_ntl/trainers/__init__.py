"""Protection methods, each one config (a `TrainingArguments` subclass) and one `Trainer` subclass."""

from .ntp_config import NTPConfig
from .ntp_trainer import NTPTrainer
from .sophon_base import SimulatedAttack, SophonBaseTrainer
from .sophon_config import SophonConfig, SophonConfigBase
from .sophon_diffusion_config import SophonDiffusionConfig
from .sophon_diffusion_trainer import SophonDiffusionTrainer
from .sophon_trainer import SophonTrainer

__all__ = [
    "NTPConfig",
    "NTPTrainer",
    "SimulatedAttack",
    "SophonBaseTrainer",
    "SophonConfig",
    "SophonConfigBase",
    "SophonDiffusionConfig",
    "SophonDiffusionTrainer",
    "SophonTrainer",
]
