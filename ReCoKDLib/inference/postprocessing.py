"""Largest-connected-component post-processing of label maps (nnU-Net's, decided on held-out cases).

A network trained on patches sees no more than a patch of context, so it can paint small false
positives far from the anatomy (on ACDC, HD95 ≈ 70 voxels). Anatomy that is one connected structure
(a left atrium, a heart) loses nothing when everything but its largest component is removed. Measured on
held-out cases (docs/results.md, "Post-processing"), so it is a choice per model, recorded in its bundle:

- ``none``: the argmax labels as they are;
- ``largest-foreground``: keep the largest 26-connected component of the foreground (all classes together),
  so touching classes such as myocardium and ventricles keep each other;
- ``largest-per-class``: keep the largest 26-connected component of every class on its own.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from ..errors import ReCoKDError

__all__ = ["POSTPROCESSING", "postprocess_labels"]

POSTPROCESSING = ("none", "largest-foreground", "largest-per-class")

_FULL = np.ones((3, 3, 3), dtype=bool)  # 26-connectivity


def _largest(mask: np.ndarray) -> np.ndarray:
    components, count = ndimage.label(mask, structure=_FULL)
    if count <= 1:
        return mask
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    return components == int(sizes.argmax())


def postprocess_labels(labels: np.ndarray, mode: str) -> np.ndarray:
    """Post-process a (D, H, W) integer label map (0 = background) with ``mode`` (see the module
    docstring); removed voxels become background. Returns a new array of the same dtype (``none``:
    the input itself)."""
    if mode not in POSTPROCESSING:
        raise ReCoKDError(f"post-processing {mode!r} is not one of {', '.join(POSTPROCESSING)}")
    if mode == "none" or labels.ndim != 3:
        return labels
    if mode == "largest-foreground":
        return np.where(_largest(labels > 0), labels, 0).astype(labels.dtype, copy=False)
    out = np.zeros_like(labels)
    for value in np.unique(labels[labels > 0]):
        out[_largest(labels == value)] = value
    return out
