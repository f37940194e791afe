"""Which engine runs a bundle's network in the predictor: PyTorch, ONNX Runtime or OpenVINO (both CPU).

What ``auto`` picks is measured, because no engine wins everywhere (docs/results.md, "Inference
speed"): PyTorch's CPU convolution is slow for few-channel 3D convolutions at one window per call (a
narrow student: 0.073 s per window against ONNX Runtime's 0.014 s) and faster from two windows on at
ReCoKD's 64k-voxel patches, while at patches four times larger ONNX Runtime is faster for the teacher and
for some students; OpenVINO (the optional ``openvino`` extra) ran the shipped LA2018 student 1.33× faster
than ONNX Runtime at fp32. So on the CPU ``auto`` times one call of ``sw_batch_size`` windows with each
engine installed (after a warm-up, best of 3) the first time a bundle is run with those settings on this
machine, and keeps the fastest; with only ONNX Runtime beside PyTorch, one window per call runs ONNX
Runtime without timing. The choice is remembered in ``<cache>/onnx/choices.json`` (keyed by the graph's
key, windows per call, threads, precision and CPU), so later runs start at once. On CUDA and for nnU-Net
folders ``auto`` is PyTorch.

``precision="bf16"`` runs the PyTorch network under bfloat16 autocast (CPU or CUDA), or OpenVINO with its
bf16 inference precision: on the development machine it made the LA2018 student's whole prediction 1.85×
faster with labels equal on 99.99 % of voxels and the same test Dice. It is not the default: its speed
depends on the CPU having bfloat16 instructions. OpenVINO's precision is always set explicitly, because
its own default is bf16 wherever the CPU has it.

The ONNX graph is exported once per bundle and cached in ``<cache>/onnx/<key>.onnx`` (the per-user model
cache's sibling, see :func:`~ReCoKDLib.deployment.registry.default_cache_dir`); OpenVINO reads that graph
and keeps its compiled model in ``<cache>/onnx/openvino/``. The key is the sha256 of everything the graph
depends on: the network description, the weights, the opset and the torch version that traced it — a
changed bundle never reuses a stale graph. The file is written atomically; one that does not load is
exported again.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import ReCoKDError
from ..utils.runtime import OtherLoad, usable_cores

__all__ = ["BACKENDS", "PRECISIONS", "PRECISION_CHOICES", "resolve_precision", "Autocast", "onnx_cache_dir", "onnx_cache_key", "cached_onnx", "select_backend"]

BACKENDS = ("auto", "torch", "onnxruntime", "openvino")
PRECISIONS = ("fp32", "bf16")
#: what ``--precision`` accepts: a precision, or ``auto`` (:func:`resolve_precision`)
PRECISION_CHOICES = ("auto", *PRECISIONS)
#: other processes' load (in cores) during auto's timing above which the choice is not kept for good
BUSY_CORES = 0.5


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


def _engine_available(name: str) -> bool:
    """Whether ``name`` can run here: PyTorch always; the others need their runtime and ``onnx`` (to export).

    Looked up without importing: importing OpenVINO starts its thread pool, which a process that forks
    later (data-loader workers) must not carry."""
    if name == "torch":
        return True
    from importlib.util import find_spec

    return find_spec("onnx") is not None and find_spec(name) is not None


#: the engines that can run each precision (ONNX Runtime's CPU kernels have no bf16 convolution)
ENGINES_FOR_PRECISION = {"fp32": ("torch", "onnxruntime", "openvino"), "bf16": ("torch", "openvino")}
_INSTALL = {"onnxruntime": "pip install 'recokd[export]'", "openvino": "pip install 'recokd[openvino]'"}


def select_backend(bundle: Any, backend: str, device: torch.device, threads: int | None = None,
                   cache_dir: str | Path | None = None, log: Callable[[str], None] | None = None,
                   sw_batch_size: int = 1, precision: str = "fp32") -> tuple[Any, str]:
    """``(network, name)``: the callable the sliding window runs and the backend chosen (``torch``,
    ``onnxruntime`` or ``openvino``) for ``backend`` (one of :data:`BACKENDS`), ``sw_batch_size`` windows per
    call and ``precision`` (one of :data:`PRECISIONS`; ``bf16`` runs PyTorch or OpenVINO).

    Raises:
        ReCoKDError: an unknown backend or precision; an engine asked for where it cannot run (CUDA, an
            nnU-Net folder, not installed, a precision it lacks), or a graph that cannot be exported or loaded.
    """
    if backend not in BACKENDS:
        raise ReCoKDError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if precision not in PRECISIONS:
        raise ReCoKDError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    is_bundle = hasattr(bundle, "weights") and hasattr(bundle, "spec")
    say = log or (lambda m: None)

    def build(name: str) -> Any:
        if name == "torch":
            net = bundle.build_network()
            return Autocast(net) if precision == "bf16" else net
        if name == "onnxruntime":
            return _onnx_network(bundle, threads, cache_dir)
        return _openvino_network(bundle, threads, precision, cache_dir)

    if backend == "auto":
        if device.type != "cpu" or not is_bundle:
            return build("torch"), "torch"
        candidates = [e for e in ENGINES_FOR_PRECISION[precision] if _engine_available(e)]
        if candidates == ["torch"]:
            return build("torch"), "torch"
        remembered = _remembered_engine(bundle, sw_batch_size, threads, precision, cache_dir)
        if remembered not in candidates and sw_batch_size <= 1 and candidates == ["torch", "onnxruntime"]:
            remembered = "onnxruntime"  # measured: at one window per call ONNX Runtime wins (module docstring)
        if remembered in candidates:  # measured before: only the chosen engine is built
            try:
                return build(remembered), remembered
            except ReCoKDError as exc:  # auto falls back, and says why
                say(f"{remembered} unavailable for this model ({exc}); running it with PyTorch")
                return build("torch"), "torch"
        networks = {}
        for name in candidates:
            try:
                networks[name] = build(name)
            except ReCoKDError as exc:
                say(f"{name} unavailable for this model ({exc}); left out of auto's choice (PyTorch always runs)")
        if len(networks) == 1:
            say("no other engine can run this model here; running it with PyTorch")
            return networks["torch"], "torch"
        name = _faster_engine(bundle, networks, sw_batch_size, threads, precision, cache_dir, log)
        return networks[name], name
    if backend == "torch":
        return build("torch"), "torch"
    label = "ONNX Runtime" if backend == "onnxruntime" else "OpenVINO"
    if backend not in ENGINES_FOR_PRECISION[precision]:
        raise ReCoKDError(f"--precision {precision} does not run with {label}; use --backend "
                          f"{' or '.join(ENGINES_FOR_PRECISION[precision])} or auto")
    if device.type != "cpu":
        raise ReCoKDError(f"--backend {backend} runs on the CPU; use --device cpu, or --backend torch on {device.type}")
    if not is_bundle:
        raise ReCoKDError(f"--backend {backend} runs ReCoKD bundles; {getattr(bundle, 'name', 'this model')} "
                          "is not one (use --backend torch)")
    if not _engine_available(backend):
        raise ReCoKDError(f"--backend {backend} needs onnx and {backend}: {_INSTALL[backend]}")
    return build(backend), backend


def resolve_precision(bundle: Any, precision: str, device: torch.device, threads: int | None = None,
                      cache_dir: str | Path | None = None, log: Callable[[str], None] | None = None,
                      backend: str = "auto") -> str:
    """``fp32`` or ``bf16`` for ``precision`` (one of :data:`PRECISION_CHOICES`).

    ``auto`` is bf16 only where it is both fast and safe for this model: on the CPU, when the CPU computes
    bfloat16 natively (:func:`~ReCoKDLib.utils.runtime.native_bf16`) and the bundle's check case
    (:mod:`~ReCoKDLib.deployment.check_case`) is labelled as at fp32 on at least 99.9 % of its voxels by every
    installed engine that runs bf16; fp32 otherwise (other devices, no native bf16, a bundle without a
    check case, an nnU-Net folder, an explicit ``backend`` without bf16). Only the engines ``backend`` may run
    are checked (``auto``: PyTorch and, when installed, OpenVINO). The check runs once per bundle, engines and
    machine and is remembered in ``choices.json`` beside the ONNX graphs, with the agreement it measured.
    """
    if precision != "auto":
        return precision
    from ..deployment.check_case import AGREEMENT, label_agreement
    from ..utils.runtime import cpu_flags, native_bf16

    say = log or (lambda m: None)
    check = getattr(bundle, "check", None)
    engines = [e for e in ENGINES_FOR_PRECISION["bf16"] if backend in ("auto", e) and _engine_available(e)]
    if device.type != "cpu" or not native_bf16() or check is None or not engines:
        why = ("on the CPU only" if device.type != "cpu" else "this CPU has no native bfloat16" if not native_bf16()
               else "the model has no check case to test bf16 on" if check is None
               else f"{backend} has no bf16" if backend not in ENGINES_FOR_PRECISION["bf16"]
               else f"{backend} is not installed ({_INSTALL.get(backend, '')})")
        say(f"precision auto: fp32 ({why})")
        return "fp32"
    path, choices = _choices(cache_dir)
    key = f"precision|{onnx_cache_key(bundle)}|engines={','.join(engines)}|cpu={cpu_flags()[0]}"
    known = choices.get(key)
    if isinstance(known, dict) and known.get("precision") in PRECISIONS:
        return known["precision"]
    networks = {}
    for name in engines:
        try:
            networks[name] = Autocast(bundle.build_network()) if name == "torch" else \
                _openvino_network(bundle, threads, "bf16", cache_dir)
        except ReCoKDError:
            pass  # this engine cannot run the model: auto will not pick it either
    where = f"bundle {getattr(bundle, 'source', None) or getattr(bundle, 'name', '')}"
    agreement = {name: label_agreement(net, check, where) for name, net in networks.items()}
    if not agreement:
        say("precision auto: fp32 (no bf16 engine can run this model)")
        return "fp32"
    chosen = "bf16" if min(agreement.values()) >= AGREEMENT else "fp32"
    say("precision auto: bf16 labels the model's check case as fp32 does on "
        + ", ".join(f"{100 * a:.3f} % ({n})" for n, a in agreement.items())
        + f" of its voxels (needs ≥ {100 * AGREEMENT:.1f} %); running {chosen} (remembered in {path})")
    choices[key] = {"precision": chosen, **{f"{n}_agreement": a for n, a in agreement.items()}}
    try:
        from ..utils.io import atomic_write_text

        atomic_write_text(path, json.dumps(choices, indent=1, sort_keys=True) + "\n")
    except (OSError, ReCoKDError):  # a read-only cache only costs the check next time
        pass
    return chosen


def _onnx_network(bundle: Any, threads: int | None, cache_dir: str | Path | None) -> Any:
    from .export import OnnxNetwork

    path = cached_onnx(bundle, cache_dir)
    try:
        return OnnxNetwork(path, threads=threads or torch.get_num_threads())
    except ReCoKDError:  # a damaged cache file: export again, once
        path.unlink(missing_ok=True)
        return OnnxNetwork(cached_onnx(bundle, cache_dir), threads=threads or torch.get_num_threads())


def _openvino_network(bundle: Any, threads: int | None, precision: str, cache_dir: str | Path | None) -> Any:
    """OpenVINO on the bundle's cached ONNX graph, its compiled model cached beside it (``openvino/``)."""
    from .export import OpenVinoNetwork

    folder = Path(cache_dir) if cache_dir is not None else onnx_cache_dir()
    path = cached_onnx(bundle, cache_dir)
    kwargs: dict[str, Any] = dict(threads=threads or torch.get_num_threads(), precision=precision,
                                  cache_dir=folder / "openvino")
    try:
        return OpenVinoNetwork(path, **kwargs)
    except ReCoKDError:  # a damaged cache: export the graph again and compile without the compiled-model cache
        path.unlink(missing_ok=True)
        return OpenVinoNetwork(cached_onnx(bundle, cache_dir), **{**kwargs, "cache_dir": None})


