"""Predict label maps with a model bundle, for arrays (what 3D Slicer hands over), SimpleITK images and files.

Pipeline (:meth:`Predictor.predict_array`), mirroring training's preprocessing exactly:

1. **Orientation.** When the bundle records the training images' direction, the input's axes are
   permuted and flipped (no interpolation) so that they run as the training images' did; without it
   the array is used in its stored axis order, as training did. Either way, no voxel is moved in
   physical space and the result is mapped back by the exact inverse.
2. **Preprocessing** with :func:`~ReCoKDLib.data.preprocessing.preprocess_case` (crop to the
   non-zero region, per-channel normalisation, resampling to the plan's spacing over the same field
   of view -- i.e. onto a grid with the input's direction and the bundle's spacing).
3. **Sliding-window inference** (MONAI, Gaussian blending, the training patch as window), optionally
   with mirror test-time augmentation (logits averaged over flips), then arg-max.
4. **Back to the input grid** with :func:`~ReCoKDLib.data.preprocessing.restore_label` and the
   inverse reorientation: the label array has the input's shape, and files are written with the
   input's exact spacing, origin and direction.

Geometry conventions (:mod:`ReCoKDLib.utils.geometry`): arrays are numpy order (D, H, W) = SimpleITK
(z, y, x); ``spacing``, ``origin`` and ``direction`` are an
:class:`~ReCoKDLib.utils.geometry.ImageGeometry`'s, SimpleITK's (x, y, z) order and LPS convention, as
``image.GetSpacing()``, ``GetOrigin()`` and ``GetDirection()`` return them. (3D Slicer works in
RAS; :func:`geometry_from_ijk_to_ras` converts a volume's IJK-to-RAS matrix.)
"""

from __future__ import annotations

import itertools
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import SimpleITK as sitk
import torch
from torch import nn

from ..deployment.bundle import Bundle, open_model
from ..deployment.card import trained_without_spacing
from ..data.datasets import LoadedCase, read_image, split_file_ending
from ..data.preprocessing import preprocess_case, restore_label
from ..errors import InputCheckError, ReCoKDError
from ..utils.geometry import IDENTITY_DIRECTION, ImageGeometry
from ..utils.geometry import lps_geometry_from_ijk_to_ras as geometry_from_ijk_to_ras
from ..utils.io import atomic_write_image
from .postprocessing import POSTPROCESSING, postprocess_labels
from .backends import BACKENDS, PRECISION_CHOICES, resolve_precision, select_backend
from .sliding_window import WINDOW_WEIGHTS, predict_logits
from ..utils.runtime import inference_threads, resolve_device

__all__ = [
    "Predictor",
    "Orientation",
    "orientation_to",
    "resolve_device",
    "write_label",
    "count_windows",
    "check_label_outputs",
    "label_output_ending",
    "geometry_from_ijk_to_ras",
]

ProgressFn = Callable[[float], None]
#: Two-file (header + data) formats and the single-file format outputs use instead.
TWO_FILE_ENDINGS = {".mhd": ".mha", ".nhdr": ".nrrd"}
#: Formats a label map is written in: 3D, one file (so that the write is one atomic rename).
LABEL_OUTPUT_ENDINGS = (".nii.gz", ".nii", ".nrrd", ".mha", ".tif", ".tiff")


# --------------------------------------------------------------------------------------------------
# orientation: exact axis permutation / flips


@dataclass(frozen=True)
class Orientation:
    """An exact reorientation of a (…, D, H, W) array: ``transpose`` the three spatial axes, then
    flip ``flips`` (axes of the transposed array). :meth:`apply` / :meth:`invert` are inverses."""

    transpose: tuple[int, int, int] = (0, 1, 2)
    flips: tuple[int, ...] = ()

    @property
    def is_identity(self) -> bool:
        return self.transpose == (0, 1, 2) and not self.flips

    def apply(self, array: np.ndarray) -> np.ndarray:
        lead = array.ndim - 3
        out = np.transpose(array, tuple(range(lead)) + tuple(lead + a for a in self.transpose))
        if self.flips:
            out = np.flip(out, axis=tuple(lead + a for a in self.flips))
        return np.ascontiguousarray(out)

    def invert(self, array: np.ndarray) -> np.ndarray:
        lead = array.ndim - 3
        out = np.flip(array, axis=tuple(lead + a for a in self.flips)) if self.flips else array
        inverse = tuple(int(i) for i in np.argsort(self.transpose))
        return np.ascontiguousarray(np.transpose(out, tuple(range(lead)) + tuple(lead + a for a in inverse)))

    def spacing(self, spacing_dhw: Sequence[float]) -> tuple[float, float, float]:
        """Spacing (D, H, W) of the reoriented array."""
        return tuple(float(spacing_dhw[a]) for a in self.transpose)  # type: ignore[return-value]


