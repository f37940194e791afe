"""nnU-Net-style preprocessing: crop to the non-zero region, normalise, resample to the plan's spacing.

For one case (:func:`preprocess_case`):

1. crop image and label to the bounding box of the voxels non-zero in any channel (and of the
   label's foreground, so that no annotation is cut off) -- :func:`crop_to_nonzero`;
2. normalise each channel as the plan says (``"ct"``: clip to the foreground 0.5-99.5 percentiles,
   then z-score with the foreground mean/std; ``"zscore"``: per-case z-score) -- :func:`normalise`;
3. resample to the plan's target spacing: images with cubic B-splines (SimpleITK, order 3) or
   linearly (order 1); labels by linear interpolation of each class's one-hot map followed by an
   argmax (memory-aware: one class at a time, keeping the running maximum), or by nearest neighbour.
   The output shape is ``round(shape * spacing / target_spacing)``.

Every resampling here uses one voxel-grid convention: the volume's outer voxel *edges* stay in
place and voxel centres are spread evenly between them (PyTorch's ``align_corners=False``), so the
images and labels stay aligned and resampling back restores the original grid exactly. nnU-Net
resamples the through-plane axis of strongly anisotropic data separately (nearest neighbour); that
refinement is not implemented -- all three axes are interpolated jointly.

The properties recorded per case (original geometry, crop box, shapes) let :func:`restore_label`
map a prediction made in plan space back onto the original image grid.

:func:`preprocess_dataset` does this once per case and caches the result under
``cache_dir/<plans_hash>/`` (``<case>_image.npy`` and ``<case>_label.npy``, plain arrays that
:func:`load_preprocessed` memory-maps, so a training reads only the patches it draws and its worker
processes share the pages instead of each holding the dataset; ``<case>.json`` with the properties; and
the ``plans.json`` that made them; caches written before as ``<case>.npz`` are still read, whole). Files are written atomically (a
temporary file in the same folder, then ``os.replace``), so an interrupted run never leaves a
partial case behind, and cases already cached are skipped; a lock beside the folder lets one process
at a time preprocess into it (a second one waits, then skips what the first cached). A plan that
changes the preprocessing has another hash and so writes to another folder: a stale cache is never read.
"""

from __future__ import annotations

import json
import multiprocessing
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence
from zipfile import BadZipFile

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..errors import ReCoKDError
from .datasets import CaseRecord, DatasetInfo, LoadedCase, load_case
from ..utils.io import atomic_write, atomic_write_text, read_json
from ..utils.locks import waiting_lock
from ..utils.geometry import IDENTITY_DIRECTION, dhw_to_xyz
from .cropping import BBox, crop_bbox, crop_to_nonzero  # noqa: F401 - also this module's API
from .planning import Plans

#: a crop box, one (start, stop) per axis in numpy order (D, H, W)

__all__ = [
    "PreprocessedCase",
    "crop_to_nonzero",
    "resampled_shape",
    "resample_image",
    "resample_label",
    "resample_label_nearest",
    "resize_image",
    "resize_label",
    "normalise",
    "preprocess_case",
    "restore_label",
    "preprocess_dataset",
    "load_preprocessed",
    "cache_folder",
]

_SITK_INTERPOLATORS = {0: sitk.sitkNearestNeighbor, 1: sitk.sitkLinear, 3: sitk.sitkBSpline}
_EPS = 1e-8


@dataclass
class PreprocessedCase:
    """One case in plan space.

    Attributes:
        case_id: the case identifier.
        image: float32 (C, D, H, W), normalised and resampled.
        label: uint8 (D, H, W), or ``None`` for an unlabelled case.
        properties: JSON-ready dict: ``geometry`` (the original
            :class:`~ReCoKDLib.utils.geometry.ImageGeometry`, (x, y, z)), ``original_shape``, ``bbox``,
            ``shape_after_crop``, ``shape_after_resampling``, ``target_spacing``, ``plans_hash``
            (shapes, boxes and the target spacing in array order (D, H, W)).
    """

    case_id: str
    image: np.ndarray
    label: np.ndarray | None
    properties: dict[str, Any]


# --------------------------------------------------------------------------------------------------
# resampling


def resampled_shape(
    shape: Sequence[int], spacing: Sequence[float], target_spacing: Sequence[float]
) -> tuple[int, int, int]:
    """``round(shape * spacing / target_spacing)`` per axis, at least 1."""
    return tuple(  # type: ignore[return-value]
        max(int(np.round(n * s / t)), 1) for n, s, t in zip(shape, spacing, target_spacing)
    )


