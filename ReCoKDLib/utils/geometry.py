"""Image geometry, in one stated axis order, and 3D Slicer's RAS <-> SimpleITK's LPS, each written once.

:class:`ImageGeometry` is where a voxel array lies in patient space. It is kept in the order of file
headers, SimpleITK's (x, y, z) with LPS world coordinates; voxel arrays are numpy (D, H, W) = (z, y, x).
The two orders meet in :func:`xyz_to_dhw` / :func:`dhw_to_xyz` only (``ImageGeometry.spacing_dhw``
for spacing), so no other module reverses a tuple by hand. Plans and fingerprints speak array order
(their spacings are (D, H, W)); files, SimpleITK and Slicer speak (x, y, z).

Slicer stores a volume as a (K, J, I) array plus a 4x4 IJK-to-RAS matrix; SimpleITK and ITK files use
LPS with (x, y, z) = (I, J, K) spacing/origin/direction. RAS -> LPS negates the first two world
coordinates, so the direction is the IJK-to-RAS rotation with its first two rows negated, the origin
the translation with its first two values negated, and the spacing the column norms. numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ..errors import ReCoKDError

__all__ = [
    "IDENTITY_DIRECTION",
    "ImageGeometry",
    "xyz_to_dhw",
    "dhw_to_xyz",
    "RAS_TO_LPS",
    "lps_geometry_from_ijk_to_ras",
    "ijk_to_ras_from_lps_geometry",
]

#: 3x3 identity direction cosines, row-major
IDENTITY_DIRECTION = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def xyz_to_dhw(values: Sequence[Any]) -> tuple:
    """Per-axis values (a size, a spacing) from SimpleITK's (x, y, z) order to numpy's (D, H, W)."""
    return tuple(values)[::-1]


def dhw_to_xyz(values: Sequence[Any]) -> tuple:
    """Per-axis values from numpy's (D, H, W) order to SimpleITK's (x, y, z) (the same reversal)."""
    return tuple(values)[::-1]


@dataclass(frozen=True)
class ImageGeometry:
    """Where an image's voxels lie in patient space: SimpleITK's (x, y, z) order, LPS, millimetres.

    Attributes:
        spacing: voxel size (x, y, z) in mm (``image.GetSpacing()``).
        origin: world position (x, y, z) of voxel (0, 0, 0), in mm (``image.GetOrigin()``).
        direction: direction cosines, row-major 3x3 (``image.GetDirection()``); column ``i`` is the
            world direction of image axis ``i``.

    A 2D file's header gives two values per field; everything past :mod:`~ReCoKDLib.data.validation`
    is 3D. The voxel array that goes with a geometry is numpy (D, H, W): see :attr:`spacing_dhw`.
    """

    spacing: tuple[float, ...]
    origin: tuple[float, ...] = (0.0, 0.0, 0.0)
    direction: tuple[float, ...] = IDENTITY_DIRECTION

    def __post_init__(self) -> None:
        # normalise to tuples of Python floats, so geometries compare and serialise alike
        for name in ("spacing", "origin", "direction"):
            object.__setattr__(self, name, tuple(float(v) for v in getattr(self, name)))

    @property
    def spacing_dhw(self) -> tuple[float, ...]:
        """Voxel size in the voxel array's axis order (D, H, W)."""
        return xyz_to_dhw(self.spacing)

    @classmethod
    def from_spacing_dhw(cls, spacing_dhw: Sequence[float], origin: Sequence[float] = (0.0, 0.0, 0.0),
                         direction: Sequence[float] = IDENTITY_DIRECTION) -> "ImageGeometry":
        """A geometry from an array-order spacing (e.g. a plan's target spacing)."""
        return cls(dhw_to_xyz(spacing_dhw), tuple(origin), tuple(direction))

    @classmethod
    def of(cls, image: Any) -> "ImageGeometry":
        """The spatial geometry of a SimpleITK image or image-file reader: its first min(dimension, 3)
        axes (a 4D file's fourth axis is its channels)."""
        dimension = image.GetDimension()
        n = min(dimension, 3)
        direction = image.GetDirection()
        return cls(
            tuple(image.GetSpacing()[:n]),
            tuple(image.GetOrigin()[:n]),
            tuple(direction[r * dimension + c] for r in range(n) for c in range(n)),
        )

    def apply_to(self, image: Any) -> Any:
        """Give a 3D SimpleITK image this geometry (in place); returns the image."""
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image

    def matches(self, other: "ImageGeometry", spacing_rtol: float = 1e-4, origin_atol_mm: float = 1e-3,
                direction_atol: float = 1e-4) -> bool:
        """Whether two geometries describe the same grid, within header round-off."""
        return (len(self.spacing) == len(other.spacing)
                and np.allclose(self.spacing, other.spacing, rtol=spacing_rtol, atol=0.0)
                and np.allclose(self.origin, other.origin, rtol=0.0, atol=origin_atol_mm)
                and np.allclose(self.direction, other.direction, rtol=0.0, atol=direction_atol))

    def to_json(self) -> dict[str, list[float]]:
        return {"spacing": list(self.spacing), "origin": list(self.origin), "direction": list(self.direction)}

    @classmethod
    def from_json(cls, data: dict[str, Sequence[float]]) -> "ImageGeometry":
        return cls(tuple(data["spacing"]), tuple(data["origin"]), tuple(data["direction"]))

    @classmethod
    def from_ijk_to_ras(cls, ijk_to_ras: Sequence[Sequence[float]] | np.ndarray) -> "ImageGeometry":
        """The geometry of a 3D Slicer volume from its 4x4 IJK-to-RAS matrix."""
        return cls(*lps_geometry_from_ijk_to_ras(ijk_to_ras))

    def ijk_to_ras(self) -> np.ndarray:
        """This geometry as 3D Slicer's 4x4 IJK-to-RAS matrix."""
        return ijk_to_ras_from_lps_geometry(self.spacing, self.origin, self.direction)

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