def _direction_matrix(direction: Sequence[float], what: str) -> np.ndarray:
    d = np.asarray(direction, dtype=np.float64)
    if d.size != 9 or not np.all(np.isfinite(d)):
        raise ReCoKDError(f"{what} must be 9 finite direction cosines (row-major 3x3), got {list(d.ravel())[:9]}")
    m = d.reshape(3, 3)
    if not np.allclose(m.T @ m, np.eye(3), atol=1e-3):
        raise ReCoKDError(f"{what} {list(d.round(4))} is not orthonormal; fix the image header")
    return m


def orientation_to(direction: Sequence[float], reference: Sequence[float] | None) -> Orientation:
    """The axis permutation and flips that make an image with ``direction`` run like ``reference``.

    Both are SimpleITK direction cosines (row-major 3x3; column ``i`` is the physical direction of
    image axis ``i``, x first). Each input axis is matched to the reference axis it is most parallel
    to (the best of the 6 permutations, so oblique images map to their nearest orientation), and
    flipped when it points the other way. ``None`` as reference means "keep the stored order".
    """
    if reference is None:
        return Orientation()
    m = _direction_matrix(direction, "image direction")
    r = _direction_matrix(reference, "the bundle's reference direction")
    dots = r.T @ m  # dots[j, i]: reference axis j · input axis i
    best = max(itertools.permutations(range(3)), key=lambda p: sum(abs(dots[j, p[j]]) for j in range(3)))
    # best[j] = the input (x, y, z) axis that becomes output axis j; numpy axes are reversed (z, y, x)
    transpose = tuple(2 - best[2 - k] for k in range(3))
    flips = tuple(k for k in range(3) if dots[2 - k, best[2 - k]] < 0)
    return Orientation(transpose=transpose, flips=flips)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------
# sliding window with progress, mirroring and out-of-memory fallback


def count_windows(image_shape: Sequence[int], roi_size: Sequence[int], overlap: float) -> int:
    """How many windows MONAI's sliding window visits over ``image_shape`` (after its padding)."""
    total = 1
    for n, r in zip(image_shape, roi_size):
        n = max(int(n), int(r))
        if n == r:
            continue
        step = max(int(r * (1 - overlap)), 1)
        total *= int(math.ceil((n - r) / step)) + 1
    return total


def _sliding_window(
    network: Any,
    image: torch.Tensor,
    roi_size: Sequence[int],
    overlap: float,
    sw_batch_size: int,
    device: torch.device,
    mirror_axes: Sequence[int],
    on_windows: Callable[[int], None] | None,
    window_weights: str = "gaussian",
) -> torch.Tensor:
    """One sliding-window pass on ``device``: (1, C, D, H, W) → (1, K, D, H, W) logits on the CPU.

    Module-level so that tests can make it raise out-of-memory errors."""
    if isinstance(network, nn.Module):
        network.to(device)
    return predict_logits(network, image.to(device), roi_size, overlap=overlap, sw_batch_size=sw_batch_size,
                          device=device, mirror_axes=mirror_axes, on_windows=on_windows,
                          window_weights=window_weights)[None]


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


# --------------------------------------------------------------------------------------------------
# the predictor


