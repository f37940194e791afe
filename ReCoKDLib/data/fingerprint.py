"""Dataset fingerprint: the statistics that planning (:mod:`ReCoKDLib.data.planning`) is based on.

:func:`compute_fingerprint` reads every training case once and records

- per case: the voxel spacing, the shape, and the shape after cropping to the non-zero region
  (see :func:`~ReCoKDLib.data.cropping.crop_bbox`); all in numpy axis order (D, H, W);
- per channel: statistics of the *foreground* intensities (voxels with a label > 0), pooled over
  the cases from at most ``max_foreground_samples`` randomly drawn foreground voxels per case
  (mean, std, median, min, max, 0.5th and 99.5th percentiles);
- derived summaries: median / min / max shape after cropping and spacing per axis.

Sampling is seeded per case (from the seed and the case id), so the fingerprint is deterministic
and independent of the order in which cases are visited. A :class:`Fingerprint` round-trips through
JSON (:meth:`Fingerprint.save` / :meth:`Fingerprint.load`).
"""

from __future__ import annotations

import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from tqdm import tqdm

from ..errors import ReCoKDError
from ..utils.io import JSONDocument, read_json
from ..utils.labels import LabelSet
from .cropping import crop_bbox
from .datasets import DatasetInfo, dataset_fields, load_case

__all__ = [
    "FINGERPRINT_VERSION",
    "CaseFingerprint",
    "IntensityStats",
    "Fingerprint",
    "compute_fingerprint",
]

#: Bumped whenever the meaning of a fingerprint field changes; older files are refused.
FINGERPRINT_VERSION = 1

Triple = tuple[int, int, int]


# --------------------------------------------------------------------------------------------------
# small shared helpers (also used by planning and preprocessing)


def _read_json(path: Path, what: str) -> dict[str, Any]:
    return read_json(path, f"{what} file")


def _case_seed(seed: int, case_id: str) -> np.random.Generator:
    # seeded by case id, not position, so adding or reordering cases leaves the others' samples alone
    return np.random.default_rng([int(seed), zlib.crc32(case_id.encode("utf-8"))])


def _floats(values: Sequence[Any]) -> tuple[float, ...]:
    return tuple(float(v) for v in values)


def _ints(values: Sequence[Any]) -> tuple[int, ...]:
    return tuple(int(v) for v in values)


# --------------------------------------------------------------------------------------------------
# records


