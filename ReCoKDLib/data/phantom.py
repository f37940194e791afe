"""Seeded synthetic 3D "anatomy" phantom: the built-in dataset of ``recokd demo``.

Each case is a small abdomen-like volume with five classes (see :data:`PHANTOM_LABELS`):

- ``organ``  a large, smooth, deformed and rotated ellipsoid (liver-like, ~10-20 % of the volume),
- ``kidney`` a paired medium organ: two bean-shaped ellipsoids left and right of the midline,
- ``vessel`` a thin tube (radius ~1.5-2.5 voxels at 64^3) along a smooth random curve,
- ``lesion`` 2-4 small spheres (radius ~2-4 voxels at 64^3) inside the organ.

The image mimics a single-channel MR volume: per-structure mean intensities with modest contrasts,
unlabelled distractors (subcutaneous fat rim, a bright spine), edge blur (partial volume), a smooth
multiplicative bias field and Gaussian noise, then z-scored. The large organs are easy to segment;
the vessel and lesions are where a small student network loses accuracy.

Everything is vectorised numpy and deterministic given the seed; a 64^3 case takes well under a second.
"""

from __future__ import annotations

import json
import numbers
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Dict, List, Sequence, Tuple, Union

import numpy as np

from ..errors import ReCoKDError
from ..utils.geometry import ImageGeometry
from ..utils.labels import LabelSet
from ..utils.io import atomic_write_image, atomic_write_text

__all__ = [
    "PHANTOM_COLORS",
    "PHANTOM_LABELS",
    "PhantomCase",
    "generate_case",
    "generate_dataset",
    "save_dataset_nnunet",
]

PHANTOM_LABELS = LabelSet({"background": 0, "organ": 1, "kidney": 2, "vessel": 3, "lesion": 4}, source="phantom")
"""The phantom's classes (a :class:`~ReCoKDLib.utils.labels.LabelSet`; colours from its ``NAMED_COLORS``)."""

PHANTOM_COLORS: Dict[str, Tuple[float, float, float]] = PHANTOM_LABELS.colors
"""Class name -> RGB colour (floats in 0..1) for overlays and 3D Slicer segment colours."""

_REFERENCE_SIZE = 64  # the grid size the structure sizes below were tuned for
_MIN_SIZE = 32


@dataclass(frozen=True, eq=False)  # eq=False: element-wise array comparison makes ``==`` meaningless
class PhantomCase:
    """One synthetic case.

    Attributes:
        image: float32 array of shape (1, D, H, W) (channel-first, one channel), z-scored.
        label: uint8 array of shape (D, H, W) with values in :data:`PHANTOM_LABELS`.
        geometry: where the voxels lie (:class:`~ReCoKDLib.utils.geometry.ImageGeometry`); 1.0 mm
            isotropic, origin 0, identity direction unless given.
        name: case identifier, e.g. ``"phantom_007"``; used as the file stem when saved.
    """

    image: np.ndarray
    label: np.ndarray
    geometry: ImageGeometry
    name: str


def _check_shape(shape: Sequence[int]) -> Tuple[int, int, int]:
    """Validate ``shape`` as three integers >= 32 and return it as a tuple of Python ints."""
    try:
        dims = tuple(shape)
    except TypeError:
        raise ReCoKDError(f"phantom shape must be 3 integers (D, H, W), got {shape!r}") from None
    if len(dims) != 3 or not all(isinstance(d, numbers.Integral) and not isinstance(d, bool) for d in dims):
        raise ReCoKDError(f"phantom shape must be 3 integers (D, H, W), got {shape!r}")
    if min(dims) < _MIN_SIZE:
        raise ReCoKDError(f"phantom shape must be at least {_MIN_SIZE} voxels per axis, got {shape!r}")
    return int(dims[0]), int(dims[1]), int(dims[2])