class Predictor:
    """Segment images with a model bundle.

    Args:
        model: a :class:`~ReCoKDLib.deployment.bundle.Bundle`, a ``.recokd`` file / bundle folder, a run folder,
            or an nnU-Net v2 results folder (its fold ensemble).
        device: ``"auto"`` (CUDA if available), ``"cpu"`` or ``"cuda"``.
        overlap: sliding-window overlap (0..1).
        sw_batch_size: windows per forward pass.
        mirror_tta: average the logits over the mirror images along ``mirror_axes`` (2^n × slower).
        mirror_axes: spatial axes (0 = D, 1 = H, 2 = W) to mirror when ``mirror_tta``.
        threads: CPU threads (torch's are process-wide); ``None``: on the CPU, every usable core but one
            (:func:`~ReCoKDLib.utils.runtime.inference_threads`), elsewhere torch's setting.
        progress: ``True`` for a tqdm bar over windows on stderr, or a callable ``progress(fraction)``
            (fraction in 0..1, e.g. for a 3D Slicer progress dialog), or ``False``.
        network: run this module instead of the bundle's network (same inputs and outputs; e.g. an
            ONNX Runtime session wrapper, see :mod:`ReCoKDLib.inference.export`).
        log: where messages go (default: print to stderr).
        check_spacing: check inputs against the model's training data before segmenting them: refuse those
            it cannot work on (:meth:`check_resampled_size`, :meth:`input_warnings`), warn about the others;
            ``False`` (``recokd predict --force``) skips the checks and segments anyway.
        confirm_warnings: raise :class:`~ReCoKDLib.errors.InputCheckError` with all the warnings instead of
            logging them and going on (a front-end that asks "segment anyway?", as 3D Slicer's module does).
        postprocess: one of :data:`~ReCoKDLib.inference.postprocessing.POSTPROCESSING`; ``None`` (default):
            the bundle's choice (``none`` for bundles that record none).
        backend: ``"torch"`` (default), ``"onnxruntime"`` (CPU; the bundle's ONNX graph, cached) or ``"auto"``
            (on the CPU, the engine timed faster for this bundle and settings, once per machine; else
            PyTorch); see :mod:`ReCoKDLib.inference.backends`.
            ``self.backend`` is the one chosen.
        precision: ``"fp32"`` (default), ``"bf16"`` (PyTorch under bfloat16 autocast, or OpenVINO at bf16;
            faster on CPUs with bfloat16 instructions) or ``"auto"`` (bf16 where the CPU has it natively and
            the bundle's check case agrees; see :func:`~ReCoKDLib.inference.backends.resolve_precision`).
            ``self.precision`` is the one used.
        blend: how overlapping windows are weighted: ``"gaussian"`` (default), ``"constant"`` (plain mean) or
            ``"nnunet"`` (nnU-Net's Gaussian; the default for nnU-Net folders).

    Example::

        predictor = Predictor("model.recokd", device="cpu")
        labels = predictor.predict_array(array, spacing=img.GetSpacing(), origin=img.GetOrigin(),
                                         direction=img.GetDirection())   # array (D, H, W) → labels (D, H, W)
    """

    def __init__(
        self,
        model: Bundle | str | Path,
        device: str | torch.device | None = "auto",
        overlap: float = 0.5,
        sw_batch_size: int = 2,
        mirror_tta: bool = False,
        mirror_axes: Sequence[int] = (0, 1, 2),
        threads: int | None = None,
        progress: bool | ProgressFn = False,
        network: Any = None,
        log: Callable[[str], None] | None = None,
        check_spacing: bool = True,
        confirm_warnings: bool = False,
        postprocess: str | None = None,
        backend: str = "torch",
        blend: str | None = None,
        precision: str = "fp32",
    ):
        self.bundle = model if isinstance(model, Bundle) or hasattr(model, "build_network") else open_model(model)
        self.postprocess = self.bundle.postprocessing if postprocess is None else postprocess
        if self.postprocess not in POSTPROCESSING:
            raise ReCoKDError(f"post-processing {self.postprocess!r} is not one of {', '.join(POSTPROCESSING)}")
        if not 0 <= overlap < 1:
            raise ReCoKDError(f"overlap must be in [0, 1), got {overlap}")
        if sw_batch_size < 1:
            raise ReCoKDError(f"sw_batch_size must be >= 1, got {sw_batch_size}")
        if any(a not in (0, 1, 2) for a in mirror_axes):
            raise ReCoKDError(f"mirror axes must be among 0, 1, 2 (D, H, W), got {list(mirror_axes)}")
        self.device = resolve_device(device)
        if threads is None and self.device.type == "cpu":
            threads = inference_threads()  # one core left free (see its docstring)
        if threads is not None:
            if threads < 1:
                raise ReCoKDError(f"threads must be >= 1, got {threads}")
            torch.set_num_threads(int(threads))
        self.overlap = float(overlap)
        self.sw_batch_size = int(sw_batch_size)
        self.mirror_axes = self._tta_axes(tuple(mirror_axes)) if mirror_tta else ()
        self.progress = progress
        self.log = log or (lambda msg: print(msg, file=sys.stderr))
        self.check_spacing = bool(check_spacing)
        self.confirm_warnings = bool(confirm_warnings)
        if backend not in BACKENDS:
            raise ReCoKDError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        # the network is built (and an ONNX graph exported) on first use: a refused input costs nothing
        if precision not in PRECISION_CHOICES:
            raise ReCoKDError(f"precision must be one of {', '.join(PRECISION_CHOICES)}, got {precision!r}")
        self._requested_backend, self._threads = backend, threads
        # auto: bf16 where the CPU has it and the model's check case agrees (resolve_precision)
        self.precision = resolve_precision(self.bundle, precision, self.device, threads, log=self.log, backend=backend) \
            if network is None else ("fp32" if precision == "auto" else precision)
        self._network, self._backend = (network, "custom") if network is not None else (None, None)
        if backend == "torch":
            self.network  # noqa: B018 - cheap, and checks the weights fit before any input is read
        self.plans = self.bundle.plans
        self.roi_size = tuple(int(p) for p in self.plans.patch_size)
        # how windows are blended: nnU-Net models with nnU-Net's own weights (they then predict what nnU-Net does)
        self.window_weights = blend or getattr(self.bundle, "window_weights", "gaussian")
        if self.window_weights not in WINDOW_WEIGHTS:
            raise ReCoKDError(f"blend must be one of {', '.join(WINDOW_WEIGHTS)}, got {self.window_weights!r}")

    @property
    def network(self) -> Any:
        """The network the windows run through (built on first use, by the chosen backend)."""
        if self._network is None:
            self._network, self._backend = select_backend(self.bundle, self._requested_backend, self.device,
                                                          self._threads, log=self.log,
                                                          sw_batch_size=self.sw_batch_size, precision=self.precision)
        if isinstance(self._network, nn.Module):
            self._network.eval()
        return self._network

    @property
    def backend(self) -> str:
        """``torch``, ``onnxruntime`` (or ``custom`` for a network given to the constructor)."""
        self.network  # noqa: B018 - resolves the backend
        return self._backend  # type: ignore[return-value]

    # -- inference with fallbacks ---------------------------------------------------------------
    def _attempts(self) -> list[tuple[torch.device, int]]:
        attempts = [(self.device, self.sw_batch_size)]
        if self.device.type == "cuda":
            if self.sw_batch_size > 1:
                attempts.append((self.device, 1))
            attempts.append((torch.device("cpu"), self.sw_batch_size))
        return attempts

    def logits(self, image: torch.Tensor, progress: bool | ProgressFn | None = None, desc: str = "windows") -> torch.Tensor:
        """Blended logits of a preprocessed image.

        Args:
            image: (C, D, H, W) float, in plan space.
        Returns:
            (K, D, H, W) float32 on the CPU.

        On CUDA out-of-memory the pass is retried with one window per batch, then on the CPU, and
        the fallback is logged.
        """
        progress = self.progress if progress is None else progress
        total = count_windows(image.shape[1:], self.roi_size, self.overlap)
        bar, callback = None, None
        done = [0]
        if callable(progress):

            def callback(n: int) -> None:
                done[0] += n
                progress(min(done[0] / total, 1.0))  # type: ignore[operator]
        elif progress:
            from tqdm import tqdm

            bar = tqdm(total=total, desc=desc, unit="window", leave=False, file=sys.stderr)
            callback = bar.update
        x = image[None].float()
        attempts = self._attempts()
        try:
            for i, (device, sw) in enumerate(attempts):
                try:
                    if i > 0:  # a retry starts the windows again
                        done[0] = 0
                        if bar is not None:
                            bar.reset(total=total)
                    out = _sliding_window(self.network, x, self.roi_size, self.overlap, sw, device,
                                          self.mirror_axes, callback, self.window_weights)
                    if device != self.device or sw != self.sw_batch_size:
                        self.device, self.sw_batch_size = device, sw  # keep what worked for the next cases
                    return out[0]
                except Exception as exc:  # noqa: BLE001 - only out-of-memory is retried
                    if not _is_oom(exc) or i == len(attempts) - 1:
                        if _is_oom(exc):
                            raise ReCoKDError("out of memory even on the CPU; use a smaller model or a machine with more memory") from None
                        raise
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                    nxt_dev, nxt_sw = attempts[i + 1]
                    self.log(
                        f"out of GPU memory with {sw} window(s) per batch on {device}; "
                        f"retrying with {nxt_sw} on {nxt_dev}"
                    )
        finally:
            if bar is not None:
                bar.close()
        raise AssertionError("unreachable")

    # -- arrays -----------------------------------------------------------------------------------
    def _check_array(self, image: np.ndarray, what: str) -> np.ndarray:
        image = np.asarray(image)
        n = self.plans.num_channels
        names = ", ".join(self.plans.channel_names.values())
        if image.ndim == 2:
            raise ReCoKDError(f"{what} is a 2D image {image.shape}; the model segments 3D volumes, supply a 3D image")
        if image.ndim == 3:
            if n != 1:
                raise ReCoKDError(f"{what} has 1 channel but model '{self.bundle.name}' expects {n} ({names}); "
                                  "supply one file per channel (case_0000, case_0001, ...)")
            image = image[None]
        if image.ndim != 4:
            raise ReCoKDError(f"{what} has shape {image.shape}; supply (D, H, W) or (C, D, H, W)")
        if image.shape[0] != n:
            raise ReCoKDError(f"{what} has {image.shape[0]} channel(s) but model '{self.bundle.name}' expects {n} ({names}); "
                              "supply one file per channel (case_0000, case_0001, ...)")
        if min(image.shape[1:]) < 2:
            raise ReCoKDError(f"{what} has a single slice {image.shape[1:]}; the model segments 3D volumes, supply a 3D image")
        if not np.issubdtype(image.dtype, np.number) or np.iscomplexobj(image):
            raise ReCoKDError(f"{what} has voxel type {image.dtype}; supply a real-valued image")
        if not np.all(np.isfinite(image)):
            raise ReCoKDError(f"{what} contains NaN or infinite voxels; replace them (e.g. by the background value) and retry")
        for c in range(image.shape[0]):
            lo, hi = float(image[c].min()), float(image[c].max())
            if lo == hi:
                raise ReCoKDError(f"{what} channel {c} is constant ({lo:g} everywhere); there is nothing to segment, check the input")
        return image.astype(np.float32, copy=False)

    def predict_array(
        self,
        image: np.ndarray,
        spacing: Sequence[float],
        origin: Sequence[float] | None = None,
        direction: Sequence[float] | None = None,
        progress: bool | ProgressFn | None = None,
        name: str = "image",
    ) -> np.ndarray:
        """Labels of one image, on the input's voxel grid.

        Args:
            image: (D, H, W) or (C, D, H, W) voxels, numpy order (= SimpleITK (z, y, x)).
            spacing: voxel size (x, y, z) in mm, SimpleITK order (``image.GetSpacing()``).
            origin: (x, y, z) in mm (LPS); not needed for the voxel-to-voxel mapping, kept for the record.
            direction: 9 direction cosines, row-major (``image.GetDirection()``); default identity.
            progress: overrides the predictor's ``progress`` for this call.
            name: how errors refer to the image (e.g. its file name).

        Returns:
            (D, H, W) uint8 labels (int16 beyond 255 classes) with the input's shape: voxel (k, j, i)
            of the output labels voxel (k, j, i) of the input.

        Raises:
            ReCoKDError: one line naming ``name`` and the fix (2D, wrong channels, constant, NaN, …).
        """
        orient, pre = self.preprocess(image, spacing, origin, direction, name=name)
        logits = self.logits(torch.from_numpy(pre.image), progress, desc=Path(name).name)
        dtype = np.uint8 if self.bundle.num_classes <= 256 else np.int16
        labels = logits.argmax(0).numpy().astype(dtype)
        restored = restore_label(labels, pre.properties, mode=self.plans.resampling.get("label", "linear"))
        return orient.invert(postprocess_labels(restored, self.postprocess))

    def preprocess(
        self,
        image: np.ndarray,
        spacing: Sequence[float],
        origin: Sequence[float] | None = None,
        direction: Sequence[float] | None = None,
        name: str = "image",
    ):
        """Check, reorient and preprocess an image as :meth:`predict_array` does (same arguments).

        Returns:
            ``(orientation, case)``: the :class:`Orientation` applied and the
            :class:`~ReCoKDLib.data.preprocessing.PreprocessedCase` (image (C, D', H', W') in plan space).
        """
        array = self._check_array(image, name)
        sp = np.asarray(spacing, dtype=np.float64).ravel()
        if sp.size != 3 or not np.all(np.isfinite(sp)) or np.any(sp <= 0):
            raise ReCoKDError(f"{name} spacing must be 3 positive numbers (x, y, z), got {list(sp)}")
        geometry = ImageGeometry(tuple(sp), tuple(origin) if origin is not None else (0.0, 0.0, 0.0),
                                 tuple(direction) if direction is not None else IDENTITY_DIRECTION)
        _direction_matrix(geometry.direction, f"{name} direction")
        orient = orientation_to(geometry.direction, self.bundle.reference_direction)
        # the reoriented array's geometry matters only through its voxel size (preprocessing resamples
        # voxel to voxel); the permuted spacing is that of the transposed array
        reoriented = ImageGeometry.from_spacing_dhw(orient.spacing(geometry.spacing_dhw), geometry.origin,
                                                    geometry.direction)
        case = LoadedCase(image=orient.apply(array), label=None, geometry=reoriented, case_id=name)
        if self.check_spacing:
            self.check_resampled_size(case.image.shape[1:], reoriented.spacing_dhw, name)
            lines = self.input_warnings(case.image, reoriented.spacing_dhw, name)
            if lines and self.confirm_warnings:
                raise InputCheckError(lines)
            for line in lines:
                self.log(f"warning: {line}")
        return orient, preprocess_case(case, self.plans)

    def input_warnings(self, image: np.ndarray, spacing: Sequence[float], name: str = "image") -> list[str]:
        """What about an input is unlike the training data, from the bundle's plan and fingerprint; one line
        each. Raises instead where the model cannot work on the input (see :data:`INPUT_CHECKS`).

        Args:
            image: (C, D, H, W) voxels in the model's axis order; spacing: its (D, H, W) voxel size in mm.
        """
        plans, fp = self.plans, self.plans.fingerprint or {}
        shape = image.shape[1:]
        fix = "pass --force to segment it anyway"
        shown = f"{name} ({'x'.join(map(str, shape))} voxels of {' x '.join(f'{s:g}' for s in spacing)} mm)"
        lines: list[str] = []
        low, high = fp.get("min_spacing"), fp.get("max_spacing")
        if low and high:
            if trained_without_spacing(fp) and any(abs(s - 1.0) > 1e-3 for s in spacing):
                # every training case said 1 x 1 x 1: spacing lost (voxel units); a real spacing resamples wrongly
                raise InputCheckError(
                    f"{shown}: the model was trained on images without physical spacing (every training case had "
                    "1 x 1 x 1, i.e. voxel units), so it expects an image with spacing 1 x 1 x 1 at its training "
                    f"resolution; set the header spacing to 1 x 1 x 1 (or use a model trained in mm), or {fix}")
            far = [i for i, s in enumerate(spacing)
                   if s < float(low[i]) / INPUT_CHECKS["spacing_factor"] or s > float(high[i]) * INPUT_CHECKS["spacing_factor"]]
            if far:
                lines.append(f"{shown}: spacing along axis {far[0]} is far from the training range "
                             f"{float(low[far[0]]):g}-{float(high[far[0]]):g} mm; the result may be poor")
        small, large = fp.get("min_shape_after_crop"), fp.get("max_shape_after_crop")
        if small and large:
            extent = [n * s for n, s in zip(shape, spacing)]
            # the training cases' shapes are in their own voxels: their spacing (the fingerprint's median), not
            # the model's target spacing, makes them millimetres (a fast student's target spacing is coarser)
            voxel = fp.get("median_spacing") or plans.target_spacing
            top = [float(m) * t for m, t in zip(large, voxel)]
            bottom = [float(m) * t for m, t in zip(small, voxel)]
            wide = [i for i in range(3) if extent[i] > top[i] * INPUT_CHECKS["extent_factor"]]
            narrow = [i for i in range(3) if extent[i] < bottom[i] / INPUT_CHECKS["extent_factor"]]
            if wide:
                i = wide[0]
                lines.append(f"{shown}: its field of view ({extent[i]:.0f} mm along axis {i}) is far larger than the "
                             f"training cases' (at most {top[i]:.0f} mm); a model trained on cropped images may "
                             "mark structures outside the region it knows; crop the image to that region")
            elif narrow:
                i = narrow[0]
                lines.append(f"{shown}: its field of view ({extent[i]:.0f} mm along axis {i}) is far smaller than "
                             f"the training cases' (at least {bottom[i]:.0f} mm); structures may be cut off")
        resampled = [max(int(round(n * s / t)), 1) for n, s, t in zip(shape, spacing, plans.target_spacing)]
        usual = count_windows(plans.median_shape, plans.patch_size, self.overlap) if all(plans.median_shape) else 0
        windows = count_windows(resampled, plans.patch_size, self.overlap)
        if usual and windows > INPUT_CHECKS["windows_refuse"] * usual:
            raise InputCheckError(f"{shown} needs {windows} windows at the model's spacing, {windows / usual:.0f}x a "
                              f"typical training case's {usual}; check its spacing and field of view, or {fix}")
        if usual and windows > INPUT_CHECKS["windows_warn"] * usual:
            lines.append(f"{shown} needs {windows} windows at the model's spacing, {windows / usual:.0f}x a typical "
                         f"training case's {usual}: it will take that much longer")
        for c, norm in enumerate(plans.normalisation):
            intensities = fp.get("foreground_intensity") or []
            stats = intensities[c] if c < len(intensities) else None
            if norm.scheme != "ct" or not stats:  # z-scored per image: a linear rescaling changes nothing
                continue
            median = float(np.median(image[c]))
            lo, hi = float(stats["percentile_00_5"]), float(stats["percentile_99_5"])
            span = hi - lo
            if not lo - span <= median <= hi + span:
                lines.append(f"{shown}: channel {c}'s median intensity {median:g} is far outside the training "
                             f"foreground's {lo:g} to {hi:g} (another modality, or other units?)")
        return lines

    def _tta_axes(self, asked: tuple[int, ...]) -> tuple[int, ...]:
        """The axes mirror TTA may flip: those asked for that the model saw mirrored in training (its
        bundle's ``mirror_axes``). A model trained without mirroring refuses TTA: averaging in flipped views
        it never saw lowers its Dice (acdc-heart: 0.740 -> 0.220 on held-out scans). A model that does not
        record its training augmentation (an nnU-Net folder's view) keeps the axes asked for."""
        trained = getattr(self.bundle, "mirror_axes", None)
        if trained is None:
            return asked
        allowed = tuple(a for a in asked if a in trained)
        if not allowed:
            name = getattr(self.bundle, "name", "this model")
            raise ReCoKDError(f"model {name} was trained without mirroring{'' if not trained else ' along those axes'}, "
                              "so mirror test-time augmentation would average in views it never saw (it lowered a "
                              "shipped model's Dice from 0.74 to 0.22); run it without --tta")
        return allowed

    def check_resampled_size(self, shape: Sequence[int], spacing: Sequence[float], name: str = "image") -> None:
        """Refuse, before anything is allocated, an image that resampling to the model's spacing would make
        absurdly large (more than 64x the training cases' median volume, and more than 256^3 voxels: e.g.
        a spacing in micrometres) or tiny (under 1/1000 of a training patch: e.g. a spacing in metres).

        Args:
            shape, spacing: the (D, H, W) voxel grid and voxel size (mm) of the input, in the model's axis order.
        """
        target = self.plans.target_spacing
        out = [max(int(round(n * s / t)), 1) for n, s, t in zip(shape, spacing, target)]
        voxels = math.prod(out)
        median = math.prod(self.plans.median_shape)
        patch = math.prod(self.plans.patch_size)
        shown = f"{name} ({'x'.join(map(str, shape))} voxels of {' x '.join(f'{s:g}' for s in spacing)} mm)"
        fix = "check the spacing in its header, or pass --force to segment it anyway"
        if voxels > max(64 * median, 256**3):
            gib = voxels * 4 * self.plans.num_channels / 2**30
            raise InputCheckError(f"{shown} would become {'x'.join(map(str, out))} voxels ({gib:.0f} GiB) at the model's "
                              f"{' x '.join(f'{t:g}' for t in target)} mm; {fix}")
        if voxels * 1000 < patch:
            raise InputCheckError(f"{shown} would become only {'x'.join(map(str, out))} voxel(s) at the model's "
                              f"{' x '.join(f'{t:g}' for t in target)} mm, far smaller than one training patch; {fix}")

    def predict_image(self, image: sitk.Image | Sequence[sitk.Image], name: str = "image",
                      progress: bool | ProgressFn | None = None) -> sitk.Image:
        """Labels of a SimpleITK image (or one image per channel), with the first image's exact geometry."""
        images = [image] if isinstance(image, sitk.Image) else list(image)
        arrays = []
        for i, img in enumerate(images):
            dim = img.GetDimension()
            if dim < 3:
                raise ReCoKDError(f"{name} is a {dim}D image of size {img.GetSize()}; the model segments 3D volumes, supply a 3D image")
            if dim > 3 or img.GetNumberOfComponentsPerPixel() > 1:
                from ..data.datasets import _channels_of

                arrays.append(_channels_of(img, Path(name)))
            else:
                arrays.append(sitk.GetArrayFromImage(img)[None].astype(np.float32, copy=False))
            if arrays[-1].shape[1:] != arrays[0].shape[1:]:
                raise ReCoKDError(f"{name}: channel {i} has shape {arrays[-1].shape[1:]} but channel 0 has {arrays[0].shape[1:]}; "
                                  "all channels must share one voxel grid")
            if i and img.GetDimension() == images[0].GetDimension():
                _check_same_grid(ImageGeometry.of(img), ImageGeometry.of(images[0]), f"{name}: channel {i}")
        array = np.concatenate(arrays, axis=0)
        geometry = ImageGeometry.of(images[0])
        labels = self.predict_array(array, geometry.spacing, geometry.origin, geometry.direction,
                                    progress=progress, name=name)
        return geometry.apply_to(sitk.GetImageFromArray(labels))

    def predict_files(self, inputs: Sequence[str | Path], output: str | Path,
                      progress: bool | ProgressFn | None = None, overwrite: bool = False) -> Path:
        """Segment one case (one file per channel, or one 4D file) and write the labels to ``output``
        atomically, with the input's exact spacing, origin and direction. ``output`` must be none of the
        inputs, and may exist only with ``overwrite``."""
        inputs = [Path(p) for p in inputs]
        check_label_outputs([(inputs, output)], overwrite=overwrite)  # before the work, not after it
        images = [read_image(p, verify=True) for p in inputs]  # a truncated or NaN NIfTI is an error
        try:
            labels = self.predict_image(images, name=str(inputs[0]), progress=progress)
        except ReCoKDError as exc:
            if str(inputs[0]) in str(exc):
                raise
            if isinstance(exc, InputCheckError):
                raise InputCheckError([f"{inputs[0]}: {line}" for line in exc.lines]) from None
            raise ReCoKDError(f"{inputs[0]}: {exc}") from None
        if not overwrite:  # a file that appeared during the inference; with overwrite, its kind was checked above
            from ..utils.outputs import check_output_file

            check_output_file(output, overwrite=False, kind="label map")
        return atomic_write_image(labels, Path(output))


