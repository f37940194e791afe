"""Which engine runs a bundle's network in the predictor: PyTorch, or ONNX Runtime on the CPU.

What ``auto`` picks is measured (docs/results.md, "Inference speed"; ``scripts/cpu_inference_options.py``):
PyTorch's CPU convolution is slow for few-channel 3D convolutions at a batch of one window (a narrow
student: 0.073 s per window against ONNX Runtime's 0.014 s), and fast from two windows on (0.012 s
against 0.014 s). So ``auto`` runs ONNX Runtime on the CPU only for one window per call
(``sw_batch_size`` 1), when ``onnxruntime`` (with ``onnx``, for the export) is installed, and PyTorch
otherwise — at the predictor's default of two windows per call, and on CUDA or for nnU-Net folders.

``precision="bf16"`` runs the PyTorch network under bfloat16 autocast (CPU or CUDA): on the development
machine it made the LA2018 student's whole prediction 1.85× faster with labels equal on 99.99 % of voxels
and the same test Dice. It is not the default: its speed depends on the CPU having bfloat16 instructions.

The ONNX graph is exported once per bundle and cached in ``<cache>/onnx/<key>.onnx`` (the per-user model
cache's sibling, see :func:`~ReCoKDLib.deployment.registry.default_cache_dir`). The key is the sha256 of
everything the graph depends on: the network description, the weights, the opset and the torch version
that traced it — a changed bundle never reuses a stale graph. The file is written atomically; one that
does not load is exported again.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import ReCoKDError

__all__ = ["BACKENDS", "PRECISIONS", "Autocast", "onnx_cache_dir", "onnx_cache_key", "cached_onnx", "select_backend"]

BACKENDS = ("auto", "torch", "onnxruntime")
PRECISIONS = ("fp32", "bf16")


class Autocast(torch.nn.Module):
    """Runs ``network`` under bfloat16 autocast on its input's device; returns float32 logits."""

    def __init__(self, network: torch.nn.Module):
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            return self.network(x).float()


def onnx_cache_dir() -> Path:
    from ..deployment.registry import default_cache_dir

    return default_cache_dir().parent / "onnx"


def onnx_cache_key(bundle: Any) -> str:
    """sha256 (hex) of what a bundle's ONNX graph depends on."""
    from .export import ONNX_OPSET

    h = hashlib.sha256()
    h.update(json.dumps(bundle.spec.to_dict(), sort_keys=True).encode())
    h.update(json.dumps(list(bundle.plans.patch_size)).encode())
    h.update(f"opset={ONNX_OPSET};torch={torch.__version__}".encode())
    h.update(hashlib.sha256(bundle.weights).digest())
    return h.hexdigest()


def _onnx_available() -> bool:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def cached_onnx(bundle: Any, cache_dir: str | Path | None = None) -> Path:
    """The bundle's ONNX graph, exported on first use into the cache (see the module docstring)."""
    from .export import export_onnx

    folder = Path(cache_dir) if cache_dir is not None else onnx_cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ReCoKDError(f"cannot create the ONNX cache folder {folder} ({exc.strerror}); set RECOKD_HOME to a "
                          "writable folder or use --backend torch") from None
    path = folder / f"{onnx_cache_key(bundle)}.onnx"
    if not path.is_file():
        export_onnx(bundle, path)
    return path


def select_backend(bundle: Any, backend: str, device: torch.device, threads: int | None = None,
                   cache_dir: str | Path | None = None, log: Callable[[str], None] | None = None,
                   sw_batch_size: int = 1, precision: str = "fp32") -> tuple[Any, str]:
    """``(network, name)``: the callable the sliding window runs and the backend chosen (``torch`` or
    ``onnxruntime``) for ``backend`` (one of :data:`BACKENDS`), ``sw_batch_size`` windows per call and
    ``precision`` (one of :data:`PRECISIONS`; ``bf16`` runs PyTorch).

    Raises:
        ReCoKDError: an unknown backend or precision; ``onnxruntime`` asked for where it cannot run (CUDA,
            an nnU-Net folder, not installed, bf16), or a graph that cannot be exported or loaded.
    """
    if backend not in BACKENDS:
        raise ReCoKDError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if precision not in PRECISIONS:
        raise ReCoKDError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    is_bundle = hasattr(bundle, "weights") and hasattr(bundle, "spec")

    def torch_network() -> tuple[Any, str]:
        net = bundle.build_network()
        return (Autocast(net) if precision == "bf16" else net), "torch"

    if backend == "auto":
        if (device.type != "cpu" or not is_bundle or sw_batch_size > 1 or precision != "fp32"
                or not _onnx_available()):
            return torch_network()
        try:
            return _onnx_network(bundle, threads, cache_dir), "onnxruntime"
        except ReCoKDError as exc:  # auto falls back, and says why
            (log or (lambda m: None))(f"ONNX Runtime unavailable for this model ({exc}); running it with PyTorch")
            return torch_network()
    if backend == "torch":
        return torch_network()
    if precision != "fp32":
        raise ReCoKDError("--precision bf16 runs with PyTorch; use --backend torch or auto")
    if device.type != "cpu":
        raise ReCoKDError(f"--backend onnxruntime runs on the CPU; use --device cpu, or --backend torch on {device.type}")
    if not is_bundle:
        raise ReCoKDError(f"--backend onnxruntime runs ReCoKD bundles; {getattr(bundle, 'name', 'this model')} "
                          "is not one (use --backend torch)")
    if not _onnx_available():
        raise ReCoKDError("--backend onnxruntime needs onnx and onnxruntime: pip install 'recokd[export]'")
    return _onnx_network(bundle, threads, cache_dir), "onnxruntime"


def _onnx_network(bundle: Any, threads: int | None, cache_dir: str | Path | None) -> Any:
    from .export import OnnxNetwork

    path = cached_onnx(bundle, cache_dir)
    try:
        return OnnxNetwork(path, threads=threads or torch.get_num_threads())
    except ReCoKDError:  # a damaged cache file: export again, once
        path.unlink(missing_ok=True)
        return OnnxNetwork(cached_onnx(bundle, cache_dir), threads=threads or torch.get_num_threads())
