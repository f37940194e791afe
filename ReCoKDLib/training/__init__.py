"""Training: the epoch-based loop of ``recokd train`` / ``distill`` and of the demo (``EpochTrainer``),
its configuration, splits, checkpoints and the validation Dice."""

from .checkpoint import atomic_torch_save, load_checkpoint
from .loop import DistillTrainModule, EpochTrainer, RunConfig, SegTrainModule, ValCase
from .metrics import dice_per_class
from .splits import fixed_split, kfold_split

__all__ = [
    "DistillTrainModule",
    "EpochTrainer",
    "RunConfig",
    "SegTrainModule",
    "ValCase",
    "atomic_torch_save",
    "dice_per_class",
    "fixed_split",
    "kfold_split",
    "load_checkpoint",
]