def _check_same_grid(geometry: ImageGeometry, reference: ImageGeometry, what: str) -> None:
    """Refuse a channel whose spacing, origin or direction differs from channel 0's (the same check as
    ``recokd plan``'s, :meth:`ImageGeometry.matches`): its voxels would be paired with the wrong places."""
    if geometry.matches(reference):
        return
    for field in ("spacing", "origin", "direction"):
        mine, theirs = getattr(geometry, field), getattr(reference, field)
        if not np.allclose(mine, theirs, rtol=1e-4 if field == "spacing" else 0.0,
                           atol=0.0 if field == "spacing" else 1e-3 if field == "origin" else 1e-4):
            raise ReCoKDError(f"{what} has {field} {[round(float(v), 4) for v in mine]} but channel 0 has "
                              f"{[round(float(v), 4) for v in theirs]}; resample the channels onto one voxel grid")
    raise ReCoKDError(f"{what} lies on another voxel grid than channel 0; resample the channels onto one grid")


def label_output_ending(input_name: str) -> str:
    """The ending of a label map written for the image ``input_name``: its own when that is an output
    format, else the one-file equivalent (``.mhd`` -> ``.mha``, ``.nhdr`` / ``.nrrd.gz`` -> ``.nrrd``), else ``.nii.gz``."""
    ending = split_file_ending(input_name)[1].lower()
    if ending in LABEL_OUTPUT_ENDINGS:
        return ending  # lower case: what every reader and writer of the format recognises
    return {**TWO_FILE_ENDINGS, ".nrrd.gz": ".nrrd"}.get(ending, ".nii.gz")