def resize_image(image: np.ndarray, out_shape: Sequence[int], order: int = 3) -> np.ndarray:
    """Resample every channel of an image to ``out_shape`` (same field of view) with SimpleITK.

    Args:
        image: (C, D, H, W).
        out_shape: (D', H', W').
        order: 3 (cubic B-spline), 1 (linear) or 0 (nearest neighbour).

    Returns:
        float32 (C, D', H', W'); a copy of the input when the shape does not change.
    """
    if order not in _SITK_INTERPOLATORS:
        raise ReCoKDError(f"image resampling order must be 0, 1 or 3, got {order}")
    in_shape = tuple(int(n) for n in image.shape[1:])
    out_shape = tuple(int(n) for n in out_shape)
    if in_shape == out_shape:
        return image.astype(np.float32, copy=True)
    # Work in index space (input spacing 1, origin 0); the output grid keeps the outer voxel edges.
    out_spacing = [i / o for i, o in zip(in_shape, out_shape)]
    out_origin = [0.5 * (s - 1.0) for s in out_spacing]
    channels = []
    for c in range(image.shape[0]):
        src = sitk.GetImageFromArray(np.ascontiguousarray(image[c], dtype=np.float32))
        dst = sitk.Resample(
            src,
            dhw_to_xyz(out_shape),
            sitk.Transform(),
            _SITK_INTERPOLATORS[order],
            dhw_to_xyz(out_origin),
            dhw_to_xyz(out_spacing),
            IDENTITY_DIRECTION,
            0.0,
            sitk.sitkFloat32,
            True,  # nearest-neighbour extrapolation: the outermost half voxel never reads as 0
        )
        channels.append(sitk.GetArrayFromImage(dst))
    return np.stack(channels).astype(np.float32, copy=False)


def resample_image(
    image: np.ndarray, spacing: Sequence[float], target_spacing: Sequence[float], order: int = 3
) -> np.ndarray:
    """Resample (C, D, H, W) from ``spacing`` to ``target_spacing`` (both (D, H, W) mm); see :func:`resize_image`."""
    return resize_image(image, resampled_shape(image.shape[1:], spacing, target_spacing), order)


def resize_label(label: np.ndarray, out_shape: Sequence[int], mode: str = "linear") -> np.ndarray:
    """Resample a label map to ``out_shape`` (same field of view).

    ``"linear"`` interpolates each present value's one-hot map trilinearly and keeps, per voxel, the
    value with the largest interpolated share (ties go to the smaller value, like an argmax); only
    one class map, the running maximum and the result are held at a time. ``"nearest"`` takes the
    nearest input voxel.

    Args:
        label: (D, H, W) integer array.
        out_shape: (D', H', W').
        mode: ``"linear"`` or ``"nearest"``.

    Returns:
        (D', H', W') with the input's dtype; a copy when the shape does not change.
    """
    if mode not in ("linear", "nearest"):
        raise ReCoKDError(f"label resampling mode must be 'linear' or 'nearest', got {mode!r}")
    if label.ndim != 3:
        raise ReCoKDError(f"a label map must be (D, H, W), got shape {label.shape}")
    out_shape = tuple(int(n) for n in out_shape)
    if tuple(label.shape) == out_shape:
        return label.copy()
    src = torch.from_numpy(np.ascontiguousarray(label))
    if mode == "nearest":
        # "nearest-exact" uses the voxel-centre convention; plain "nearest" is shifted by half a voxel
        out = F.interpolate(src[None, None].float(), size=out_shape, mode="nearest-exact")[0, 0]
        return out.round().numpy().astype(label.dtype)
    result = np.empty(out_shape, dtype=label.dtype)
    best: torch.Tensor | None = None
    for value in np.unique(label):
        share = F.interpolate((src == int(value))[None, None].float(), size=out_shape, mode="trilinear", align_corners=False)[0, 0]
        if best is None:
            best = share
            result.fill(value)
            continue
        wins = share > best
        result[wins.numpy()] = value
        best = torch.maximum(best, share)
    return result


def resample_label(
    label: np.ndarray,
    spacing: Sequence[float],
    target_spacing: Sequence[float],
    num_classes: int | None = None,
    mode: str = "linear",
) -> np.ndarray:
    """Resample a (D, H, W) label map from ``spacing`` to ``target_spacing`` by one-hot linear
    interpolation and argmax (nnU-Net's way; see :func:`resize_label`).

    Args:
        num_classes: when given, every label value must be below it (an ``ignore`` value counts as a
            class here); the classes resampled are the values present.
        mode: ``"linear"`` (default) or ``"nearest"``.
    """
    if num_classes is not None and label.size and int(label.max()) >= num_classes:
        raise ReCoKDError(f"label value {int(label.max())} is not below num_classes={num_classes}")
    return resize_label(label, resampled_shape(label.shape, spacing, target_spacing), mode)


