"""Input checks shared by the losses: one-line errors instead of tracebacks from inside torch."""

from __future__ import annotations

from typing import Sequence

import torch

from ..errors import ReCoKDError


def require_5d(tensor: torch.Tensor, what: str) -> None:
    if not isinstance(tensor, torch.Tensor) or tensor.ndim != 5:
        shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise ReCoKDError(f"{what} must be a 5D tensor (B, C, D, H, W), got {shape}")


def require_same_shape(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    if a.shape != b.shape:
        raise ReCoKDError(
            f"{what}: student {tuple(a.shape)} and teacher {tuple(b.shape)} differ; "
            "tap levels of equal resolution and adapt the student's channels"
        )


def require_same_grid(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    if a.shape[0] != b.shape[0] or a.shape[2:] != b.shape[2:]:
        raise ReCoKDError(
            f"{what}: student grid {tuple(a.shape[2:])} and teacher grid {tuple(b.shape[2:])} differ "
            "(batch {a.shape[0]} vs {b.shape[0]}); tap levels of equal resolution"
        )


def require_labels(labels: torch.Tensor, num_classes: int, what: str = "labels",
                   special: bool = False) -> tuple[bool, bool]:
    """Labels are integer class indices (B, 1, D, H, W) in [0, num_classes); with ``special``, also
    :data:`~ReCoKDLib.utils.labels.IGNORE_LABEL` and :data:`~ReCoKDLib.utils.labels.TEACHER_LABEL`.

    Returns (any TEACHER_LABEL voxel, any IGNORE_LABEL voxel), both False without ``special``. Everything is
    read in one host-device synchronisation: on a GPU each ``.any()``/``int()`` would stall the step once more.
    """
    require_5d(labels, what)
    if labels.shape[1] != 1:
        raise ReCoKDError(f"{what} must have one channel of class indices, got shape {tuple(labels.shape)}")
    if labels.is_floating_point() and not torch.equal(labels, labels.round()):
        raise ReCoKDError(f"{what} must hold integer class indices, found fractional values")
    if special:
        from ..utils.labels import IGNORE_LABEL, TEACHER_LABEL

        if labels.dtype == torch.uint8 and labels.device.type == "cpu":  # a loader's batch: count the values
            counts = torch.bincount(labels.reshape(-1), minlength=256)  # (~10x faster here than the path below)
            present = torch.nonzero(counts[:TEACHER_LABEL]).reshape(-1)
            lo, hi = (int(present[0]), int(present[-1])) if len(present) else (num_classes, -1)
            teacher, ignore = int(counts[TEACHER_LABEL]), int(counts[IGNORE_LABEL])
        else:
            values = labels.long()  # (uint8 labels could not hold the -1 below; no copy when already int64)
            ordinary = (values != TEACHER_LABEL) & (values != IGNORE_LABEL)  # (int16 labels may exceed 255)
            stats = torch.stack([
                torch.where(ordinary, values, torch.full_like(values, num_classes)).min(),
                torch.where(ordinary, values, torch.full_like(values, -1)).max(),
                (values == TEACHER_LABEL).any().long(), (values == IGNORE_LABEL).any().long()])
            lo, hi, teacher, ignore = (int(v) for v in stats.tolist())
        if lo == num_classes and hi == -1:  # nothing but special voxels
            return bool(teacher), bool(ignore)
    else:
        lo, hi = (int(v) for v in torch.stack(torch.aminmax(labels)).tolist())
        teacher = ignore = 0
    if lo < 0 or hi >= num_classes:
        bad = hi if hi >= num_classes else lo
        raise ReCoKDError(
            f"{what} contain the value {bad}, outside 0..{num_classes - 1}; "
            f"declare {max(hi + 1, num_classes)} classes or fix the label map"
        )
    return bool(teacher), bool(ignore)


def check_levels(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor], weights: Sequence[float]) -> None:
    if len(student) != len(teacher):
        raise ReCoKDError(f"{len(student)} student feature levels but {len(teacher)} teacher levels; tap as many")
    if len(weights) != len(student):
        raise ReCoKDError(f"{len(weights)} level weights for {len(student)} feature levels")
