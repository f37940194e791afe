"""Network weights on disk: safetensors only (no pickle), written atomically."""

from __future__ import annotations

from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_model, save_model
from torch import nn

from ..errors import ReCoKDError
from ..utils.io import atomic_write


def save_weights(network: nn.Module, path: str | Path) -> Path:
    """Write ``network``'s weights to ``path`` (safetensors) via a temporary file and a rename.

    MONAI's ``DynUNet`` registers each block twice (``skip_layers`` aliases the named blocks);
    ``save_model`` stores every shared tensor once.
    """
    return atomic_write(path, lambda tmp: save_model(network, str(tmp)))


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
    return network
