"""Training: the epoch-based loop of ``recokd train`` / ``distill`` and of the demo (``EpochTrainer``),
its configuration, splits and checkpoints (validation scores with evaluation's Dice)."""

from .checkpoint import atomic_torch_save, load_checkpoint
from .loop import DistillTrainModule, EpochTrainer, RunConfig, SegTrainModule, ValCase
from .splits import fixed_split, kfold_split

__all__ = [
    "DistillTrainModule",
    "EpochTrainer",
    "RunConfig",
    "SegTrainModule",
    "ValCase",
    "atomic_torch_save",
    "fixed_split",
    "kfold_split",
    "load_checkpoint",
]