def resample_label_nearest(
    label: np.ndarray, spacing: Sequence[float], target_spacing: Sequence[float]
) -> np.ndarray:
    """Resample a (D, H, W) label map by nearest neighbour (cheaper, blockier than one-hot linear)."""
    return resize_label(label, resampled_shape(label.shape, spacing, target_spacing), "nearest")


# --------------------------------------------------------------------------------------------------
# normalisation


def normalise(image: np.ndarray, plans: Plans) -> np.ndarray:
    """Normalise each channel of a (C, D, H, W) image as the plan says; returns a new float32 array."""
    if image.ndim != 4 or image.shape[0] != plans.num_channels:
        raise ReCoKDError(
            f"image of shape {image.shape} does not have the plan's {plans.num_channels} channel(s) (C, D, H, W)"
        )
    out = np.empty(image.shape, dtype=np.float32)
    for c, norm in enumerate(plans.normalisation):
        channel = image[c].astype(np.float32, copy=False)
        if norm.scheme == "ct":
            clipped = np.clip(channel, norm.lower, norm.upper)
            out[c] = (clipped - norm.mean) / max(norm.std, _EPS)  # type: ignore[operator, arg-type]
        else:
            mean = float(channel.mean(dtype=np.float64))
            std = float(channel.std(dtype=np.float64))
            out[c] = (channel - mean) / max(std, _EPS)
    return out


# --------------------------------------------------------------------------------------------------
# one case


def _label_uint8(label: np.ndarray, case_id: str) -> np.ndarray:
    if label.size and (int(label.min()) < 0 or int(label.max()) > 255):
        raise ReCoKDError(
            f"case {case_id!r} has label values from {int(label.min())} to {int(label.max())}; "
            "preprocessing stores labels as uint8, use values 0..255"
        )
    return label.astype(np.uint8, copy=False)


def preprocess_case(case: LoadedCase, plans: Plans) -> PreprocessedCase:
    """Crop, normalise and resample one loaded case to plan space.

    Args:
        case: from :func:`~ReCoKDLib.data.datasets.load_case`; image (C, D, H, W), label (D, H, W) or None.
        plans: the experiment plan.

    Returns:
        a :class:`PreprocessedCase` with image float32 (C, D', H', W') and label uint8 (D', H', W').

    Raises:
        ReCoKDError: the case's channel count differs from the plan's, or its labels do not fit uint8.
    """
    if case.image.ndim != 4 or case.image.shape[0] != plans.num_channels:
        raise ReCoKDError(
            f"case {case.case_id!r} has {case.image.shape[0] if case.image.ndim == 4 else '?'} channel(s) "
            f"but the plan for '{plans.dataset_name}' expects {plans.num_channels} "
            f"({', '.join(plans.channel_names.values())}); use a plan made for this dataset"
        )
    image, label, bbox = crop_to_nonzero(case.image, case.label)
    shape_after_crop = tuple(int(n) for n in image.shape[1:])
    # normalise before resampling (as nnU-Net): the statistics are those of the original voxels
    image = normalise(image, plans)
    out_shape = resampled_shape(shape_after_crop, case.geometry.spacing_dhw, plans.target_spacing)
    image = resize_image(image, out_shape, int(plans.resampling["image_order"]))
    if label is not None:
        label = _label_uint8(resize_label(_label_uint8(label, case.case_id), out_shape, plans.resampling["label"]), case.case_id)
    properties = {
        "case_id": case.case_id,
        "plans_hash": plans.plans_hash(),
        "geometry": case.geometry.to_json(),
        "original_shape": [int(n) for n in case.image.shape[1:]],
        "bbox": [[int(lo), int(hi)] for lo, hi in bbox],
        "shape_after_crop": list(shape_after_crop),
        "shape_after_resampling": list(out_shape),
        "target_spacing": list(plans.target_spacing),
    }
    return PreprocessedCase(case_id=case.case_id, image=image, label=label, properties=properties)