def _check_output_ending(output: Path) -> None:
    ending = split_file_ending(output.name)[1].lower()
    if not ending:
        raise ReCoKDError(f"output {output} has no file ending; use one of {', '.join(LABEL_OUTPUT_ENDINGS)}")
    if ending in TWO_FILE_ENDINGS:
        # header + data files cannot be renamed into place atomically (the header names the data file)
        raise ReCoKDError(f"output {output} is a two-file format; use {TWO_FILE_ENDINGS[ending]} (one file) instead")
    if ending not in LABEL_OUTPUT_ENDINGS:
        raise ReCoKDError(f"output {output} is a {ending} file, which cannot hold a 3D label map; "
                          f"use one of {', '.join(LABEL_OUTPUT_ENDINGS)}")


def check_label_outputs(jobs: Sequence[tuple[Sequence[str | Path], str | Path]], overwrite: bool = False) -> None:
    """Check where label maps will go, before any work, under the overwrite rule
    (:mod:`ReCoKDLib.utils.outputs`): each output is a 3D one-file format, is none of the input files
    (``-o`` equal to ``-i`` would replace the scan with its labels), does not exist unless ``overwrite``
    (and then is a label-map file, not a folder), and lies in a folder that exists or can be made and
    is writable.

    Args:
        jobs: ``(input files, output file)`` per case.
        overwrite: replace existing label files.

    Raises:
        ReCoKDError: one line naming the output and the fix.
    """
    from ..utils.outputs import check_output_files

    inputs = {Path(p).resolve(): Path(p) for files, _ in jobs for p in files}
    for _, output in jobs:
        output = Path(output)
        _check_output_ending(output)
        source = inputs.get(output.resolve())
        if source is not None:
            raise ReCoKDError(f"output {output} is the input image {source}; writing it would replace the scan with "
                              "its labels, choose another -o")
        folder = output.parent
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        if not folder.is_dir():
            raise ReCoKDError(f"cannot write {output}: {folder} is a file, not a folder; choose another -o")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise ReCoKDError(f"cannot write {output}: {folder} is not writable; choose a writable -o")
    check_output_files([out for _, out in jobs], overwrite=overwrite, kind="label map", is_kind=looks_like_label_map,
                       inputs=list(inputs.values()))


