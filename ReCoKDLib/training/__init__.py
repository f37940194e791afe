"""Training: trainers, configuration and metrics."""

from .metrics import dice_per_class
from .trainer import Case, DistillationTrainer, History, TrainConfig, Trainer

__all__ = ["Case", "DistillationTrainer", "History", "TrainConfig", "Trainer", "dice_per_class"]