def restore_label(label: np.ndarray, properties: dict[str, Any], mode: str = "linear") -> np.ndarray:
    """Map a label map from plan space back onto the case's original voxel grid.

    Resamples to the cropped shape (one-hot linear or nearest), then pastes it into the crop box of
    an all-background volume of the original shape.

    Args:
        label: (D', H', W') in plan space (shape ``properties["shape_after_resampling"]``).
        properties: the case's :attr:`PreprocessedCase.properties`.
        mode: ``"linear"`` or ``"nearest"``.

    Returns:
        (D, H, W) of ``properties["original_shape"]``, same dtype as ``label``; its geometry is
        ``properties["geometry"]``.
    """
    try:
        expected = tuple(properties["shape_after_resampling"])
        crop_shape = tuple(properties["shape_after_crop"])
        original = tuple(properties["original_shape"])
        bbox = properties["bbox"]
    except KeyError as exc:
        raise ReCoKDError(f"case properties lack {exc.args[0]!r}; preprocess the case again") from None
    if tuple(label.shape) != expected:
        raise ReCoKDError(
            f"label of shape {tuple(label.shape)} does not match the preprocessed shape {expected} of case "
            f"{properties.get('case_id')!r}; pass the prediction in plan space"
        )
    restored = np.zeros(original, dtype=label.dtype)
    restored[tuple(slice(lo, hi) for lo, hi in bbox)] = resize_label(label, crop_shape, mode)
    return restored


# --------------------------------------------------------------------------------------------------
# dataset cache


def cache_folder(cache_dir: str | Path, plans: Plans) -> Path:
    """The folder holding the cases preprocessed with ``plans``: ``cache_dir/<plans_hash>``."""
    return Path(cache_dir) / plans.plans_hash()


def _case_files(folder: Path, case_id: str) -> tuple[Path, Path, Path, Path]:
    """``(image.npy, label.npy, legacy .npz, properties .json)`` of a cached case."""
    return (folder / f"{case_id}_image.npy", folder / f"{case_id}_label.npy", folder / f"{case_id}.npz",
            folder / f"{case_id}.json")


def _is_cached(folder: Path, case_id: str) -> bool:
    image, _, legacy, props = _case_files(folder, case_id)
    # the properties are written after the arrays, so their presence means the case is complete
    return (image.is_file() or legacy.is_file()) and props.is_file()


def _save_case(folder: Path, case: PreprocessedCase) -> None:
    image, label, _, props = _case_files(folder, case.case_id)
    arrays = {image: case.image, label: case.label}
    for path, array in arrays.items():
        if array is None:
            continue

        def write(tmp: Path, array=array) -> None:
            with open(tmp, "wb") as f:
                np.save(f, np.ascontiguousarray(array), allow_pickle=False)

        atomic_write(path, write)
    atomic_write_text(props, json.dumps(case.properties, indent=2) + "\n")


def _preprocess_and_save(record: CaseRecord, dataset: DatasetInfo, plans: Plans, folder: Path) -> str:
    _save_case(folder, preprocess_case(load_case(record, dataset), plans))
    return record.case_id


def _worker_init() -> None:
    # one thread per worker process: the workers already use the cores
    torch.set_num_threads(1)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)


def preprocess_dataset(
    dataset: DatasetInfo,
    plans: Plans,
    cache_dir: str | Path,
    num_workers: int = 0,
    progress: bool = True,
    cases: Sequence[CaseRecord] | None = None,
) -> Path:
    """Preprocess the training cases (or ``cases``) once and cache them under ``cache_dir/<plans_hash>``.

    Cases already cached for this plan are skipped; the others are written atomically (see the module
    docstring). ``plans.json`` in the folder records the plan that made them.

    Args:
        dataset: the opened dataset the plan was made for.
        plans: the experiment plan.
        cache_dir: the cache root; created when missing.
        num_workers: worker processes; 0 preprocesses in this process. Workers are spawned (each
            imports torch, a few seconds), so they pay off only for datasets of large cases.
        progress: show a tqdm progress bar on stderr.
        cases: the cases to preprocess; default all training cases.

    Returns:
        the folder of this plan's cached cases.

    Raises:
        ReCoKDError: the dataset's channels or labels differ from the plan's, or a case fails.
    """
    if dataset.num_channels != plans.num_channels or dataset.labels != plans.labels:
        raise ReCoKDError(
            f"the plan for '{plans.dataset_name}' ({plans.num_channels} channel(s), labels {plans.labels}) does not fit "
            f"dataset '{dataset.name}' ({dataset.num_channels} channel(s), labels {dataset.labels}); plan this dataset"
        )
    folder = cache_folder(cache_dir, plans)
    folder.mkdir(parents=True, exist_ok=True)
    records = list(dataset.training if cases is None else cases)
    # one process at a time preprocesses a plan's cases (two trainings sharing a cache, started together):
    # the other waits, then finds them cached. The lock file lies beside the folder, which holds cases only.
    lock = Path(cache_dir) / f".preprocess-{plans.plans_hash()[:16]}.lock"
    with waiting_lock(lock, f"the preprocessing into {folder}", on_wait=_tell):
        if not (folder / "plans.json").is_file():
            plans.save(folder / "plans.json")
        todo = [r for r in records if not _is_cached(folder, r.case_id)]
        bar = tqdm(total=len(todo), desc=f"preprocess {dataset.name}", disable=not progress or not todo, leave=False)
        try:
            if num_workers <= 0:
                for record in todo:
                    _preprocess_and_save(record, dataset, plans, folder)
                    bar.update()
            else:
                # "spawn": forking a process whose OpenMP (torch) threads already ran can deadlock
                context = multiprocessing.get_context("spawn")
                with ProcessPoolExecutor(num_workers, mp_context=context, initializer=_worker_init) as pool:
                    futures = [pool.submit(_preprocess_and_save, r, dataset, plans, folder) for r in todo]
                    for future in as_completed(futures):
                        future.result()  # re-raises a worker's error here
                        bar.update()
        finally:
            bar.close()
    return folder