def _check_seed(seed: int) -> int:
    """Validate ``seed`` as a non-negative integer (what ``numpy.random.default_rng`` accepts)."""
    if not isinstance(seed, numbers.Integral) or isinstance(seed, bool) or seed < 0:
        raise ReCoKDError(f"phantom seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def _rotation(rng: np.random.Generator, max_degrees: float) -> np.ndarray:
    """Random 3x3 rotation matrix about a random axis by at most ``max_degrees`` (Rodrigues' formula)."""
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    angle = np.deg2rad(rng.uniform(-max_degrees, max_degrees))
    k = np.array([[0.0, -axis[2], axis[1]], [axis[2], 0.0, -axis[0]], [-axis[1], axis[0], 0.0]])
    return np.eye(3) + np.sin(angle) * k + (1.0 - np.cos(angle)) * (k @ k)


def _ellipsoid_coords(
    grid: Sequence[np.ndarray], center: np.ndarray, radii: np.ndarray, rotation: np.ndarray
) -> List[np.ndarray]:
    """Coordinates of ``grid`` in the frame of a rotated ellipsoid, divided by its radii.

    Args:
        grid: open grid (z, y, x) as returned by ``np.ogrid``, voxel units.
        center: (3,) ellipsoid centre in voxels, (z, y, x) order.
        radii: (3,) semi-axes in voxels along the rotated axes.
        rotation: (3, 3) rotation matrix from volume axes to ellipsoid axes.

    Returns:
        three float32 arrays broadcast to the full grid shape; the ellipsoid is ``sum(q**2) < 1``.
    """
    rel = [g - c for g, c in zip(grid, center.astype(np.float32))]
    coords = []
    for i in range(3):
        row = rotation[i].astype(np.float32)
        coords.append((row[0] * rel[0] + row[1] * rel[1] + row[2] * rel[2]) / np.float32(radii[i]))
    return coords


def _gaussian_blur(volume: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of a 3D float32 array with edge padding (numpy-only, no scipy)."""
    radius = max(1, int(np.ceil(3.0 * sigma)))
    taps = np.arange(-radius, radius + 1, dtype=np.float32)
    kernel = np.exp(-0.5 * (taps / sigma) ** 2)
    kernel /= kernel.sum()
    out = volume
    for axis in range(3):
        padded = np.pad(out, [(radius, radius) if a == axis else (0, 0) for a in range(3)], mode="edge")
        n = out.shape[axis]
        acc = np.zeros_like(out)
        for offset, weight in enumerate(kernel):
            acc += weight * np.take(padded, np.arange(offset, offset + n), axis=axis)
        out = acc
    return out


def _tube_mask(shape: Tuple[int, int, int], points: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """Voxels within a varying radius of a polyline.

    Exact point-to-segment distances are evaluated only in each segment's bounding box, so the
    cost is proportional to the tube's volume rather than the grid's.

    Args:
        shape: grid shape (D, H, W).
        points: (N, 3) polyline vertices in voxels, (z, y, x) order.
        radii: (N,) tube radius at each vertex, linearly interpolated along segments.

    Returns:
        bool array of shape ``shape``.
    """
    mask = np.zeros(shape, dtype=bool)
    dims = np.asarray(shape)
    for a, b, ra, rb in zip(points[:-1], points[1:], radii[:-1], radii[1:]):
        reach = max(ra, rb) + 1.0
        lo = np.clip(np.floor(np.minimum(a, b) - reach).astype(int), 0, dims)
        hi = np.clip(np.ceil(np.maximum(a, b) + reach).astype(int) + 1, 0, dims)
        if np.any(hi <= lo):
            continue  # segment lies outside the volume
        zz, yy, xx = np.ogrid[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
        d = b - a
        rel = (zz - a[0], yy - a[1], xx - a[2])
        t = np.clip((rel[0] * d[0] + rel[1] * d[1] + rel[2] * d[2]) / max(float(d @ d), 1e-12), 0.0, 1.0)
        dist2 = (rel[0] - t * d[0]) ** 2 + (rel[1] - t * d[1]) ** 2 + (rel[2] - t * d[2]) ** 2
        mask[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] |= dist2 <= (ra + t * (rb - ra)) ** 2
    return mask


def _sphere_in_box(
    center: np.ndarray, radius: float, shape: Tuple[int, int, int]
) -> Tuple[Tuple[slice, slice, slice], np.ndarray]:
    """A ball as (bounding-box slices into a ``shape`` grid, bool mask of the box's shape)."""
    dims = np.asarray(shape)
    lo = np.clip(np.floor(center - radius).astype(int), 0, dims)
    hi = np.clip(np.ceil(center + radius).astype(int) + 1, 0, dims)
    zz, yy, xx = np.ogrid[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
    sphere = (zz - center[0]) ** 2 + (yy - center[1]) ** 2 + (xx - center[2]) ** 2 <= radius**2
    return (slice(lo[0], hi[0]), slice(lo[1], hi[1]), slice(lo[2], hi[2])), sphere


def _vessel_path(
    rng: np.random.Generator, dims: np.ndarray, center_yx: np.ndarray, small: float
) -> Tuple[np.ndarray, np.ndarray]:
    """A smooth random curve running head-to-foot near the midline, resampled every ~1 voxel.

    Returns:
        points (N, 3) in voxels (z, y, x) and radii (N,) in voxels.
    """
    t = np.linspace(0.0, 1.0, 512)
    z = -2.0 + t * (dims[0] + 3.0)  # from just outside one end of the volume to the other
    y = np.full_like(t, center_yx[0] - 0.06 * dims[1])  # anterior to the spine and kidneys
    x = np.full_like(t, center_yx[1])
    # sum of sines: a few low frequencies with bounded total amplitude, so it stays clear of the kidneys
    for _ in range(3):
        for coord, max_amplitude in ((y, 0.025 * dims[1]), (x, 0.045 * dims[2])):
            amplitude = rng.uniform(0.0, max_amplitude)
            coord += amplitude * np.sin(2 * np.pi * rng.uniform(0.4, 1.8) * t + rng.uniform(0, 2 * np.pi))
    base_radius = rng.uniform(1.7, 2.3)
    radius = base_radius + 0.3 * np.sin(2 * np.pi * rng.uniform(0.5, 2.0) * t + rng.uniform(0, 2 * np.pi))
    radius = np.clip(radius, 1.5, 2.5) * small

    dense = np.stack([z, y, x], axis=1)
    arc = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(dense, axis=0), axis=1))])
    samples = np.linspace(0.0, arc[-1], int(np.ceil(arc[-1])) + 1)  # ~1 voxel per segment
    points = np.stack([np.interp(samples, arc, dense[:, i]) for i in range(3)], axis=1)
    return points, np.interp(samples, arc, radius)


