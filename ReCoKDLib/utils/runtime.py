"""Device selection, seeding and CPU settings."""

from __future__ import annotations

import random

import numpy as np
import torch

from ..errors import ReCoKDError


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` → CUDA when available, else CPU; ``cuda`` without a GPU is an error."""
    if isinstance(device, torch.device):
        return device
    name = str(device).lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ReCoKDError("device 'cuda' was asked for but no CUDA GPU is available; use --device cpu or auto")
    if name not in {"cpu"} and not name.startswith("cuda"):
        raise ReCoKDError(f"unknown device {device!r}; use auto, cpu or cuda[:N]")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def configure_cpu(num_threads: int | None = None) -> None:
    """Intra-op thread count (``None`` keeps torch's, which defaults to the physical cores) and
    flush-to-zero of denormals, which otherwise can slow CPU convolution backward passes once
    gradients become tiny."""
    torch.set_flush_denormal(True)
    if num_threads:
        if num_threads < 1:
            raise ReCoKDError(f"thread count must be >= 1, got {num_threads}")
        torch.set_num_threads(int(num_threads))
