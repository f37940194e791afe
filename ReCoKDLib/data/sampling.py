"""Random patch sampling with foreground oversampling, as nnU-Net does."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ReCoKDError


class PatchSampler:
    """Draw training batches of patches from in-memory volumes.

    A share ``foreground_fraction`` of the patches (default 1/3) is centred on a random voxel of a random
    class present in the case, so small classes are seen; the rest are placed uniformly. Volumes smaller
    than the patch are zero-padded (labels padded with background). Random flips along each axis.

    Args:
        images: per case, (C, D, H, W) float tensors.
        labels: per case, (D, H, W) integer tensors.
        patch_size: (d, h, w).
        batch_size: patches per batch.
        seed: seeds the sampler's own generator (independent of torch's global RNG).
    Returns (per :meth:`next`):
        images (B, C, d, h, w) float32 and labels (B, 1, d, h, w) int64.
    """

    def __init__(
        self,
        images: Sequence[torch.Tensor],
        labels: Sequence[torch.Tensor],
        patch_size: Sequence[int],
        batch_size: int = 2,
        foreground_fraction: float = 1 / 3,
        flips: bool = True,
        seed: int = 0,
    ):
        if len(images) != len(labels) or not images:
            raise ReCoKDError(f"need matching, non-empty image and label lists, got {len(images)} and {len(labels)}")
        self.patch = tuple(int(p) for p in patch_size)
        self.images = [self._pad(img.float(), self.patch) for img in images]
        self.labels = [self._pad(lab.long()[None], self.patch)[0] for lab in labels]
        self.batch_size = batch_size
        self.foreground_fraction = foreground_fraction
        self.flips = flips
        self.rng = np.random.default_rng(seed)
        # Per case and class, the flat indices of its voxels: computed once, sampled every step.
        self.class_voxels = [self._class_index(lab) for lab in self.labels]

    @staticmethod
    def _pad(volume: torch.Tensor, patch: tuple[int, ...]) -> torch.Tensor:
        pads = [max(p - s, 0) for s, p in zip(volume.shape[1:], patch)]
        if not any(pads):
            return volume
        spec = []
        for p in reversed(pads):
            spec += [p // 2, p - p // 2]
        return F.pad(volume, spec)

    @staticmethod
    def _class_index(label: torch.Tensor) -> dict[int, np.ndarray]:
        flat = label.reshape(-1).numpy()
        order = np.argsort(flat, kind="stable")
        values, starts = np.unique(flat[order], return_index=True)
        bounds = list(starts[1:]) + [flat.size]
        return {int(v): order[s:e] for v, s, e in zip(values, starts, bounds) if v != 0}

    def _corner(self, case: int, force_foreground: bool) -> tuple[int, ...]:
        shape = self.labels[case].shape
        voxels = self.class_voxels[case]
        if force_foreground and voxels:
            cls = list(voxels)[self.rng.integers(len(voxels))]
            centre = np.unravel_index(voxels[cls][self.rng.integers(len(voxels[cls]))], shape)
            return tuple(
                int(np.clip(c - p // 2, 0, s - p)) for c, p, s in zip(centre, self.patch, shape)
            )
        return tuple(int(self.rng.integers(0, s - p + 1)) for s, p in zip(shape, self.patch))

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        imgs, labs = [], []
        for i in range(self.batch_size):
            case = int(self.rng.integers(len(self.images)))
            # nnU-Net: the last third of each batch is forced to foreground.
            force = i >= round(self.batch_size * (1 - self.foreground_fraction))
            z, y, x = self._corner(case, force)
            d, h, w = self.patch
            img = self.images[case][:, z : z + d, y : y + h, x : x + w]
            lab = self.labels[case][None, z : z + d, y : y + h, x : x + w]
            if self.flips:
                axes = [a + 1 for a in range(3) if self.rng.random() < 0.5]
                if axes:
                    img, lab = img.flip(axes), lab.flip(axes)
            imgs.append(img)
            labs.append(lab)
        return torch.stack(imgs).contiguous(), torch.stack(labs).contiguous()