def _bias_field(rng: np.random.Generator, grid: Sequence[np.ndarray], dims: np.ndarray) -> np.ndarray:
    """Smooth multiplicative bias: exp of a random quadratic polynomial in normalised coordinates (mostly 0.85-1.2)."""
    u = [(2.0 * g + 1.0) / np.float32(n) - 1.0 for g, n in zip(grid, dims)]  # voxel centres in [-1, 1]
    terms = [u[0], u[1], u[2], u[0] * u[1], u[0] * u[2], u[1] * u[2], u[0] ** 2, u[1] ** 2, u[2] ** 2]
    coefficients = rng.normal(0.0, 0.05, size=len(terms)).astype(np.float32)
    log_field = sum(c * term for c, term in zip(coefficients, terms))
    return np.exp(np.broadcast_to(log_field, tuple(int(n) for n in dims))).astype(np.float32)


def generate_case(seed: int, shape: Tuple[int, int, int] = (64, 64, 64)) -> PhantomCase:
    """Generate one phantom case, deterministically from ``seed``.

    Large organs scale with the grid; the vessel and lesion radii are given in voxels at 64^3 and
    scale up (never down) with the grid, so they stay thin but resolvable.

    Args:
        seed: non-negative integer seeding ``numpy.random.default_rng``.
        shape: grid shape (D, H, W); every axis >= 32. Axis 0 runs head to foot, 1 anterior to
            posterior, 2 patient right to left.

    Returns:
        a :class:`PhantomCase` with a float32 image of shape (1, D, H, W) and a uint8 label of
        shape (D, H, W), spacing (1.0, 1.0, 1.0), named ``"phantom_{seed:03d}"``.

    Raises:
        ReCoKDError: if ``shape`` is not 3 integers >= 32 or ``seed`` is not a non-negative integer.
    """
    shape = _check_shape(shape)
    seed = _check_seed(seed)
    rng = np.random.default_rng(seed)
    dims = np.asarray(shape, dtype=np.float64)
    small = max(1.0, min(shape) / _REFERENCE_SIZE)  # scale of thin structures, in voxels
    grid = np.ogrid[0 : shape[0], 0 : shape[1], 0 : shape[2]]
    grid = [g.astype(np.float32) for g in grid]
    z, y, x = grid

    # Body: an elliptic cylinder whose cross-section breathes slightly along z; air outside.
    offset = rng.uniform(-0.04, 0.04, size=3) * dims  # global position of the anatomy
    body_center = dims / 2.0 + offset * np.array([0.0, 1.0, 1.0])
    body_radii = np.array([0.40, 0.46]) * dims[1:] * rng.uniform(0.95, 1.05, size=2)
    breathing = 1.0 + 0.04 * np.sin(2 * np.pi * rng.uniform(0.3, 1.0) * z / shape[0] + rng.uniform(0, 2 * np.pi))
    body_r = np.sqrt(
        ((y - body_center[1]) / (body_radii[0] * breathing)) ** 2
        + ((x - body_center[2]) / (body_radii[1] * breathing)) ** 2
    )
    body = body_r < 1.0
    fat_rim = body & (body_r > 0.88)
    spine_center = body_center[1:] + np.array([0.25, 0.0]) * dims[1:]
    spine = ((y - spine_center[0]) ** 2 + (x - spine_center[1]) ** 2) < (0.075 * min(shape[1:])) ** 2
    spine = np.broadcast_to(spine, shape)

    # Organ: rotated ellipsoid on the patient's right whose surface is pushed in/out by a few
    # low-frequency cosines, clipped to the inside of the fat rim.
    organ_center = np.array([0.42, 0.42, 0.33]) * dims + offset + rng.uniform(-0.03, 0.03, size=3) * dims
    organ_radii = np.array([0.40, 0.30, 0.34]) * dims * rng.uniform(0.95, 1.1, size=3)
    q = _ellipsoid_coords(grid, organ_center, organ_radii, _rotation(rng, 25.0))
    organ_r = np.sqrt(q[0] ** 2 + q[1] ** 2 + q[2] ** 2)
    surface = np.ones_like(organ_r)
    for _ in range(4):
        freq = rng.normal(size=3)
        freq *= rng.uniform(1.5, 3.0) / np.linalg.norm(freq)
        amplitude = rng.uniform(0.04, 0.08)
        surface += amplitude * np.cos(freq[0] * q[0] + freq[1] * q[1] + freq[2] * q[2] + rng.uniform(0, 2 * np.pi))
    organ_depth = organ_r / surface  # < 1 inside; small values are deep inside
    organ = (organ_depth < 1.0) & (body_r < 0.86)

    # Kidneys: two bean-shaped ellipsoids behind the organ, either side of the spine, each with
    # a medial notch (hilum) and a darker core (sinus).
    kidney = np.zeros(shape, dtype=bool)
    kidney_core = np.zeros(shape, dtype=bool)
    for side in (-1.0, 1.0):
        center = np.array(
            [
                (0.56 + (0.04 if side < 0 else 0.0)) * dims[0],  # the one under the organ sits lower
                body_center[1] + 0.18 * dims[1],
                body_center[2] + side * 0.27 * dims[2] * rng.uniform(0.95, 1.05),
            ]
        ) + rng.uniform(-0.02, 0.02, size=3) * dims
        radii = np.array([0.19, 0.135, 0.125]) * dims * rng.uniform(0.9, 1.1, size=3)
        kq = _ellipsoid_coords(grid, center, radii, _rotation(rng, 15.0))
        kr2 = kq[0] ** 2 + kq[1] ** 2 + kq[2] ** 2
        hilum_center = center - np.array([0.0, 0.0, side * 0.95 * radii[2]])
        hilum = sum(((g - c) / (0.5 * radii[2])) ** 2 for g, c in zip(grid, hilum_center)) < 1.0
        kidney |= (kr2 < 1.0) & ~hilum
        kidney_core |= (kr2 < 0.3) & ~hilum

    vessel = _tube_mask(shape, *_vessel_path(rng, dims, body_center[1:], small))

    # Painting order sets precedence: kidneys push the organ aside, the vessel stays continuous,
    # lesions only replace organ voxels so they never cut the vessel or a kidney.
    label = np.zeros(shape, dtype=np.uint8)
    label[organ] = PHANTOM_LABELS["organ"]
    label[kidney] = PHANTOM_LABELS["kidney"]
    label[vessel] = PHANTOM_LABELS["vessel"]
    organ_only = label == PHANTOM_LABELS["organ"]
    candidates = np.flatnonzero(organ_only & (organ_depth < 0.7))
    if candidates.size == 0:  # degenerate organ: fall back to any organ voxel
        candidates = np.flatnonzero(organ_only)
    placed: List[Tuple[np.ndarray, float]] = []
    for _ in range(int(rng.integers(2, 5))):
        radius = rng.uniform(2.0, 4.0) * small
        # Rejection sampling: a lesion sits (almost) wholly in organ tissue, apart from the others,
        # so it stays a visible sphere instead of a sliver cut by a kidney or the vessel.
        for _attempt in range(30):
            center = np.array(np.unravel_index(candidates[rng.integers(candidates.size)], shape), dtype=np.float64)
            box, sphere = _sphere_in_box(center, radius, shape)
            apart = all(np.linalg.norm(center - c) > radius + r + 2.0 for c, r in placed)
            if apart and np.mean(label[box][sphere] == PHANTOM_LABELS["organ"]) >= 0.95:
                break
        placed.append((center, radius))
        label[box][sphere & (label[box] == PHANTOM_LABELS["organ"])] = PHANTOM_LABELS["lesion"]

    # Intensities relative to soft tissue (~1): modest organ contrasts, bright vessel, and bright
    # unlabelled fat and spine so that "bright" alone does not identify the vessel.
    tissue = rng.uniform(0.95, 1.05)
    organ_level = tissue + rng.uniform(0.18, 0.30)
    kidney_level = tissue + rng.uniform(0.45, 0.55)
    lesion_sign = -1.0 if rng.random() < 0.7 else 1.0  # mostly hypo-intense, like metastases
    levels = {
        "air": rng.uniform(0.0, 0.08),
        "fat": tissue + rng.uniform(0.35, 0.50),
        "spine": tissue + rng.uniform(0.55, 0.75),
        "organ": organ_level,
        "kidney": kidney_level,
        "kidney_core": kidney_level - rng.uniform(0.12, 0.20),
        "vessel": tissue + rng.uniform(0.70, 0.95),
        "lesion": organ_level + lesion_sign * rng.uniform(0.22, 0.35),
    }
    intensity = np.where(body, np.float32(tissue), np.float32(levels["air"])).astype(np.float32)
    intensity[fat_rim] = levels["fat"]
    intensity[spine & body] = levels["spine"]
    for name in ("organ", "kidney", "vessel", "lesion"):
        intensity[label == PHANTOM_LABELS[name]] = levels[name]
    intensity[kidney_core & (label == PHANTOM_LABELS["kidney"])] = levels["kidney_core"]

    # Partial-volume blur, then bias field and noise as an MR scanner would add them.
    image = _gaussian_blur(intensity, sigma=rng.uniform(0.6, 0.9))
    image *= _bias_field(rng, grid, dims)
    image += rng.uniform(0.05, 0.09) * rng.standard_normal(shape, dtype=np.float32)
    image = (image - image.mean()) / max(float(image.std()), 1e-6)

    return PhantomCase(
        image=image[None].astype(np.float32, copy=False),
        label=label,
        geometry=ImageGeometry((1.0, 1.0, 1.0)),
        name=f"phantom_{seed:03d}",
    )