@dataclass(frozen=True)
class CaseFingerprint:
    """Geometry of one case, numpy axis order (D, H, W).

    Attributes:
        case_id: the case identifier.
        spacing: voxel size in mm.
        shape: the full volume's shape.
        shape_after_crop: the shape after cropping to the non-zero region.
    """

    case_id: str
    spacing: tuple[float, float, float]
    shape: Triple
    shape_after_crop: Triple

    def to_dict(self) -> dict[str, Any]:
        return {
            "case_id": self.case_id,
            "spacing": list(self.spacing),
            "shape": list(self.shape),
            "shape_after_crop": list(self.shape_after_crop),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CaseFingerprint":
        return cls(
            case_id=str(d["case_id"]),
            spacing=_floats(d["spacing"]),  # type: ignore[arg-type]
            shape=_ints(d["shape"]),  # type: ignore[arg-type]
            shape_after_crop=_ints(d["shape_after_crop"]),  # type: ignore[arg-type]
        )


@dataclass(frozen=True)
class IntensityStats:
    """Statistics of one channel's sampled foreground intensities, pooled over the cases.

    All values are ``None`` when the dataset has no foreground voxel (no labels at all).
    """

    num_samples: int
    mean: float | None = None
    std: float | None = None
    median: float | None = None
    min: float | None = None
    max: float | None = None
    percentile_00_5: float | None = None
    percentile_99_5: float | None = None

    @classmethod
    def of(cls, samples: np.ndarray) -> "IntensityStats":
        """Statistics of a 1D array of samples (float64 accumulation for a stable mean/std)."""
        if samples.size == 0:
            return cls(num_samples=0)
        s = samples.astype(np.float64, copy=False)
        p005, p50, p995 = np.percentile(s, [0.5, 50.0, 99.5])
        return cls(
            num_samples=int(s.size),
            mean=float(s.mean()),
            std=float(s.std()),
            median=float(p50),
            min=float(s.min()),
            max=float(s.max()),
            percentile_00_5=float(p005),
            percentile_99_5=float(p995),
        )

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "IntensityStats":
        def opt(key: str) -> float | None:
            v = d.get(key)
            return None if v is None else float(v)

        return cls(
            num_samples=int(d["num_samples"]),
            **{k: opt(k) for k in ("mean", "std", "median", "min", "max", "percentile_00_5", "percentile_99_5")},
        )


@dataclass(frozen=True)
class Fingerprint(JSONDocument):
    """What planning needs to know about a dataset.

    Attributes:
        dataset_name: ``dataset.json``'s name.
        channel_names: channel index -> name.
        labels: the dataset's :class:`~ReCoKDLib.utils.labels.LabelSet`.
        cases: per-case geometry, in the dataset's case order.
        foreground_intensity: per channel, statistics of the foreground intensities.
        max_foreground_samples: the per-case sample cap used.
        seed: the sampling seed used.
        version: :data:`FINGERPRINT_VERSION` of the code that wrote it.
    """

    dataset_name: str
    channel_names: dict[int, str]
    labels: LabelSet
    cases: tuple[CaseFingerprint, ...]
    foreground_intensity: tuple[IntensityStats, ...]
    max_foreground_samples: int = 10000
    seed: int = 0
    version: int = field(default=FINGERPRINT_VERSION)

    def __post_init__(self) -> None:
        if not isinstance(self.labels, LabelSet):
            object.__setattr__(self, "labels", LabelSet(self.labels, source=f"fingerprint of '{self.dataset_name}'"))
        if not self.cases:
            raise ReCoKDError(f"fingerprint of '{self.dataset_name}' has no cases; the dataset needs training cases")

    # -- summaries ----------------------------------------------------------------------------
    @property
    def spacings(self) -> np.ndarray:
        """(N, 3) float64 array of per-case spacings (D, H, W)."""
        return np.array([c.spacing for c in self.cases], dtype=np.float64)

    @property
    def shapes_after_crop(self) -> np.ndarray:
        """(N, 3) int64 array of per-case shapes after cropping (D, H, W)."""
        return np.array([c.shape_after_crop for c in self.cases], dtype=np.int64)

    @property
    def median_spacing(self) -> tuple[float, float, float]:
        return _floats(np.median(self.spacings, axis=0))  # type: ignore[return-value]

    @property
    def min_spacing(self) -> tuple[float, float, float]:
        return _floats(self.spacings.min(axis=0))  # type: ignore[return-value]

    @property
    def max_spacing(self) -> tuple[float, float, float]:
        return _floats(self.spacings.max(axis=0))  # type: ignore[return-value]

    @property
    def median_shape(self) -> tuple[float, float, float]:
        """Median shape after cropping; may be fractional (the median of an even count)."""
        return _floats(np.median(self.shapes_after_crop, axis=0))  # type: ignore[return-value]

    @property
    def min_shape(self) -> Triple:
        return _ints(self.shapes_after_crop.min(axis=0))  # type: ignore[return-value]

    @property
    def max_shape(self) -> Triple:
        return _ints(self.shapes_after_crop.max(axis=0))  # type: ignore[return-value]

    def summary(self) -> dict[str, Any]:
        """The derived summaries as a JSON-ready dict (written with the fingerprint for reading)."""
        return {
            "num_cases": len(self.cases),
            "median_spacing": list(self.median_spacing),
            "min_spacing": list(self.min_spacing),
            "max_spacing": list(self.max_spacing),
            "median_shape_after_crop": list(self.median_shape),
            "min_shape_after_crop": list(self.min_shape),
            "max_shape_after_crop": list(self.max_shape),
        }

    # -- serialisation ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            **dataset_fields(self.dataset_name, self.channel_names, self.labels),
            "max_foreground_samples": self.max_foreground_samples,
            "seed": self.seed,
            "summary": self.summary(),  # derived; ignored when reading
            "foreground_intensity": [s.to_dict() for s in self.foreground_intensity],
            "cases": [c.to_dict() for c in self.cases],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Fingerprint":
        version = d.get("version")
        if version != FINGERPRINT_VERSION:
            raise ReCoKDError(
                f"fingerprint version {version!r} is not the supported version {FINGERPRINT_VERSION}; "
                "compute the fingerprint again"
            )
        with cls.reading("fingerprint", "compute the fingerprint again"):
            return cls(
                dataset_name=str(d["dataset_name"]),
                channel_names={int(k): str(v) for k, v in d["channel_names"].items()},
                labels=LabelSet(d["labels"], source="fingerprint"),
                cases=tuple(CaseFingerprint.from_dict(c) for c in d["cases"]),
                foreground_intensity=tuple(IntensityStats.from_dict(s) for s in d["foreground_intensity"]),
                max_foreground_samples=int(d.get("max_foreground_samples", 10000)),
                seed=int(d.get("seed", 0)),
                version=int(version),
            )

    @classmethod
    def load(cls, path: str | Path) -> "Fingerprint":
        """Read a fingerprint written by :meth:`save`; raises :class:`ReCoKDError` on any problem."""
        return cls.from_dict(_read_json(Path(path), "fingerprint"))


# --------------------------------------------------------------------------------------------------
# computation


def _warn(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def compute_fingerprint(
    dataset: DatasetInfo,
    progress: bool = True,
    max_foreground_samples: int = 10000,
    seed: int = 0,
    warn: Callable[[str], None] | None = _warn,
) -> Fingerprint:
    """Read every training case of ``dataset`` and collect its :class:`Fingerprint`.

    Args:
        dataset: an opened dataset (:func:`~ReCoKDLib.data.datasets.open_dataset`).
        progress: show a tqdm progress bar on stderr.
        max_foreground_samples: at most this many foreground voxels per case enter the intensity
            statistics (drawn without replacement; all of them when a case has fewer).
        seed: sampling seed; the same seed gives the same fingerprint.
        warn: receives one ``warning: ...`` line when some (not all) label maps hold only background
            (default: printed to stderr; ``None``: silent).

    Raises:
        ReCoKDError: the dataset has no training cases, a case cannot be read, or every training
            label map holds only background (a network would learn to predict nothing).
    """
    if not dataset.training:
        raise ReCoKDError(f"dataset '{dataset.name}' ({dataset.root}) has no training cases to fingerprint")
    if max_foreground_samples < 1:
        raise ReCoKDError(f"max_foreground_samples must be >= 1, got {max_foreground_samples}")
    ignore = dataset.labels.ignore_label
    cases: list[CaseFingerprint] = []
    samples: list[np.ndarray] = []  # per case, (C, n) sampled foreground intensities
    labelled, empty = 0, []  # label maps read, and the cases whose label map is background only
    for record in tqdm(dataset.training, desc=f"fingerprint {dataset.name}", disable=not progress, leave=False):
        case = load_case(record, dataset)
        box = crop_bbox(case.image, case.label)
        cases.append(
            CaseFingerprint(
                case_id=case.case_id,
                spacing=_floats(case.geometry.spacing_dhw),  # type: ignore[arg-type]
                shape=_ints(case.image.shape[1:]),  # type: ignore[arg-type]
                shape_after_crop=tuple(hi - lo for lo, hi in box),  # type: ignore[arg-type]
            )
        )
        if case.label is None:
            continue
        foreground = case.label > 0
        if ignore is not None:
            foreground &= case.label != ignore
        flat = np.flatnonzero(foreground)
        labelled += 1
        if flat.size == 0:
            empty.append(case.case_id)
        if flat.size > max_foreground_samples:
            flat = np.sort(_case_seed(seed, case.case_id).choice(flat, size=max_foreground_samples, replace=False))
        samples.append(case.image.reshape(case.image.shape[0], -1)[:, flat])
    if labelled and len(empty) == labelled:
        raise ReCoKDError(f"dataset '{dataset.name}' ({dataset.root}): every training label map holds only "
                          "background (0), so there is nothing to segment; check that the labels (labelsTr) are the "
                          "annotated ones")
    if empty and warn is not None:
        shown = ", ".join(empty[:5]) + (f", ... ({len(empty) - 5} more)" if len(empty) > 5 else "")
        warn(f"warning: dataset '{dataset.name}': {len(empty)} of {labelled} training label maps hold only background "
             f"({shown}); they are kept as background-only examples")
    num_channels = dataset.num_channels
    pooled = np.concatenate(samples, axis=1) if samples else np.zeros((num_channels, 0), np.float32)
    return Fingerprint(
        dataset_name=dataset.name,
        channel_names=dict(dataset.channel_names),
        labels=dataset.labels,
        cases=tuple(cases),
        foreground_intensity=tuple(IntensityStats.of(pooled[c]) for c in range(num_channels)),
        max_foreground_samples=int(max_foreground_samples),
        seed=int(seed),
    )
