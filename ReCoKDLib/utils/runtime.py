"""Device selection, seeding and CPU settings."""

from __future__ import annotations

import random

import numpy as np
import torch

from ..errors import ReCoKDError


def mps_available() -> bool:
    """Whether PyTorch offers Apple's Metal (MPS) device on this machine."""
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"``/``None`` → CUDA when available, else CPU; ``"cpu"``, ``"cuda[:i]"`` or ``"mps"`` as given.

    ``auto`` never picks MPS: 3D convolutions on Apple's Metal backend are incomplete in some PyTorch
    releases and unmeasured here, so MPS is used only when asked for. Asking for CUDA or MPS where this
    machine has none, or for any other device type, is a one-line error.
    """
    if device is None or str(device).lower() == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(str(device).lower()) if not isinstance(device, torch.device) else device
    except (RuntimeError, TypeError):
        raise ReCoKDError(f"unknown device {device!r}; use auto, cpu, cuda[:N] or mps") from None
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ReCoKDError(f"unknown device {device!r}; use auto, cpu, cuda[:N] or mps")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ReCoKDError("device 'cuda' was asked for but no CUDA GPU is available; use --device cpu or auto")
    if dev.type == "mps" and not mps_available():
        raise ReCoKDError("device 'mps' was asked for but PyTorch offers no Apple Metal (MPS) device here; "
                          "use --device cpu or auto")
    return dev


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