def _choice_key(bundle: Any, sw_batch_size: int, threads: int | None, precision: str) -> str:
    """What a remembered choice depends on: the model, the call's shape and threads, the engines installed
    (one installed later is timed then) and the CPU (its model and the cores this process may use: a home
    folder shared by a cluster's nodes keeps one choice per kind of node)."""
    from ..utils.runtime import cpu_flags, usable_cores

    engines = ",".join(e for e in ENGINES_FOR_PRECISION[precision] if _engine_available(e))
    return f"{onnx_cache_key(bundle)}|windows={sw_batch_size}|threads={threads or torch.get_num_threads()}|" \
           f"precision={precision}|engines={engines}|cpu={cpu_flags()[0]}x{usable_cores()}"


def seconds_per_call(network: Any, batch: torch.Tensor, repeats: int = 3) -> float:
    """Best of ``repeats`` timed calls of ``network`` on ``batch``, after one warm-up call."""
    with torch.inference_mode():
        network(batch)
        best = float("inf")
        for _ in range(repeats):
            tick = time.perf_counter()
            network(batch)
            best = min(best, time.perf_counter() - tick)
    return best


def _choices(cache_dir: str | Path | None) -> tuple[Path, dict[str, Any]]:
    """``choices.json`` beside the ONNX graphs, and what it holds (empty when missing or unreadable)."""
    path = (Path(cache_dir) if cache_dir is not None else onnx_cache_dir()) / "choices.json"
    try:
        choices = json.loads(path.read_text())
    except (OSError, ValueError):  # none yet, or unreadable: measure again
        choices = {}
    return path, choices if isinstance(choices, dict) else {}


