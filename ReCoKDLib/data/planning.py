"""Experiment planning: from a dataset :class:`~ReCoKDLib.data.fingerprint.Fingerprint` to :class:`Plans`
and the teacher network.

:func:`plan_experiment` returns both: the :class:`Plans` (preprocessing, patch, batch) and the teacher's
:class:`~ReCoKDLib.models.unet.UNetSpec`. They are stored apart, as ``plans.json`` and
``network.json``: a network is described in ``network.json`` only, so a student's run and bundle
describe the student, never the teacher it came from.

The rules follow nnU-Net's 3D full-resolution planner (Isensee et al., Nature Methods 2021),
re-implemented here; all shapes and spacings are in numpy axis order (D, H, W).

Target spacing
    The median spacing per axis. When the data is anisotropic -- the median spacing of the coarsest
    axis is more than 3x the largest of the other axes' spacings *and* that axis' median shape (after
    cropping) times 3 is smaller than the other axes' -- the coarsest axis uses the 10th percentile of
    its spacings instead (but never finer than the other axes), so that thin-slice cases are not
    down-sampled too much and thick-slice cases are not interpolated excessively.

Normalisation (per channel)
    ``"ct"`` when the channel name contains "CT" as a separate token (case-insensitive, e.g. "CT",
    "ct_venous"): clip to the 0.5th / 99.5th percentiles of the dataset's foreground intensities,
    then subtract the foreground mean and divide by the foreground std (all four numbers are stored
    in the plan, because CT intensities are physical units shared by all cases). Otherwise
    ``"zscore"``: per case, subtract the case's mean and divide by its std. (nnU-Net's option of
    normalising only inside the non-zero mask, and ``noNorm``, are not implemented.)

Patch size
    Start from the median case shape after resampling to the target spacing (the largest patch that
    still fits a typical case, aspect ratio of the data kept). While the patch has more voxels than
    ``patch_budget_voxels``, shrink the axis with the largest physical extent (patch voxels x
    spacing) by one network divisor step, re-deriving the topology each time; the patch thus tends
    towards a cube in mm, as nnU-Net's. Every axis is finally rounded *down* to a multiple of the
    network's total stride along it, so the patch never exceeds the median shape. nnU-Net sizes the
    patch to fill GPU memory (about 128^3 voxels on 10 GB); this project trains on CPUs too, so the
    budget is a parameter with the modest default ``96**3`` voxels (:data:`DEFAULT_PATCH_BUDGET`).

Topology
    Level by level, down-sample (stride 2) every axis whose feature map is still at least
    ``2 * min_feature_size`` voxels, restricted to the axes whose current spacing is less than 2x the
    smallest current spacing among those axes -- so for anisotropic data the high-resolution axes are
    down-sampled first until the spacings become comparable. When only one axis qualifies, it also
    needs ``3 * min_feature_size`` voxels (nnU-Net's rule against a lone, barely pooled axis). The
    convolution kernel is 3 along an axis once its current spacing is less than 2x the smallest
    current spacing, else 1 (nnU-Net's 1x3x3 kernels at the high-resolution stages of thick-slice
    data); once 3 it stays 3. At most ``max_levels`` levels (``max_levels - 1`` down-samplings).
    Filters per level: ``min(base_filters * 2**level, max_filters)``. Batch size: 2.

``plans_hash()`` identifies the preprocessing a plan implies (target spacing, normalisation, channel
names, labels, resampling, version), so preprocessed caches of different plans never mix.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Sequence

import numpy as np

from ..errors import ReCoKDError
from ..models.unet import UNetSpec, nnunet_filters
from ..utils.io import JSONDocument, read_json
from ..utils.labels import LabelSet
from .datasets import dataset_fields

if TYPE_CHECKING:  # a type only: planning reads a fingerprint, it never builds one
    from .fingerprint import Fingerprint

__all__ = [
    "PLANS_VERSION",
    "DEFAULT_PATCH_BUDGET",
    "PLANNER_DEFAULTS",
    "ChannelNormalisation",
    "Plans",
    "PlannedExperiment",
    "plan_experiment",
    "plan_target_spacing",
    "plan_topology",
    "plan_patch_size",
    "normalisation_scheme",
]

#: Bumped whenever the meaning of a plan (or the preprocessing it implies) changes.
PLANS_VERSION = 1
#: Default patch budget in voxels: modest, so that CPU training stays feasible (nnU-Net: ~128^3 on GPU).
DEFAULT_PATCH_BUDGET = 96**3
#: :func:`plan_experiment`'s defaults for the options ``recokd plan`` / ``train`` expose (``--patch-budget``,
#: ``--max-levels``, ``--base-filters``, ``--max-filters``); a plan records the values it used in ``planner``
PLANNER_DEFAULTS = {"patch_budget_voxels": DEFAULT_PATCH_BUDGET, "max_levels": 6, "base_filters": 32, "max_filters": 320}
#: Spacing ratio above which nnU-Net treats the coarsest axis as anisotropic.
ANISOTROPY_THRESHOLD = 3.0
#: The normalisation schemes :func:`~ReCoKDLib.data.preprocessing.normalise` knows.
NORMALISATION_SCHEMES = ("ct", "zscore")
#: Resampling used by :mod:`~ReCoKDLib.data.preprocessing`: cubic B-spline images, one-hot linear labels.
DEFAULT_RESAMPLING = {"image_order": 3, "label": "linear"}

Triple = tuple[int, int, int]
_CT_TOKEN = re.compile(r"(?<![a-z])ct(?![a-z])", re.IGNORECASE)


def normalisation_scheme(channel_name: str) -> str:
    """``"ct"`` when the channel name contains "CT" as a token (not inside a word), else ``"zscore"``."""
    return "ct" if _CT_TOKEN.search(channel_name) else "zscore"


# --------------------------------------------------------------------------------------------------
# plan records


@dataclass(frozen=True)
class ChannelNormalisation:
    """How one channel is normalised.

    Attributes:
        scheme: ``"ct"`` or ``"zscore"``.
        mean, std: foreground mean and std (``"ct"`` only).
        lower, upper: clipping bounds, the foreground 0.5th / 99.5th percentiles (``"ct"`` only).
    """

    scheme: str
    mean: float | None = None
    std: float | None = None
    lower: float | None = None
    upper: float | None = None

    def __post_init__(self) -> None:
        if self.scheme not in NORMALISATION_SCHEMES:
            raise ReCoKDError(
                f"unknown normalisation scheme {self.scheme!r}; choose one of {', '.join(NORMALISATION_SCHEMES)}"
            )
        if self.scheme == "ct":
            values = (self.mean, self.std, self.lower, self.upper)
            if any(v is None or not math.isfinite(v) for v in values):
                raise ReCoKDError("CT normalisation needs finite mean, std, lower and upper in the plan")
            if self.std <= 0 or self.lower > self.upper:  # type: ignore[operator]
                raise ReCoKDError(
                    f"CT normalisation needs std > 0 and lower <= upper, got std={self.std}, "
                    f"lower={self.lower}, upper={self.upper}; fix the plan"
                )

    def to_dict(self) -> dict[str, Any]:
        if self.scheme == "zscore":
            return {"scheme": "zscore"}
        return {"scheme": self.scheme, "mean": self.mean, "std": self.std, "lower": self.lower, "upper": self.upper}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ChannelNormalisation":
        def opt(key: str) -> float | None:
            return None if d.get(key) is None else float(d[key])

        return cls(scheme=str(d["scheme"]), mean=opt("mean"), std=opt("std"), lower=opt("lower"), upper=opt("upper"))


@dataclass(frozen=True)
class Plans(JSONDocument):
    """Everything training and inference need to preprocess data and cut training patches.

    Attributes:
        dataset_name: the dataset the plan was made for.
        channel_names: channel index -> name.
        labels: the dataset's :class:`~ReCoKDLib.utils.labels.LabelSet`.
        target_spacing: spacing (D, H, W) in mm that every case is resampled to.
        normalisation: one :class:`ChannelNormalisation` per channel.
        patch_size: training patch (D, H, W), divisible by the network's total stride.
        batch_size: training batch size.
        median_shape: the median case shape (D, H, W) after cropping and resampling.
        resampling: ``{"image_order": 3 | 1, "label": "linear" | "nearest"}``.
        fingerprint: a summary of the dataset fingerprint (for reading; not used by code).
        planner: the planner settings used (for reading and reproducing).
        version: :data:`PLANS_VERSION`.
    """

    dataset_name: str
    channel_names: dict[int, str]
    labels: LabelSet
    target_spacing: tuple[float, float, float]
    normalisation: tuple[ChannelNormalisation, ...]
    patch_size: Triple
    batch_size: int = 2
    median_shape: Triple = (0, 0, 0)
    resampling: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_RESAMPLING))
    fingerprint: dict[str, Any] = field(default_factory=dict)
    planner: dict[str, Any] = field(default_factory=dict)
    version: int = PLANS_VERSION

    def __post_init__(self) -> None:
        if not isinstance(self.labels, LabelSet):
            object.__setattr__(self, "labels", LabelSet(self.labels, source=f"plan for '{self.dataset_name}'"))
        object.__setattr__(self, "target_spacing", tuple(float(s) for s in self.target_spacing))
        object.__setattr__(self, "patch_size", tuple(int(p) for p in self.patch_size))
        object.__setattr__(self, "median_shape", tuple(int(p) for p in self.median_shape))
        object.__setattr__(self, "normalisation", tuple(self.normalisation))
        if len(self.target_spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in self.target_spacing):
            raise ReCoKDError(f"plan target_spacing must be 3 positive numbers (D, H, W), got {list(self.target_spacing)}")
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            raise ReCoKDError(f"plan patch_size must be 3 positive integers (D, H, W), got {list(self.patch_size)}")
        if len(self.normalisation) != len(self.channel_names):
            raise ReCoKDError(
                f"plan has {len(self.normalisation)} normalisation entries for {len(self.channel_names)} channels; "
                "give one per channel"
            )
        if self.batch_size < 1:
            raise ReCoKDError(f"plan batch_size must be >= 1, got {self.batch_size}")
        order, label_mode = self.resampling.get("image_order"), self.resampling.get("label")
        if order not in (0, 1, 3) or label_mode not in ("linear", "nearest"):
            raise ReCoKDError(
                f"plan resampling {self.resampling} is not supported; use image_order 0, 1 or 3 and label 'linear' or 'nearest'"
            )

    # -- derived ------------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        """Output classes, background included (the label set's)."""
        return self.labels.num_classes

    def check_network(self, spec: UNetSpec, where: str = "plan", fix: str = "plan the experiment again") -> None:
        """Raise :class:`ReCoKDError` (naming ``where``, ending with ``fix``) unless ``spec`` takes the plan's
        channels, predicts its classes and tiles its patch (each axis a multiple of the total stride)."""
        if spec.in_channels != self.num_channels or spec.out_channels != self.num_classes:
            raise ReCoKDError(
                f"{where}: the network has {spec.in_channels} input(s) / {spec.out_channels} output(s) but the plan has "
                f"{self.num_channels} channel(s) / {self.num_classes} classes; {fix}"
            )
        bad = [p for p, d in zip(self.patch_size, spec.divisor) if p % d]
        if bad:
            raise ReCoKDError(
                f"{where}: patch size {list(self.patch_size)} is not divisible by the network's total stride "
                f"{list(spec.divisor)}; {fix}"
            )

    @property
    def num_channels(self) -> int:
        return len(self.channel_names)

    def preprocessing_dict(self) -> dict[str, Any]:
        """The parts of the plan that determine the preprocessed data."""
        return {
            "version": self.version,
            "target_spacing": list(self.target_spacing),
            "normalisation": [n.to_dict() for n in self.normalisation],
            "channel_names": {str(k): v for k, v in self.channel_names.items()},
            "labels": self.labels.to_json(),
            "resampling": dict(self.resampling),
        }

    def plans_hash(self) -> str:
        """sha256 (hex) of the canonical JSON of :meth:`preprocessing_dict`."""
        canonical = json.dumps(self.preprocessing_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    # -- serialisation ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            **dataset_fields(self.dataset_name, self.channel_names, self.labels),
            "target_spacing": list(self.target_spacing),
            "normalisation": [n.to_dict() for n in self.normalisation],
            "resampling": dict(self.resampling),
            "patch_size": list(self.patch_size),
            "batch_size": self.batch_size,
            "median_shape": list(self.median_shape),
            "planner": dict(self.planner),
            "fingerprint": dict(self.fingerprint),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "plans") -> "Plans":
        """Build a plan from :meth:`to_dict` output; raises :class:`ReCoKDError` naming ``source``.

        A ``network`` key (plans written before ``network.json`` became the only network description)
        is ignored here; :func:`~ReCoKDLib.workflows.runs.planned_network` still reads it."""
        version = d.get("version")
        if version != PLANS_VERSION:
            raise ReCoKDError(
                f"{source} has version {version!r} but this ReCoKD reads version {PLANS_VERSION}; plan the experiment again"
            )
        with cls.reading(source, "fix it or plan the experiment again"):
            return cls(
                dataset_name=str(d["dataset_name"]),
                channel_names={int(k): str(v) for k, v in d["channel_names"].items()},
                labels=LabelSet(d["labels"], source=source),
                target_spacing=tuple(d["target_spacing"]),  # type: ignore[arg-type]
                normalisation=tuple(ChannelNormalisation.from_dict(n) for n in d["normalisation"]),
                patch_size=tuple(d["patch_size"]),  # type: ignore[arg-type]
                batch_size=int(d.get("batch_size", 2)),
                median_shape=tuple(d.get("median_shape", (0, 0, 0))),  # type: ignore[arg-type]
                resampling=dict(d.get("resampling", DEFAULT_RESAMPLING)),
                fingerprint=dict(d.get("fingerprint", {})),
                planner=dict(d.get("planner", {})),
                version=int(version),
            )

    @classmethod
    def load(cls, path: str | Path) -> "Plans":
        """Read a plan written by :meth:`save` (possibly hand-edited); raises :class:`ReCoKDError`."""
        path = Path(path)
        return cls.from_dict(read_json(path, "plans file"), source=f"plans file {path}")

    def with_target_spacing(self, spacing: Sequence[float]) -> "Plans":
        """A copy with another target spacing (the patch is kept)."""
        return replace(self, target_spacing=tuple(float(s) for s in spacing))  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------
# planning steps


def plan_target_spacing(fingerprint: Fingerprint) -> tuple[float, float, float]:
    """Target spacing (D, H, W): the median spacing, or for anisotropic data the 10th percentile on the
    coarsest axis (see the module docstring)."""
    spacings = fingerprint.spacings
    target = np.median(spacings, axis=0)
    median_shape = np.median(fingerprint.shapes_after_crop, axis=0)
    worst = int(np.argmax(target))
    others = [a for a in range(3) if a != worst]
    aniso_spacing = target[worst] > ANISOTROPY_THRESHOLD * max(target[a] for a in others)
    aniso_voxels = median_shape[worst] * ANISOTROPY_THRESHOLD < min(median_shape[a] for a in others)
    if aniso_spacing and aniso_voxels:
        coarse = float(np.percentile(spacings[:, worst], 10))
        finest_allowed = max(target[a] for a in others)
        # a coarse axis finer than the in-plane ones would be pointless up-sampling
        target[worst] = max(coarse, finest_allowed)
    return tuple(float(t) for t in target)  # type: ignore[return-value]


def plan_topology(
    patch_size: Sequence[int],
    spacing: Sequence[float],
    max_levels: int = 6,
    min_feature_size: int = 4,
) -> tuple[list[Triple], list[Triple]]:
    """Kernel sizes and strides per level for a patch at a spacing (see the module docstring).

    Args:
        patch_size: (D, H, W) voxels.
        spacing: (D, H, W) mm.
        max_levels: at most this many levels (the input level included).
        min_feature_size: no axis is down-sampled below this many voxels.

    Returns:
        ``(kernel_sizes, strides)``, one triple per level; ``strides[0]`` is ``(1, 1, 1)``.
    """
    size = [int(p) for p in patch_size]
    current = [float(s) for s in spacing]
    kernel = [1, 1, 1]

    def update_kernel() -> Triple:
        smallest = min(current)
        for a in range(3):
            if kernel[a] == 1 and current[a] / smallest < 2:
                kernel[a] = 3
        return tuple(kernel)  # type: ignore[return-value]

    kernels: list[Triple] = [update_kernel()]
    strides: list[Triple] = [(1, 1, 1)]
    while len(strides) < max_levels:
        axes = [a for a in range(3) if size[a] >= 2 * min_feature_size]
        if not axes:
            break
        smallest = min(current[a] for a in axes)
        axes = [a for a in axes if current[a] / smallest < 2]
        if len(axes) == 1 and size[axes[0]] < 3 * min_feature_size:
            break
        stride = tuple(2 if a in axes else 1 for a in range(3))
        for a in axes:
            size[a] //= 2
            current[a] *= 2
        strides.append(stride)  # type: ignore[arg-type]
        kernels.append(update_kernel())
    return kernels, strides


def _divisor(strides: Sequence[Triple]) -> Triple:
    return tuple(int(np.prod([s[a] for s in strides])) for a in range(3))  # type: ignore[return-value]


def plan_patch_size(
    median_shape: Sequence[int],
    spacing: Sequence[float],
    patch_budget_voxels: int = DEFAULT_PATCH_BUDGET,
    max_levels: int = 6,
    min_feature_size: int = 4,
) -> tuple[Triple, list[Triple], list[Triple]]:
    """Patch size and matching topology (see the module docstring).

    Returns:
        ``(patch_size, kernel_sizes, strides)``; every patch axis is a multiple of the product of the
        strides along it and at most ``median_shape``.
    """
    patch = [max(int(m), 1) for m in median_shape]
    while True:
        kernels, strides = plan_topology(patch, spacing, max_levels, min_feature_size)
        div = _divisor(strides)
        patch = [p // d * d for p, d in zip(patch, div)]
        if int(np.prod(patch)) <= patch_budget_voxels:
            break
        shrinkable = [a for a in range(3) if patch[a] > 1]
        # the physically longest axis first; ties go to the one with more voxels, then the last axis
        axis = max(shrinkable, key=lambda a: (patch[a] * spacing[a], patch[a], a))
        patch[axis] = max(patch[axis] - div[axis], 1)
    # the rounded patch can only keep or lose down-samplings; derive the final topology from it
    kernels, strides = plan_topology(patch, spacing, max_levels, min_feature_size)
    return tuple(patch), kernels, strides  # type: ignore[return-value]


class PlannedExperiment(NamedTuple):
    """What :func:`plan_experiment` returns: the plan and the teacher network it was planned with."""

    plans: Plans
    network: UNetSpec


def plan_experiment(
    fingerprint: Fingerprint,
    *,
    patch_budget_voxels: int = PLANNER_DEFAULTS["patch_budget_voxels"],
    max_levels: int = PLANNER_DEFAULTS["max_levels"],
    base_filters: int = PLANNER_DEFAULTS["base_filters"],
    max_filters: int = PLANNER_DEFAULTS["max_filters"],
    min_feature_size: int = 4,
    batch_size: int = 2,
    target_spacing: Sequence[float] | None = None,
) -> PlannedExperiment:
    """Plan preprocessing and the teacher network for a fingerprinted dataset (nnU-Net's rules).

    Returns:
        ``(plans, network)``: the :class:`Plans` and the teacher's :class:`~ReCoKDLib.models.unet.UNetSpec`.

    Args:
        fingerprint: from :func:`~ReCoKDLib.data.fingerprint.compute_fingerprint`.
        patch_budget_voxels: most voxels in one training patch (default ``96**3``, CPU-friendly).
        max_levels: most U-Net levels (input level included; nnU-Net 3D: 6).
        base_filters, max_filters: channels at full resolution, doubling per level up to the cap.
        min_feature_size: smallest feature map extent an axis is down-sampled to.
        batch_size: training batch size (nnU-Net: 2).
        target_spacing: override the planned target spacing (D, H, W), e.g. for data whose spacing
            was lost; the patch and topology are then planned for it.

    Raises:
        ReCoKDError: bad settings, a CT channel without foreground statistics, or data too small for
            a U-Net of at least 3 levels.
    """
    if patch_budget_voxels < 1 or max_levels < 3 or min_feature_size < 1:
        raise ReCoKDError(
            f"need patch_budget_voxels >= 1, max_levels >= 3 and min_feature_size >= 1, got "
            f"{patch_budget_voxels}, {max_levels}, {min_feature_size}"
        )
    if base_filters < 1 or max_filters < base_filters:
        raise ReCoKDError(f"need 1 <= base_filters <= max_filters, got {base_filters} and {max_filters}")
    name = fingerprint.dataset_name

    if target_spacing is None:
        spacing = plan_target_spacing(fingerprint)
    else:
        spacing = tuple(float(s) for s in target_spacing)  # type: ignore[assignment]
        if len(spacing) != 3 or min(spacing) <= 0:
            raise ReCoKDError(f"target_spacing must be 3 positive numbers (D, H, W), got {list(target_spacing)}")

    # median shape after resampling every (cropped) case to the target spacing, as nnU-Net computes it
    resampled = np.round(fingerprint.shapes_after_crop * fingerprint.spacings / np.array(spacing))
    median_shape = tuple(int(math.floor(m)) for m in np.median(resampled, axis=0))

    patch, kernels, strides = plan_patch_size(median_shape, spacing, patch_budget_voxels, max_levels, min_feature_size)
    if len(strides) < 3:
        raise ReCoKDError(
            f"dataset '{name}': the median case ({list(median_shape)} voxels at {list(spacing)} mm) with a patch "
            f"budget of {patch_budget_voxels} voxels allows only {len(strides) - 1} down-sampling(s); a U-Net needs 2; "
            "raise patch_budget_voxels or lower min_feature_size"
        )

    normalisation = []
    for index, channel in sorted(fingerprint.channel_names.items()):
        if normalisation_scheme(channel) == "zscore":
            normalisation.append(ChannelNormalisation("zscore"))
            continue
        stats = fingerprint.foreground_intensity[index]
        if stats.num_samples == 0:
            raise ReCoKDError(
                f"dataset '{name}': CT channel {channel!r} has no foreground voxels to derive its normalisation from; "
                "supply labelled training cases"
            )
        normalisation.append(
            ChannelNormalisation(
                "ct",
                mean=stats.mean,
                std=max(stats.std, 1e-8),  # type: ignore[type-var]
                lower=stats.percentile_00_5,
                upper=stats.percentile_99_5,
            )
        )

    spec = UNetSpec(
        in_channels=len(fingerprint.channel_names),
        out_channels=fingerprint.labels.num_classes,
        kernel_sizes=tuple(kernels),
        strides=tuple(strides),
        filters=tuple(nnunet_filters(len(strides), base=base_filters, cap=max_filters)),
        name=f"{name}-teacher",
    )
    summary = fingerprint.summary()
    summary["foreground_intensity"] = [s.to_dict() for s in fingerprint.foreground_intensity]
    plans = Plans(
        dataset_name=name,
        channel_names=dict(sorted(fingerprint.channel_names.items())),
        labels=fingerprint.labels,
        target_spacing=spacing,  # type: ignore[arg-type]
        normalisation=tuple(normalisation),
        patch_size=patch,
        batch_size=batch_size,
        median_shape=median_shape,  # type: ignore[arg-type]
        resampling=dict(DEFAULT_RESAMPLING),
        fingerprint=summary,
        planner={
            "patch_budget_voxels": int(patch_budget_voxels),
            "max_levels": int(max_levels),
            "base_filters": int(base_filters),
            "max_filters": int(max_filters),
            "min_feature_size": int(min_feature_size),
            "target_spacing_override": target_spacing is not None,
        },
    )
    plans.check_network(spec)
    return PlannedExperiment(plans, spec)


def coarser_plans(plans: Plans, teacher: UNetSpec, factor: int, min_feature_size: int | None = None
                  ) -> tuple[Plans, UNetSpec, Triple]:
    """The plan and network of a fast student that works at ``factor``× its teacher's spacing.

    The student sees the same field of view as the teacher in each patch, at a coarser grid: along every
    axis whose teacher patch is a multiple of ``factor`` and keeps at least 8 voxels after it, the spacing
    is multiplied by ``factor`` and the patch divided by it (other axes, e.g. the few slices of a cine-MRI
    stack, keep their spacing). Its topology is the teacher's with the down-samplings the coarser grid
    already made removed (each coarsened axis loses its first stride-2 levels), so that its levels meet the
    teacher's at equal grids for the feature terms; where that leaves fewer than 3 levels, it is planned
    for the patch and spacing (nnU-Net's rules). Its channels are the teacher's first levels' (the caller
    makes it narrower with :meth:`UNetSpec.student`).

    Returns:
        ``(plans, spec, scale)``: the student's plan (spacing, patch, median shape; ``planner`` records
        ``spacing_factor`` and ``teacher_scale``), its network at the teacher's widths, and the per-axis
        scale (D, H, W) from the student's grid to the teacher's.

    Raises:
        ReCoKDError: ``factor`` < 1, or no axis can be coarsened.
    """
    if factor not in (1, 2, 4, 8):  # the networks down-sample by 2: only then do their levels meet at equal grids
        raise ReCoKDError(f"--student-spacing-factor must be 1, 2, 4 or 8, got {factor}")
    factor = int(factor)
    if factor == 1:
        return plans, teacher, (1, 1, 1)
    min_feature = int(min_feature_size or plans.planner.get("min_feature_size", 4))
    scale = tuple(factor if p % factor == 0 and p // factor >= 8 and m // factor >= 8 else 1
                  for p, m in zip(plans.patch_size, plans.median_shape))
    if scale == (1, 1, 1):
        raise ReCoKDError(f"no axis of the patch {list(plans.patch_size)} can be coarsened {factor}x (each needs a "
                          f"multiple of {factor} that keeps >= 8 voxels); use a smaller --student-spacing-factor")
    patch = [p // s for p, s in zip(plans.patch_size, scale)]
    spacing = tuple(t * s for t, s in zip(plans.target_spacing, scale))
    kernels, strides = _coarsened_topology(teacher, scale)
    if len(strides) < 3:
        kernels, strides = plan_topology(patch, spacing, teacher.num_levels, min_feature)
    while len(strides) > 3 and any(p % d for p, d in zip(patch, _divisor(strides))):
        kernels, strides = kernels[:-1], strides[:-1]
    if len(strides) < 3 or any(p % d for p, d in zip(patch, _divisor(strides))):
        raise ReCoKDError(f"the coarsened patch {patch} does not divide into a U-Net of 3 levels; use another "
                          "--student-spacing-factor or --patch-size")
    spec = replace(teacher, kernel_sizes=tuple(kernels), strides=tuple(strides),
                   filters=tuple(teacher.filters[: len(strides)]), name=f"{teacher.name}-x{factor}")
    planner = {**plans.planner, "spacing_factor": factor, "teacher_scale": list(scale)}
    student = replace(plans, target_spacing=spacing, patch_size=tuple(patch),  # type: ignore[arg-type]
                      median_shape=tuple(max(m // s, 1) for m, s in zip(plans.median_shape, scale)),  # type: ignore[arg-type]
                      planner=planner)
    student.check_network(spec)
    return student, spec, scale  # type: ignore[return-value]


def _coarsened_topology(teacher: UNetSpec, scale: Sequence[int]) -> tuple[list[Triple], list[Triple]]:
    """The teacher's kernels and strides with log2(scale) of each axis's first stride-2 levels taken out
    (the coarser grid made those down-samplings already); levels left with no down-sampling are dropped."""
    remove = [int(round(math.log2(s))) for s in scale]
    kernels, strides = [tuple(teacher.kernel_sizes[0])], [(1, 1, 1)]
    for kernel, stride in zip(teacher.kernel_sizes[1:], teacher.strides[1:]):
        new = list(stride)
        for a in range(3):
            if new[a] == 2 and remove[a] > 0:
                new[a], remove[a] = 1, remove[a] - 1
        if any(v > 1 for v in new):
            kernels.append(tuple(kernel))
            strides.append(tuple(new))
    return kernels, strides  # type: ignore[return-value]
