"""Export a bundle's network to TorchScript or ONNX, and run an ONNX model with ONNX Runtime.

The exported files are *sidecars* next to the bundle, never bundle members: TorchScript files are
zip archives of pickles, and bundles hold only JSON and safetensors. Both exports take the network in
eval mode (no deep-supervision heads), input ``image`` (B, C, D, H, W) float32 -> ``logits``
(B, K, D, H, W); batch and spatial sizes are dynamic in ONNX (spatial sizes must stay multiples of the
network's total stride).

:class:`OnnxNetwork` wraps an ONNX Runtime CPU session as a callable taking and returning torch
tensors, so it plugs into :class:`~ReCoKDLib.inference.predictor.Predictor` (``network=``) and the
whole pipeline (preprocessing, sliding window, resampling back) is identical to PyTorch's.
:class:`OpenVinoNetwork` does the same with Intel's OpenVINO runtime (the optional ``openvino`` extra),
reading the same ONNX graph.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..deployment.bundle import Bundle
from ..errors import ReCoKDError
from ..utils.io import WriteVerificationError, atomic_write

__all__ = ["EXPORT_FORMATS", "export_torchscript", "export_onnx", "export_bundle", "OnnxNetwork", "OpenVinoNetwork", "sidecar_path"]

EXPORT_FORMATS = ("onnx", "torchscript")
_SUFFIX = {"onnx": ".onnx", "torchscript": ".torchscript.pt"}
ONNX_OPSET = 18


def sidecar_path(bundle_path: str | Path, fmt: str) -> Path:
    """``model.recokd`` -> ``model.onnx`` / ``model.torchscript.pt`` (next to the bundle)."""
    p = Path(bundle_path)
    stem = p.name[: -len(p.suffix)] if p.suffix else p.name
    return p.with_name(stem + _SUFFIX[fmt])


def _example(bundle: Bundle, batch: int = 1) -> torch.Tensor:
    return torch.randn(batch, bundle.spec.in_channels, *bundle.plans.patch_size)


def export_torchscript(bundle: Bundle, path: str | Path) -> Path:
    """Trace the network (eval mode) on one patch and save it as TorchScript."""
    network = bundle.build_network("cpu")

    def write(tmp: Path) -> None:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer / deprecation chatter
            traced = torch.jit.trace(network, _example(bundle), check_trace=False)
            torch.jit.save(traced, str(tmp))

    return atomic_write(Path(path), write)


def export_onnx(bundle: Bundle, path: str | Path, opset: int = ONNX_OPSET) -> Path:
    """Export the network (eval mode) to ONNX with dynamic batch and spatial sizes; one self-contained file."""
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise ReCoKDError("ONNX export needs the onnx package; install it with: pip install 'recokd[export]'") from None
    network = bundle.build_network("cpu")
    example = _example(bundle)

    def write(tmp: Path) -> None:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # the TorchScript-based exporter: no onnxscript needed, and it writes one file (no external data)
            torch.onnx.export(
                network,
                (example,),
                str(tmp),
                input_names=["image"],
                output_names=["logits"],
                opset_version=opset,
                dynamo=False,
                dynamic_axes={"image": {0: "batch", 2: "depth", 3: "height", 4: "width"},
                              "logits": {0: "batch", 2: "depth", 3: "height", 4: "width"}},
            )

    def read_back(tmp: Path) -> None:
        import onnx

        try:
            onnx.load(str(tmp))
        except Exception as exc:  # protobuf's DecodeError and friends
            raise WriteVerificationError(f"the written ONNX graph does not read back ({type(exc).__name__})") from None

    return atomic_write(Path(path), write, verify=read_back)


def export_bundle(bundle: Bundle, fmt: str, path: str | Path | None = None, overwrite: bool = False) -> Path:
    """Export to ``fmt`` (``"onnx"`` or ``"torchscript"``); default path: next to the bundle's file. An
    existing file is replaced only with ``overwrite``, and only when it is an earlier export of that format."""
    from ..utils.outputs import check_output_file

    if fmt not in EXPORT_FORMATS:
        raise ReCoKDError(f"unknown export format {fmt!r}; choose onnx or torchscript")
    if path is None:
        if bundle.source is None:
            raise ReCoKDError("give an output path for the export (the bundle has no file to put it next to)")
        path = sidecar_path(bundle.source, fmt)
    path = Path(path)
    if not path.name.lower().endswith(_SUFFIX[fmt]):
        raise ReCoKDError(f"-o {path}: a {fmt} export is named *{_SUFFIX[fmt]}; choose such a name")
    check_output_file(path, overwrite=overwrite, kind=f"{fmt} export", inputs=[bundle.source] if bundle.source else [])
    return export_onnx(bundle, path) if fmt == "onnx" else export_torchscript(bundle, path)


class OnnxNetwork(nn.Module):
    """An ONNX model run by ONNX Runtime, called like the PyTorch network: (B, C, D, H, W) -> (B, K, D, H, W).

    Args:
        path: the ``.onnx`` file.
        threads: intra-op threads of the session (default: ONNX Runtime's).
    """

    def __init__(self, path: str | Path, threads: int | None = None):
        super().__init__()
        try:
            import onnxruntime as ort
        except ImportError:
            raise ReCoKDError("running an ONNX model needs onnxruntime; install it with: pip install 'recokd[export]'") from None
        path = Path(path)
        if not path.is_file():
            raise ReCoKDError(f"ONNX model {path} does not exist; export one with recokd export-model BUNDLE --format onnx")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = int(threads)
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ReCoKDError(f"cannot load ONNX model {path}: {' '.join(str(exc).split())[:160]}") from None
        self.input_name = self.session.get_inputs()[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        out: Any = self.session.run(None, {self.input_name: x.detach().cpu().float().numpy()})[0]
        return torch.from_numpy(out).to(x.device)


class OpenVinoNetwork(nn.Module):
    """An ONNX model compiled and run by OpenVINO on the CPU, called like the PyTorch network:
    (B, C, D, H, W) -> (B, K, D, H, W).

    Args:
        path: the ``.onnx`` file.
        threads: inference threads (default: OpenVINO's, every core).
        precision: ``"fp32"`` or ``"bf16"``. Always set explicitly, because OpenVINO's own default is bf16 on
            CPUs that have bfloat16 instructions, which would silently change a model's outputs.
        cache_dir: where OpenVINO keeps the compiled model (its ``CACHE_DIR``), so that a later process
            skips the compilation; ``None``: no cache.
    """

    PRECISION_HINTS = {"fp32": "f32", "bf16": "bf16"}

    def __init__(self, path: str | Path, threads: int | None = None, precision: str = "fp32",
                 cache_dir: str | Path | None = None):
        super().__init__()
        try:
            import openvino as ov
        except ImportError:
            raise ReCoKDError("running a model with OpenVINO needs openvino; install it with: pip install 'recokd[openvino]'") from None
        if precision not in self.PRECISION_HINTS:
            raise ReCoKDError(f"OpenVINO precision must be one of {', '.join(self.PRECISION_HINTS)}, got {precision!r}")
        path = Path(path)
        if not path.is_file():
            raise ReCoKDError(f"ONNX model {path} does not exist; export one with recokd export-model BUNDLE --format onnx")
        config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": self.PRECISION_HINTS[precision]}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        if cache_dir is not None:
            Path(cache_dir).mkdir(parents=True, exist_ok=True)
            config["CACHE_DIR"] = str(cache_dir)
        try:
            core = ov.Core()
            # one compilation with a dynamic batch: the sliding window's last call may carry fewer windows
            self.compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
        except Exception as exc:  # OpenVINO raises RuntimeError subclasses of its own
            raise ReCoKDError(f"OpenVINO cannot load {path}: {' '.join(str(exc).split())[:160]}") from None
        # what the compiled model runs at, read back from OpenVINO ("fp32" / "bf16")
        running = self.compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
        self.precision = {"f32": "fp32", "bf16": "bf16"}.get(running, running)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        out: Any = self.compiled(x.detach().cpu().float().numpy())[0]
        return torch.from_numpy(out.astype("float32", copy=False)).to(x.device)