def generate_dataset(
    num_cases: int, seed: int = 0, shape: Tuple[int, int, int] = (64, 64, 64)
) -> List[PhantomCase]:
    """Generate ``num_cases`` phantom cases named ``phantom_000``, ``phantom_001``, ...

    Case ``i`` is seeded from ``(seed, i)`` through ``numpy.random.SeedSequence``, so datasets of
    different sizes with the same ``seed`` share their first cases.

    Args:
        num_cases: number of cases, >= 1.
        seed: non-negative dataset seed.
        shape: grid shape (D, H, W) of every case; every axis >= 32.

    Returns:
        list of :class:`PhantomCase` (images float32 (1, D, H, W), labels uint8 (D, H, W)).

    Raises:
        ReCoKDError: for ``num_cases`` < 1, a negative or non-integer seed, or a bad ``shape``.
    """
    if not isinstance(num_cases, numbers.Integral) or isinstance(num_cases, bool) or num_cases < 1:
        raise ReCoKDError(f"phantom num_cases must be an integer >= 1, got {num_cases!r}")
    seed = _check_seed(seed)
    shape = _check_shape(shape)
    cases = []
    for i in range(int(num_cases)):
        case_seed = int(np.random.SeedSequence([seed, i]).generate_state(1)[0])
        cases.append(replace(generate_case(case_seed, shape), name=f"phantom_{i:03d}"))
    return cases