def _remembered_engine(bundle: Any, sw_batch_size: int, threads: int | None, precision: str,
                       cache_dir: str | Path | None) -> str | None:
    """The engine measured faster earlier for this bundle and these settings on this machine, if any."""
    known = _choices(cache_dir)[1].get(_choice_key(bundle, sw_batch_size, threads, precision))
    if not isinstance(known, dict) or known.get("busy"):  # timed on a busy machine: measure again
        return None
    return known.get("backend")


def _faster_engine(bundle: Any, networks: dict[str, Any], sw_batch_size: int, threads: int | None, precision: str,
                   cache_dir: str | Path | None, log: Callable[[str], None] | None) -> str:
    """The engine (a key of ``networks``) that runs one call of ``sw_batch_size`` windows faster on this
    machine, timed now and remembered in ``choices.json`` beside the ONNX graphs."""
    from ..utils.io import atomic_write_text

    path, choices = _choices(cache_dir)
    key = _choice_key(bundle, sw_batch_size, threads, precision)
    generator = torch.Generator().manual_seed(0)
    batch = torch.randn((sw_batch_size, bundle.plans.num_channels, *bundle.plans.patch_size), generator=generator)
    with OtherLoad() as load:
        seconds = {name: seconds_per_call(net, batch) for name, net in networks.items()}
    chosen = min(seconds, key=seconds.get)
    busy = load.other_cores is not None and load.other_cores >= BUSY_CORES
    say = log or (lambda m: None)
    say("auto: " + ", ".join(f"{n} {t:.3f} s" for n, t in seconds.items())
        + f" per call of {sw_batch_size} window(s) at {threads or torch.get_num_threads()} thread(s) on this machine; "
        + f"running {chosen} (remembered in {path})")
    if busy:
        say(f"note: other processes kept {load.other_cores:.1f} of {usable_cores()} cores busy while timing; on a "
            "quieter machine the choice may differ, so it is timed again next time")
    choices[key] = {"backend": chosen, **{f"{n}_seconds": t for n, t in seconds.items()}, "busy": busy,
                    "other_cores": load.other_cores}
    try:
        atomic_write_text(path, json.dumps(choices, indent=1, sort_keys=True) + "\n")
    except (OSError, ReCoKDError):  # a read-only or full cache only costs the measurement next time
        pass
    return chosen
