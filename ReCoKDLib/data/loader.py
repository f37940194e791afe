"""Training batches from preprocessed cases: foreground-oversampled patches with MONAI augmentations.

The batch stream is *stateless*: batch ``i`` of a run is a pure function of ``(seed, rank, i)``.
Each batch draws its patches and seeds its augmentations from ``numpy.random.default_rng([seed,
rank, i])``, so the stream does not depend on how many worker processes produce it, nor on where a
run was interrupted: resuming at iteration ``i`` just asks for batches ``i, i + 1, ...`` again. Under
DistributedDataParallel every rank draws its own stream (its rank enters the seed).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..errors import ReCoKDError
from ..utils.labels import TEACHER_LABEL
from .augmentation import AUGMENT_PRESETS, THIN_SLAB_RATIO, AugmentConfig  # noqa: F401 - their home before

# at most this many voxels per case and class are kept as foreground-sampling centres
MAX_CENTRES_PER_CLASS = 20000


def build_augmentation(config: AugmentConfig, patch_size: Sequence[int] | None = None):
    """MONAI transforms over a dict ``{"image": (C, d, h, w), "label": (1, d, h, w)}``.

    Returns ``(spatial, rest)``: ``spatial`` is the rotation/scaling (always applied when called; the
    caller draws whether to call it, and feeds it a larger crop that it resamples to ``patch_size``, so
    rotated patches have no empty corners, as nnU-Net does); ``rest`` holds the other augmentations.
    Spatial transforms move image and label together (label: nearest); intensity transforms touch the
    image only.
    """
    from monai import transforms as mt

    keys = ["image", "label"]
    rad = float(np.deg2rad(config.rotate_degrees))
    scale = float(config.scale_range)
    spatial = mt.RandAffined(
        keys, prob=1.0, spatial_size=tuple(patch_size) if patch_size is not None else None,
        # MONAI's first angle turns about the first spatial axis (D): an in-plane rotation
        rotate_range=(rad, 0.0, 0.0) if config.in_plane_only else (rad,) * 3,
        scale_range=(0.0, scale, scale) if config.in_plane_only else (scale,) * 3,
        mode=("bilinear", "nearest"), padding_mode="zeros",
    )
    steps = []
    if config.elastic:
        steps.append(
            mt.Rand3DElasticd(keys, sigma_range=(5, 7), magnitude_range=(50, 150), prob=config.elastic_prob,
                              mode=("bilinear", "nearest"), padding_mode="zeros")
        )
    steps += [mt.RandFlipd(keys, prob=config.flip_prob, spatial_axis=axis) for axis in config.mirror_axes]
    steps += [
        mt.RandScaleIntensityd("image", factors=config.intensity_scale, prob=config.intensity_prob),
        mt.RandShiftIntensityd("image", offsets=config.intensity_shift, prob=config.intensity_prob),
        mt.RandAdjustContrastd("image", gamma=config.gamma, prob=config.gamma_prob),
        mt.RandGaussianNoised("image", std=config.noise_std, prob=config.noise_prob),
        mt.RandSimulateLowResolutiond("image", zoom_range=config.lowres_zoom, prob=config.lowres_prob),
    ]
    return spatial, mt.Compose(steps)


def _crop(volume: np.ndarray, start: Sequence[int], size: Sequence[int]) -> np.ndarray:
    """The box ``start … start + size`` of the spatial (last three) axes, zero outside the volume."""
    shape = volume.shape[-3:]
    lo = [max(s, 0) for s in start]
    hi = [min(s + n, d) for s, n, d in zip(start, size, shape)]
    out = volume[..., lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
    pads = [(a - s, s + n - b) for s, n, a, b in zip(start, size, lo, hi)]
    if any(p for pair in pads for p in pair):
        out = np.pad(out, [(0, 0)] * (volume.ndim - 3) + pads)
    return out


def _pad_to(volume: np.ndarray, patch: Sequence[int]) -> np.ndarray:
    """Zero-pad the spatial (last three) axes of ``volume`` symmetrically up to ``patch``."""
    pads = [max(p - s, 0) for s, p in zip(volume.shape[-3:], patch)]
    if not any(pads):
        return volume
    spec = [(0, 0)] * (volume.ndim - 3) + [(p // 2, p - p // 2) for p in pads]
    return np.pad(volume, spec)


def _class_centres(label: np.ndarray, rng: np.random.Generator) -> dict[int, np.ndarray]:
    flat = label.reshape(-1)
    out = {}
    for value in np.unique(flat):
        if value == 0 or value >= TEACHER_LABEL:  # background, and targets that are not classes (left out, or the teacher's)
            continue
        idx = np.flatnonzero(flat == value)
        if idx.size > MAX_CENTRES_PER_CLASS:
            idx = np.sort(rng.choice(idx, MAX_CENTRES_PER_CLASS, replace=False))
        out[int(value)] = idx
    return out


def _small_labels(labels) -> np.ndarray:
    """``labels`` without a copy when they are uint8 already, else as int16 (values beyond 255)."""
    array = np.asanyarray(labels)  # (any: a MappedArray stays one, so spawned workers get its name, not a copy)
    return array if array.dtype == np.uint8 else array.astype(np.int16)


class PatchBatches(Dataset):
    """Map-style dataset whose item ``i`` is training batch ``i`` (images (B, C, *patch) float32,
    labels (B, 1, *patch) uint8, int16 where a value exceeds 255). Use with ``DataLoader(batch_size=None)``.

    A share ``foreground_fraction`` of each batch (the last patches, as nnU-Net) is centred on a
    random voxel of a random class present in the case; the others are placed uniformly.

    Args:
        images: per case, float32 (C, D, H, W) arrays.
        labels: per case, integer (D, H, W) arrays.
        patch_size: (d, h, w).
        batch_size: patches per batch.
        seed, rank: see the module docstring.
        augment: :class:`AugmentConfig` (``None``: no augmentation).
        length: number of batches the dataset reports (the run's total iterations).
        case_weights: how often each case is drawn (normalised here; ``None``: every case alike), e.g. to
            hold the share of patches from unlabelled, teacher-labelled cases.
    """

    def __init__(
        self,
        images: Sequence[np.ndarray],
        labels: Sequence[np.ndarray],
        patch_size: Sequence[int],
        batch_size: int = 2,
        foreground_fraction: float = 1 / 3,
        seed: int = 0,
        rank: int = 0,
        augment: AugmentConfig | None = None,
        length: int = 1,
        case_weights: Sequence[float] | None = None,
    ):
        if len(images) != len(labels) or not images:
            raise ReCoKDError(f"need matching, non-empty image and label lists, got {len(images)} and {len(labels)}")
        if batch_size < 1:
            raise ReCoKDError(f"batch size must be >= 1, got {batch_size}")
        self.patch = tuple(int(p) for p in patch_size)
        self.images = [_pad_to(np.asanyarray(i, np.float32), self.patch) for i in images]  # (see _small_labels)
        # uint8 label maps (the cache's, memory-mapped) are used as they are: a copy would be private to each process
        self.labels = [_pad_to(_small_labels(lab), self.patch) for lab in labels]
        self.batch_size = int(batch_size)
        self.foreground_fraction = float(foreground_fraction)
        self.seed = int(seed)
        self.rank = int(rank)
        self.length = int(length)
        self.case_weights = None
        if case_weights is not None:
            weights = np.asarray(case_weights, np.float64)
            if weights.shape != (len(images),) or not np.all(np.isfinite(weights)) or weights.min() < 0 or weights.sum() <= 0:
                raise ReCoKDError(f"case_weights must be {len(images)} finite non-negative numbers, not all 0")
            self.case_weights = weights / weights.sum()
        index_rng = np.random.default_rng([self.seed, 7919])
        self.centres = [_class_centres(lab, index_rng) for lab in self.labels]
        self.augment_config = augment if augment is not None and augment.enabled else None
        self._augment = None  # built lazily (in the worker that uses it)

    def __len__(self) -> int:
        return self.length

    def _affine_margin(self) -> list[int]:
        """Per-side margin of the crop that rotated/scaled patches are resampled from: the box holds
        the patch's circumscribed sphere at the largest zoom-out, so no output voxel falls outside."""
        in_plane = self.augment_config.in_plane_only
        radius = 0.5 * float(np.linalg.norm(self.patch[1:] if in_plane else self.patch)) * (1 + self.augment_config.scale_range)
        margins = [max(int(np.ceil(radius - p / 2)), 0) + 1 for p in self.patch]
        return [0, *margins[1:]] if in_plane else margins  # in-plane turns never reach other slices

    def _corner(self, rng: np.random.Generator, case: int, force_foreground: bool) -> tuple[int, ...]:
        shape = self.labels[case].shape
        centres = self.centres[case]
        if force_foreground and centres:
            classes = sorted(centres)
            cls = classes[int(rng.integers(len(classes)))]
            flat = centres[cls][int(rng.integers(len(centres[cls])))]
            centre = np.unravel_index(int(flat), shape)
            return tuple(int(np.clip(c - p // 2, 0, s - p)) for c, p, s in zip(centre, self.patch, shape))
        return tuple(int(rng.integers(0, s - p + 1)) for s, p in zip(shape, self.patch))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, self.rank, int(index)])
        n_random = round(self.batch_size * (1 - self.foreground_fraction))
        aug = self.augment_config
        imgs, labs = [], []
        for i in range(self.batch_size):
            case = (int(rng.integers(len(self.images))) if self.case_weights is None
                    else int(rng.choice(len(self.images), p=self.case_weights)))
            corner = self._corner(rng, case, force_foreground=i >= n_random)
            affine = aug is not None and rng.random() < aug.affine_prob
            margin = self._affine_margin() if affine else [0, 0, 0]
            start = [c - m for c, m in zip(corner, margin)]
            size = [p + 2 * m for p, m in zip(self.patch, margin)]
            img = _crop(self.images[case], start, size)
            lab = _crop(self.labels[case][None], start, size)
            img, lab = torch.from_numpy(np.ascontiguousarray(img)), torch.from_numpy(lab.astype(np.int64))
            if aug is not None:
                img, lab = self._apply_augment(img, lab, affine, int(rng.integers(2**31)), int(rng.integers(2**31)))
            imgs.append(img)
            labs.append(lab)
        # labels leave as the smallest integer type that holds them (uint8 unless a value exceeds 255): the
        # copy to the device is 8x smaller than int64's; the trainer makes them indices there
        labels = torch.stack(labs)
        small = torch.uint8 if int(labels.max()) <= 255 and int(labels.min()) >= 0 else torch.int16
        return torch.stack(imgs).contiguous(), labels.to(small).contiguous()

    def _apply_augment(self, img: torch.Tensor, lab: torch.Tensor, affine: bool, seed_spatial: int, seed_rest: int
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        from monai.data import get_track_meta, set_track_meta

        if self._augment is None:
            self._augment = build_augmentation(self.augment_config, self.patch)
        spatial, rest = self._augment
        tracking = get_track_meta()
        set_track_meta(False)
        try:
            data = {"image": img, "label": lab.float()}
            if affine:
                spatial.set_random_state(seed=seed_spatial)
                data = spatial(data)
            rest.set_random_state(seed=seed_rest)
            data = rest(data)
        finally:
            set_track_meta(tracking)
        image = torch.as_tensor(data["image"]).float().contiguous()
        label = torch.as_tensor(data["label"]).round().long().contiguous()
        return image, label


def _worker_init(_worker_id: int) -> None:
    # the workers run in parallel already; one intra-op thread each
    torch.set_num_threads(1)


class _Range(torch.utils.data.Sampler):
    def __init__(self, start: int, stop: int):
        self.start, self.stop = int(start), int(stop)

    def __iter__(self):
        return iter(range(self.start, self.stop))

    def __len__(self) -> int:
        return max(self.stop - self.start, 0)


def batch_loader(dataset: PatchBatches, start: int, stop: int, num_workers: int = 0,
                 pin_memory: bool = False) -> DataLoader:
    """Batches ``start … stop-1`` of ``dataset``, in order, produced by ``num_workers`` background
    processes (0: in this process), in page-locked memory with ``pin_memory`` (for asynchronous copies to
    a GPU). The result does not depend on ``num_workers``.

    The workers are forked, except in a process that has loaded OpenVINO (a notebook that predicted with
    ``--backend openvino`` or ``auto`` before training): forking beside its thread pool crashed the process,
    so there they are spawned (slower to start); the memory-mapped cases travel to them as file names
    (:class:`~ReCoKDLib.data.preprocessing.MappedArray`), so they share the cache's pages either way; cases
    held in memory (teacher labels of unlabelled scans) are copied to spawned workers."""
    import sys

    context = "spawn" if num_workers > 0 and "openvino" in sys.modules else None
    return DataLoader(
        dataset,
        batch_size=None,
        sampler=_Range(start, stop),
        num_workers=max(int(num_workers), 0),
        worker_init_fn=_worker_init if num_workers > 0 else None,
        prefetch_factor=2 if num_workers > 0 else None,
        persistent_workers=False,
        pin_memory=bool(pin_memory),
        multiprocessing_context=context,
    )
