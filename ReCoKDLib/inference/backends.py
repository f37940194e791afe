"""Which engine runs a bundle's network in the predictor: PyTorch, or ONNX Runtime on the CPU.

PyTorch's CPU convolutions are slow for the few-channel 3D convolutions of a narrow student; ONNX
Runtime's CPU kernels are not (see ``recokd benchmark --backends``). ``auto`` therefore runs a bundle with
ONNX Runtime when the device is the CPU and ``onnxruntime`` (with ``onnx``, for the export) is installed,
and with PyTorch otherwise (CUDA, an nnU-Net folder, no ONNX Runtime).

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

__all__ = ["BACKENDS", "onnx_cache_dir", "onnx_cache_key", "cached_onnx", "select_backend"]

BACKENDS = ("auto", "torch", "onnxruntime")


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
                   cache_dir: str | Path | None = None,
                   log: Callable[[str], None] | None = None) -> tuple[Any, str]:
    """``(network, name)``: the callable the sliding window runs and the backend chosen (``torch`` or
    ``onnxruntime``) for ``backend`` (one of :data:`BACKENDS`).

    Raises:
        ReCoKDError: an unknown backend; ``onnxruntime`` asked for where it cannot run (CUDA, an nnU-Net
            folder, not installed), or a graph that cannot be exported or loaded.
    """
    if backend not in BACKENDS:
        raise ReCoKDError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    is_bundle = hasattr(bundle, "weights") and hasattr(bundle, "spec")
    if backend == "auto":
        if device.type != "cpu" or not is_bundle or not _onnx_available():
            return bundle.build_network(), "torch"
        try:
            return _onnx_network(bundle, threads, cache_dir), "onnxruntime"
        except ReCoKDError as exc:  # auto falls back, and says why
            (log or (lambda m: None))(f"ONNX Runtime unavailable for this model ({exc}); running it with PyTorch")
            return bundle.build_network(), "torch"
    if backend == "torch":
        return bundle.build_network(), "torch"
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
