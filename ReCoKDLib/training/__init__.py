"""Training: the in-memory trainers of the demo, the epoch-based run loop of ``recokd train/distill``,
configuration, splits, checkpoints and metrics."""

from .checkpoint import atomic_torch_save, load_checkpoint
from .loop import DistillTrainModule, EpochTrainer, RunConfig, SegTrainModule, ValCase
from .metrics import dice_per_class
from .splits import fixed_split, kfold_split
from .trainer import Case, DistillationTrainer, History, TrainConfig, Trainer

__all__ = [
    "Case",
    "DistillTrainModule",
    "DistillationTrainer",
    "EpochTrainer",
    "History",
    "RunConfig",
    "SegTrainModule",
    "TrainConfig",
    "Trainer",
    "ValCase",
    "atomic_torch_save",
    "dice_per_class",
    "fixed_split",
    "kfold_split",
    "load_checkpoint",
]