def _tell(line: str) -> None:
    """A waiting process says so (stderr), so that a wait for another process never looks like a hang."""
    print(line, file=sys.stderr, flush=True)


class MappedArray(np.memmap):
    """A memory map of a whole cached ``.npy`` file that pickles as the file's name and mode, not its data.

    Data-loading workers that are spawned (not forked) receive the dataset pickled: a plain memory map would
    arrive as a private copy of every case in every worker; this one is reopened there and shares the page
    cache like a forked worker's. A slice (or anything derived) pickles by value, as usual. The maps are
    copy-on-write: a spawned worker sees the file, not an in-place change this process made to its copy
    (training never changes a loaded case in place).
    """

    def __array_wrap__(self, array, context=None, return_scalar=False):
        # what is computed from a map is a plain array (or scalar), as np.memmap's own results are
        array = np.asarray(array)
        return array[()] if return_scalar else array

    def __reduce__(self):
        whole = getattr(self, "_whole", None)  # set on the map of a whole file only (a slice does not inherit it)
        if whole is not None and whole == (self.ctypes.data, self.shape) and self.filename:
            return (_reopen_mapped, (self.filename, self.mode))
        return np.asarray(self).__reduce__()


def _reopen_mapped(filename: str, mode: str) -> MappedArray:
    mapped = np.load(filename, mmap_mode=mode, allow_pickle=False).view(MappedArray)
    mapped._whole = (mapped.ctypes.data, mapped.shape)
    return mapped


def load_preprocessed(cache_dir: str | Path, plans: Plans, case_id: str, mmap: bool = True) -> PreprocessedCase:
    """Load one case cached by :func:`preprocess_dataset` for ``plans`` (``allow_pickle=False``).

    With ``mmap`` (default) the arrays are copy-on-write memory maps of the cache files: nothing is read until
    used, processes reading the same case share its pages, and a write (an in-place operation on a tensor
    made from them) gets a private copy of its page instead of reaching the file (or, with a read-only
    map, crashing the process); they pickle as their file names (:class:`MappedArray`), so spawned workers
    share them too. Caches written as ``.npz`` load whole.

    Raises:
        ReCoKDError: the case is not cached for this plan, or its file is corrupt.
    """
    folder = cache_folder(cache_dir, plans)
    image_file, label_file, legacy, props = _case_files(folder, case_id)
    if not _is_cached(folder, case_id):
        raise ReCoKDError(
            f"case {case_id!r} is not preprocessed for this plan in {folder}; run preprocess_dataset first"
        )
    mode = "c" if mmap else None
    try:
        if image_file.is_file():
            where = image_file
            image = _reopen_mapped(str(image_file), mode) if mmap else np.load(image_file, allow_pickle=False)
            where = label_file
            label = None if not label_file.is_file() else \
                _reopen_mapped(str(label_file), mode) if mmap else np.load(label_file, allow_pickle=False)
        else:
            where = legacy
            with np.load(legacy, allow_pickle=False) as data:
                image = data["image"]
                label = data["label"] if "label" in data.files else None
    except (OSError, ValueError, KeyError, BadZipFile) as exc:
        raise ReCoKDError(f"cached case {where} is unreadable ({exc}); delete {folder / case_id}_*.npy (or .npz) and "
                          f"{props.name} beside it, and preprocess again") from None
    return PreprocessedCase(case_id=case_id, image=image, label=label, properties=read_json(props, "case properties file"))
