"""Will a training step fit in memory? A rough estimate, checked before anything is allocated.

A patch too large for the machine does not fail cleanly: the operating system kills the process (CPU)
or CUDA runs out of memory after the data was loaded and the run folder written. So ``recokd train`` /
``distill`` estimate what one training step of the planned patch, batch and network(s) needs and refuse,
in one line, when that is clearly more than the device has free. The estimate counts activations only
(weights and optimiser state are small beside them for 3D U-Nets), so it errs low: a refusal means the
run would not have fitted.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

import torch

from ..errors import ReCoKDError
from ..models.unet import UNetSpec

__all__ = ["TRAIN_FACTOR", "FORWARD_FACTOR", "SKIP_ENV", "estimate_training_bytes", "available_bytes",
           "check_training_memory"]

#: tensors of one level's size kept per training step (forward + backward): two conv/norm/activation blocks
#: in the encoder, the transposed convolution, concatenation and two blocks in the decoder, and their
#: gradients. Measured on CPU (DynUNet, float32, patches 64³-96³, batch 2): 14-20 × Σ channels × voxels;
#: 12 stays below every measurement, so the estimate refuses only runs that could not fit.
TRAIN_FACTOR = 12
#: the same for a frozen teacher's forward pass (no autograd graph; its feature maps are kept for the KD terms)
FORWARD_FACTOR = 2
#: set to 1 to skip the check (a machine whose free memory is misreported, swap to spare)
SKIP_ENV = "RECOKD_SKIP_MEMORY_CHECK"


def _level_units(spec: UNetSpec, patch: Sequence[int]) -> int:
    """Σ over the network's levels of channels × voxels of that level's feature map, for one patch."""
    total = 0
    for channels, stride in zip(spec.filters, spec.level_strides):
        total += int(channels) * math.prod(max(int(p) // int(s), 1) for p, s in zip(patch, stride))
    return total


def estimate_training_bytes(spec: UNetSpec, patch: Sequence[int], batch_size: int, teacher: UNetSpec | None = None,
                            half_precision: bool = False, teacher_scale: Sequence[int] = (1, 1, 1)) -> int:
    """Rough bytes of activations one training step of ``spec`` on ``batch_size`` patches needs.

    ``batch × Σ_levels channels × voxels × bytes per value × TRAIN_FACTOR`` for the trained network, plus
    the same with ``FORWARD_FACTOR`` for a frozen ``teacher`` (distillation; on the patch upsampled by
    ``teacher_scale`` for a fast student at a coarser grid). ``half_precision`` (CUDA
    autocast) counts 2 bytes a value instead of 4. Cheap (no tensor is made) and deliberately low.
    """
    value_bytes = 2 if half_precision else 4
    need = _level_units(spec, patch) * TRAIN_FACTOR
    if teacher is not None:
        need += _level_units(teacher, [p * s for p, s in zip(patch, teacher_scale)]) * FORWARD_FACTOR
    return int(batch_size) * value_bytes * need


def available_bytes(device: torch.device) -> int | None:
    """Memory free for a new allocation on ``device``: CUDA's free memory, else the system's MemAvailable
    (Linux ``/proc/meminfo``; elsewhere free pages from ``os.sysconf``). ``None`` when unknown."""
    if device.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except (RuntimeError, AssertionError):
            return None
    if device.type != "cpu":
        return None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def _gib(n: float) -> str:
    return f"{n / 1024**3:.1f} GiB"


def check_training_memory(spec: UNetSpec, patch: Sequence[int], batch_size: int, device: torch.device,
                          teacher: UNetSpec | None = None, half_precision: bool = False, processes: int = 1,
                          what: str = "this network", teacher_scale: Sequence[int] = (1, 1, 1)) -> None:
    """Refuse a training whose estimated activations (:func:`estimate_training_bytes`, times ``processes``
    sharing the CPU's memory) exceed what ``device`` has free; nothing is checked when the free memory is
    unknown or ``$RECOKD_SKIP_MEMORY_CHECK`` is 1.

    Raises:
        ReCoKDError: one line naming the patch, the batch, the estimate, what is free and the ways out.
    """
    if os.environ.get(SKIP_ENV, "").strip() not in ("", "0"):
        return
    free = available_bytes(device)
    if free is None:
        return
    need = estimate_training_bytes(spec, patch, batch_size, teacher, half_precision, teacher_scale)
    if device.type == "cpu":
        need *= max(int(processes), 1)
    if need > free:
        where = "the GPU" if device.type == "cuda" else "this machine"
        raise ReCoKDError(
            f"training {what} on patch {list(patch)} with batch {batch_size} needs about {_gib(need)} of memory "
            f"(estimate) but {where} has {_gib(free)} free; use a smaller --patch-size or --batch-size (or plan a "
            f"smaller --patch-budget), or set {SKIP_ENV}=1 to try anyway")
