"""Cropping to the non-zero region, the first step of preprocessing and of the dataset fingerprint.

It sits below both (and below planning), so that the fingerprint, the planner and preprocessing form no
import circle: fingerprint -> cropping, planning -> fingerprint, preprocessing -> cropping and planning.
"""

from __future__ import annotations

import numpy as np

from ..errors import ReCoKDError

__all__ = ["BBox", "crop_bbox", "crop_to_nonzero"]

BBox = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]


def crop_bbox(image: np.ndarray, label: np.ndarray | None = None) -> BBox:
    """Bounding box of the voxels that are non-zero in any channel (and, if given, of label > 0).

    The label's foreground is included so that cropping never discards annotated voxels (nnU-Net
    uses the image alone; the two agree whenever the foreground lies inside the non-zero region).
    An all-zero image gives the full volume.

    Args:
        image: (C, D, H, W) array.
        label: optional (D, H, W) array.

    Returns:
        ``((d0, d1), (h0, h1), (w0, w1))``, half-open index ranges.
    """
    mask = np.any(image != 0, axis=0)
    if label is not None:
        mask |= label > 0
    box = []
    for axis in range(3):
        others = tuple(a for a in range(3) if a != axis)
        hit = np.flatnonzero(mask.any(axis=others))
        box.append((int(hit[0]), int(hit[-1]) + 1) if hit.size else (0, int(mask.shape[axis])))
    return tuple(box)  # type: ignore[return-value]


def crop_to_nonzero(
    image: np.ndarray, label: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray | None, BBox]:
    """Crop to the bounding box of voxels non-zero in any channel (extended to cover label > 0).

    Args:
        image: (C, D, H, W).
        label: optional (D, H, W).

    Returns:
        ``(image, label, bbox)``: the cropped copies (C, d, h, w) and (d, h, w), and the box
        ``((d0, d1), (h0, h1), (w0, w1))`` as half-open index ranges into the input.
    """
    if image.ndim != 4:
        raise ReCoKDError(f"crop_to_nonzero expects an image (C, D, H, W), got shape {image.shape}")
    if label is not None and label.shape != image.shape[1:]:
        raise ReCoKDError(f"label shape {label.shape} differs from image shape {image.shape[1:]}")
    bbox = crop_bbox(image, label)
    sl = tuple(slice(lo, hi) for lo, hi in bbox)
    return image[(slice(None),) + sl].copy(), None if label is None else label[sl].copy(), bbox
