"""Network weights on disk: safetensors only (no pickle), written atomically; NaN/Inf weights (a diverged
training) are refused when written and when read."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import load_model, save_file
from torch import nn

from ..errors import ReCoKDError
from ..utils.io import atomic_write


def unique_tensors(network: nn.Module) -> dict[str, torch.Tensor]:
    """``network``'s state with every shared tensor once, under the first of its names in sorted order.

    MONAI's ``DynUNet`` registers each block twice (``skip_layers`` aliases the named blocks); safetensors
    stores no aliases, and ``load_model`` finds them again from the network (the names kept are the
    ones ``safetensors.torch.save_model`` keeps, so files of either writer load alike).
    """
    state = network.state_dict()
    groups: dict[tuple, list[str]] = {}
    for name, tensor in state.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tuple(tensor.stride()))
        groups.setdefault(key, []).append(name)
    kept = sorted(min(names) for names in groups.values())
    return {name: state[name].contiguous() for name in kept}


def save_weights(network: nn.Module, path: str | Path) -> Path:
    """Write ``network``'s weights to ``path`` (safetensors) via a temporary file and a rename.

    The bytes depend on the weights alone: no metadata is written (safetensors orders a metadata map
    differently in every process), so the same weights always give the same file and sha256.
    """
    tensors = unique_tensors(network)
    bad = nonfinite_tensor(tensors)
    if bad is not None:  # before the write: a diverged run must not leave weights that predict nothing
        raise ReCoKDError(f"refusing to write {path}: tensor {bad} holds NaN/Inf values; {DIVERGED}")
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp)))


#: what a file or network with NaN/Inf weights means and what to do about it
DIVERGED = "the training diverged; resume from an earlier checkpoint or lower --lr"


def nonfinite_tensor(tensors: Mapping[str, torch.Tensor]) -> str | None:
    """The name of the first floating-point tensor holding NaN or Inf (``None``: all finite).

    Weights like that predict background (or garbage) everywhere; they are refused when written and
    when read, so an export never ships them.
    """
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return name
    return None


def check_finite_weight_bytes(data: bytes, source: str) -> None:
    """Refuse safetensors ``data`` (e.g. a bundle member) holding NaN/Inf; one line naming ``source``.

    Unreadable bytes are left to :func:`load_weights`, which names the problem when the network is built.
    """
    try:
        tensors = load_safetensors_bytes(data)
    except (SafetensorError, OSError, ValueError, RuntimeError):
        return
    bad = nonfinite_tensor(tensors)
    if bad is not None:
        raise ReCoKDError(f"{source}: tensor {bad} holds NaN/Inf values; {DIVERGED}")


def load_weights(network: nn.Module, path: str | Path) -> nn.Module:
    """Load safetensors weights into ``network``, strictly; one-line errors for a missing or wrong file."""
    path = Path(path)
    if not path.is_file():
        raise ReCoKDError(f"weights file {path} does not exist; check the path")
    try:
        missing, unexpected = load_model(network, str(path), strict=False)
    except (SafetensorError, OSError, ValueError) as e:
        raise ReCoKDError(f"cannot read weights {path}: {e}; the file is corrupt or not safetensors") from None
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "shape mismatch"
        raise ReCoKDError(f"weights {path} do not fit this network ({first}); use the matching network description") from None
    if missing or unexpected:
        raise ReCoKDError(
            f"weights {path} do not fit this network ({len(missing)} missing, {len(unexpected)} unexpected tensors); "
            "use the matching network description"
        )
    bad = nonfinite_tensor(network.state_dict())
    if bad is not None:
        raise ReCoKDError(f"weights {path}: tensor {bad} holds NaN/Inf values; {DIVERGED}")
    return network