#: thresholds of :meth:`Predictor.input_warnings` (documented in the README, "Predicting"): spacing more
#: than ``spacing_factor`` x outside the training range and a field of view more than ``extent_factor`` x
#: the largest (or under 1/x the smallest) training case warn; a run of more than ``windows_warn`` x the
#: windows of a median training case warns, more than ``windows_refuse`` x refuses (--force overrides)
INPUT_CHECKS = {"spacing_factor": 2.0, "extent_factor": 1.5, "windows_warn": 4.0, "windows_refuse": 16.0}

#: a label map has at most this many distinct values (TotalSegmentator: 118); an image has far more
MAX_LABEL_VALUES = 255


def looks_like_label_map(path: str | Path) -> bool:
    """Whether an existing file is a label map (what ``--overwrite`` may replace): a 3D one-component image
    of whole, non-negative values, at most :data:`MAX_LABEL_VALUES` distinct ones. A scan (CT, MR) has
    thousands, so ``predict -o scan.nii.gz --overwrite`` cannot replace one; an unreadable file is not
    taken for a label map either."""
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError:
        return False
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        return False
    array = sitk.GetArrayViewFromImage(image)
    if array.size == 0:
        return True
    if np.issubdtype(array.dtype, np.floating) and not np.array_equal(array, np.round(array)):
        return False
    low, high = float(array.min()), float(array.max())
    if low < 0 or high >= 2**16:
        return False
    return int(np.count_nonzero(np.bincount(array.astype(np.int64, copy=False).ravel()))) <= MAX_LABEL_VALUES


def write_label(image: sitk.Image, output: str | Path, overwrite: bool = False) -> Path:
    """Write a label image via a temporary file in the same folder, verified, and a rename (no partial
    output); an existing file is replaced only with ``overwrite``."""
    from ..utils.outputs import check_output_file

    output = Path(output)
    _check_output_ending(output)
    check_output_file(output, overwrite=overwrite, kind="label map", is_kind=looks_like_label_map)
    output.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_image(image, output)


