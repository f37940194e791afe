"""Training: the epoch-based loop of ``recokd train`` / ``distill`` and of the demo (``EpochTrainer``),
its configuration and option checks, splits, checkpoints and the memory estimate checked before a run
starts (validation scores with evaluation's Dice)."""

from .checkpoint import atomic_torch_save, load_checkpoint
from .loop import DistillTrainModule, EpochTrainer, RunConfig, SegTrainModule, ValCase
from .memory import check_training_memory, estimate_training_bytes
from .splits import fixed_split, kfold_split

__all__ = [
    "DistillTrainModule",
    "EpochTrainer",
    "RunConfig",
    "SegTrainModule",
    "ValCase",
    "atomic_torch_save",
    "check_training_memory",
    "estimate_training_bytes",
    "fixed_split",
    "kfold_split",
    "load_checkpoint",
]