def save_dataset_nnunet(
    cases: Sequence[PhantomCase], folder: Union[str, Path], dataset_name: str = "Dataset999_Phantom"
) -> Path:
    """Write cases in the nnU-Net v2 raw layout with SimpleITK.

    Writes ``<folder>/imagesTr/<name>_0000.nii.gz`` (float32), ``<folder>/labelsTr/<name>.nii.gz``
    (uint8) and ``<folder>/dataset.json``. ``folder`` is the dataset folder itself (for nnU-Net,
    ``$nnUNet_raw/<dataset_name>``); ``dataset_name`` is recorded as the ``name`` in dataset.json.
    Array axes (D, H, W) become SimpleITK axes (z, y, x), as ``sitk.GetImageFromArray`` does.

    Args:
        cases: cases to write; names must be unique.
        folder: output folder, created if missing.
        dataset_name: nnU-Net dataset name, e.g. ``"Dataset999_Phantom"``.

    Returns:
        the dataset folder as a :class:`pathlib.Path`.

    Raises:
        ReCoKDError: if ``cases`` is empty or case names repeat.
    """
    import SimpleITK as sitk  # deferred: only needed when writing files

    cases = list(cases)
    if not cases:
        raise ReCoKDError("save_dataset_nnunet needs at least one case, got none")
    names = [case.name for case in cases]
    if len(set(names)) != len(names):
        raise ReCoKDError("save_dataset_nnunet got repeated case names; give every case a unique name")

    root = Path(folder)
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "labelsTr").mkdir(parents=True, exist_ok=True)
    for case in cases:
        image = case.geometry.apply_to(sitk.GetImageFromArray(np.ascontiguousarray(case.image[0], dtype=np.float32)))
        atomic_write_image(image, root / "imagesTr" / f"{case.name}_0000.nii.gz")
        label = case.geometry.apply_to(sitk.GetImageFromArray(np.ascontiguousarray(case.label, dtype=np.uint8)))
        atomic_write_image(label, root / "labelsTr" / f"{case.name}.nii.gz")

    dataset_json = {
        "name": dataset_name,
        "description": "ReCoKD synthetic phantom (organ, paired kidneys, vessel, lesions)",
        "channel_names": {"0": "MRI"},
        "labels": PHANTOM_LABELS.to_json(),
        "numTraining": len(cases),
        "file_ending": ".nii.gz",
    }
    atomic_write_text(root / "dataset.json", json.dumps(dataset_json, indent=4) + "\n")
    return root


#: seed of the sample volume shipped as Slicer sample data (never part of a training set: those draw
#: their case seeds from ``SeedSequence([dataset seed, i])``)
SAMPLE_SEED = 20261130


def sample_case() -> PhantomCase:
    """The sample phantom (held out from every phantom training set), named ``ReCoKDPhantom``."""
    return replace(generate_case(SAMPLE_SEED), name="ReCoKDPhantom")


def write_sample_volume(path: Union[str, Path], label_path: Union[str, Path, None] = None) -> Path:
    """Write :func:`sample_case`'s image (and, if asked, its label map) as 3D files; skipped when present.

    Written atomically, so a file that exists is complete. Returns the image path.
    """
    import SimpleITK as sitk

    path = Path(path)
    targets = [(path, "image")] + ([(Path(label_path), "label")] if label_path else [])
    if all(p.is_file() for p, _ in targets):
        return path
    case = sample_case()
    for target, what in targets:
        array = case.image[0].astype(np.float32) if what == "image" else case.label.astype(np.uint8)
        image = case.geometry.apply_to(sitk.GetImageFromArray(np.ascontiguousarray(array)))
        atomic_write_image(image, target)
    return path
