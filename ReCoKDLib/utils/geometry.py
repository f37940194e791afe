"""3D Slicer's RAS voxel-to-world matrix <-> SimpleITK's LPS (spacing, origin, direction), written once.

Slicer stores a volume as a (K, J, I) array plus a 4x4 IJK-to-RAS matrix; SimpleITK and ITK files use
LPS with (x, y, z) = (I, J, K) spacing/origin/direction. RAS -> LPS negates the first two world
coordinates, so the direction is the IJK-to-RAS rotation with its first two rows negated, the origin
the translation with its first two values negated, and the spacing the column norms. numpy only.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..errors import ReCoKDError

__all__ = ["RAS_TO_LPS", "lps_geometry_from_ijk_to_ras", "ijk_to_ras_from_lps_geometry"]

#: the same matrix maps RAS to LPS and back
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])


def lps_geometry_from_ijk_to_ras(ijk_to_ras: Sequence[Sequence[float]] | np.ndarray):
    """``(spacing, origin, direction)`` in SimpleITK's convention (tuples; direction row-major 3x3) from a
    4x4 IJK-to-RAS matrix. Raises :class:`ReCoKDError` for a wrong shape or a zero voxel size."""
    m = np.asarray(ijk_to_ras, dtype=np.float64)
    if m.shape != (4, 4):
        raise ReCoKDError(f"IJK-to-RAS must be a 4x4 matrix, got shape {m.shape}")
    linear = RAS_TO_LPS @ m[:3, :3]
    spacing = np.linalg.norm(linear, axis=0)
    if np.any(spacing <= 0):
        raise ReCoKDError("the volume has a zero voxel size (a zero column in IJK-to-RAS); fix its geometry first")
    direction = linear / spacing
    origin = RAS_TO_LPS @ m[:3, 3]
    return tuple(spacing.tolist()), tuple(origin.tolist()), tuple(direction.ravel().tolist())


def ijk_to_ras_from_lps_geometry(spacing, origin, direction) -> np.ndarray:
    """The 4x4 IJK-to-RAS matrix of a SimpleITK-convention geometry (the inverse of the function above)."""
    m = np.eye(4)
    m[:3, :3] = RAS_TO_LPS @ np.asarray(direction, dtype=np.float64).reshape(3, 3) @ np.diag(spacing)
    m[:3, 3] = RAS_TO_LPS @ np.asarray(origin, dtype=np.float64)
    return m
