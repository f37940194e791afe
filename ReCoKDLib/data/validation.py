"""Checking a dataset before training: every problem of every file, reported at once.

:func:`validate_dataset` returns one :class:`Problem` per file and problem; :func:`require_valid`
raises a :class:`DatasetValidationError` (a :class:`~ReCoKDLib.errors.ReCoKDError`) listing them.

Checked per case: missing channel or label files, unreadable or corrupt (also truncated NIfTI)
files, 2D images, channel counts (MSD 4D images against ``modality``), image/label size and
spacing/origin/direction agreement between channels and between image and label, label values not
declared in ``dataset.json``, and NaN/Inf voxels. Geometry comes from the file headers
(``ImageFileReader.ReadImageInformation``); voxel data is read for the label-value, NaN and
integrity checks. A NIfTI file is also read directly (without ITK), because ITK zero-fills the data
missing from a truncated file and replaces NaN/Inf floats by 0, so neither shows through SimpleITK.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import SimpleITK as sitk
from tqdm import tqdm

from ..errors import ReCoKDError
from .datasets import (
    IMAGE_FILE_ENDINGS,
    CaseRecord,
    DatasetInfo,
    ImageHeader,
    _CHANNEL_SUFFIX,
    _read_header,
    _read_image,
    _ReadFailure,
    NiftiScan,
    scan_nifti,
    split_file_ending,
)

__all__ = ["Problem", "DatasetValidationError", "validate_case", "validate_dataset", "require_valid"]

_READ_FIX = "check the file is a valid NIfTI/NRRD/MHA image (re-export or re-copy it)"
_MAX_LISTED_VALUES = 12


@dataclass(frozen=True)
class Problem:
    """One problem of one file.

    Attributes:
        file: the file at fault (or ``dataset.json`` / a folder for dataset-level problems).
        message: one line naming the problem and the fix.
    """

    file: Path
    message: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "file", Path(self.file))
        object.__setattr__(self, "message", " ".join(str(self.message).split()))

    def __str__(self) -> str:
        return f"{self.file}: {self.message}"


class DatasetValidationError(ReCoKDError):
    """A dataset failed validation; the message gives the count, then one problem per line.

    Attributes:
        problems: the :class:`Problem` list.
    """

    def __init__(self, dataset: DatasetInfo, problems: Sequence[Problem]):
        self.problems = list(problems)
        n = len(self.problems)
        head = (
            f"dataset '{dataset.name}' ({dataset.root}) has {n} problem{'s' if n != 1 else ''}; "
            "fix them and validate again:"
        )
        # bypass ReCoKDError's whitespace folding on purpose: one problem per line
        ValueError.__init__(self, "\n".join([head] + [f"  {p}" for p in self.problems]))


# --------------------------------------------------------------------------------------------------
# helpers


def _fmt(values: Iterable[float]) -> str:
    return "(" + ", ".join(f"{v + 0.0:g}" for v in values) + ")"  # + 0.0 turns -0 into 0


def _fmt_size(size: Iterable[int]) -> str:
    return "x".join(str(s) for s in size)


def _fmt_values(values: Sequence[int | float]) -> str:
    shown = ", ".join(f"{v:g}" for v in values[:_MAX_LISTED_VALUES])
    if len(values) > _MAX_LISTED_VALUES:
        shown += f", ... ({len(values)} values in all)"
    return shown


def _label_values(arr: np.ndarray) -> np.ndarray:
    """Distinct values of a label array (fast path for small non-negative integers)."""
    flat = arr.ravel()
    if flat.size == 0:
        return np.empty(0, dtype=arr.dtype)
    if np.issubdtype(arr.dtype, np.integer):
        lo, hi = int(flat.min()), int(flat.max())
        if lo >= 0 and hi < (1 << 16):
            if flat.dtype == np.uint64:  # bincount refuses uint64
                flat = flat.astype(np.int64)
            return np.flatnonzero(np.bincount(flat, minlength=hi + 1))
    return np.unique(flat)


class _CaseChecker:
    """Collects the problems of one case."""

    def __init__(self, record: CaseRecord, dataset: DatasetInfo, tolerance: float):
        self.record = record
        self.dataset = dataset
        self.tolerance = tolerance
        self.problems: list[Problem] = []

    def add(self, file: Path, message: str) -> None:
        self.problems.append(Problem(file, message))

    # -- existence --------------------------------------------------------------------------------

    def _channel_label(self, index: int) -> str:
        name = self.dataset.channel_names.get(index)
        return f"channel {index:04d}" + (f" ({name})" if name else "")

    def check_existence(self) -> tuple[list[Path], Path | None]:
        rec, case = self.record, self.record.case_id
        present = [f for f in rec.image_files if f.is_file()]
        label_present = rec.label_file is not None and rec.label_file.is_file()
        for i, f in enumerate(rec.image_files):
            if f.is_file():
                continue
            if rec.layout == "msd":
                self.add(f, f"image of case '{case}' listed in dataset.json does not exist; add it or remove the entry")
            elif not present and label_present:
                self.add(
                    f,
                    f"missing image {self._channel_label(i)} of case '{case}', whose label exists; "
                    "add the image or remove the label",
                )
            else:
                self.add(
                    f,
                    f"missing {self._channel_label(i)} of case '{case}'; add this file or remove the case's other files",
                )
        if rec.label_file is not None and not label_present:
            self.add(
                rec.label_file,
                f"missing label of case '{case}'; add the label map or remove the case's images",
            )
        return present, rec.label_file if label_present else None

    # -- headers ----------------------------------------------------------------------------------

    def header(self, path: Path) -> ImageHeader | None:
        try:
            return _read_header(path)
        except _ReadFailure as failure:
            self.add(path, f"unreadable: {failure.reason}; {_READ_FIX}")
            return None

    def check_shape(self, h: ImageHeader, is_label: bool) -> bool:
        """Dimensionality and channel checks; False when the file must not enter geometry checks."""
        ok = True
        if h.dimension > 4:
            self.add(h.path, f"has {h.dimension} dimensions (size {_fmt_size(h.size)}); supply a 3D volume")
            return False
        if h.is_2d:
            self.add(
                h.path,
                f"is 2D (size {_fmt_size(h.size)}); ReCoKD segments 3D volumes, supply a 3D image "
                "with at least 2 voxels along each axis",
            )
            ok = False
        if is_label:
            if h.num_channels != 1:
                self.add(
                    h.path,
                    f"label map holds {h.num_channels} channels (size {_fmt_size(h.size)}, "
                    f"{h.components} components); supply one 3D integer label map",
                )
                ok = False
        elif self.record.layout == "msd" and len(self.record.image_files) == 1:
            expected = self.dataset.num_channels
            if h.num_channels != expected:
                names = ", ".join(self.dataset.channel_names.values())
                self.add(
                    h.path,
                    f"holds {h.num_channels} channel{'s' if h.num_channels != 1 else ''} (size {_fmt_size(h.size)}) "
                    f"but dataset.json 'modality' lists {expected} ({names}); "
                    "fix the image's 4th dimension or 'modality'",
                )
                ok = False
        elif h.num_channels != 1:
            self.add(
                h.path,
                f"holds {h.num_channels} channels (size {_fmt_size(h.size)}, {h.components} components); "
                "the nnU-Net layout wants one 3D file per channel, split it into <case>_0000, <case>_0001, ...",
            )
            ok = False
        return ok

    def compare(self, h: ImageHeader, ref: ImageHeader) -> None:
        tol = self.tolerance
        what = "label" if h.path == self.record.label_file else "image"
        fix = "resample it onto the same voxel grid" if what == "label" else "resample the channels onto one grid"
        if h.spatial_size != ref.spatial_size:
            self.add(
                h.path,
                f"size {_fmt_size(h.spatial_size)} differs from {ref.path.name}'s "
                f"{_fmt_size(ref.spatial_size)}; {fix}",
            )
        g, r = h.geometry, ref.geometry
        if any(abs(a - b) > tol * max(abs(a), abs(b)) for a, b in zip(g.spacing, r.spacing)):
            self.add(
                h.path,
                f"spacing {_fmt(g.spacing)} differs from {ref.path.name}'s {_fmt(r.spacing)} by more than "
                f"{tol:g} (relative); {fix} or correct the header",
            )
        if any(abs(a - b) > tol for a, b in zip(g.origin, r.origin)):
            self.add(
                h.path,
                f"origin {_fmt(g.origin)} mm differs from {ref.path.name}'s {_fmt(r.origin)} by more than "
                f"{tol:g} mm; {fix} or correct the header",
            )
        if len(g.direction) != len(r.direction) or any(
            abs(a - b) > tol for a, b in zip(g.direction, r.direction)
        ):
            self.add(
                h.path,
                f"direction {_fmt(g.direction)} differs from {ref.path.name}'s {_fmt(r.direction)} by more than "
                f"{tol:g}; reorient it to match or correct the header",
            )

    # -- voxels -----------------------------------------------------------------------------------

    def read_voxels(self, path: Path) -> tuple[sitk.Image, NiftiScan | None] | None:
        """The image read by SimpleITK and, for NIfTI, the direct scan; None (problem added) on failure."""
        try:
            image = _read_image(path)
        except _ReadFailure as failure:
            self.add(path, f"unreadable: {failure.reason}; {_READ_FIX}")
            return None
        scan = scan_nifti(path)
        if scan is not None and scan.error is not None:
            self.add(path, f"{scan.error}; {_READ_FIX}")
            return None
        return image, scan

    @staticmethod
    def _non_finite(image: sitk.Image, scan: NiftiScan | None) -> tuple[int, int]:
        if scan is not None:  # SimpleITK has already turned a NIfTI's NaN/Inf into 0
            return scan.n_nan, scan.n_inf
        arr = sitk.GetArrayViewFromImage(image)
        if not np.issubdtype(arr.dtype, np.floating) or np.isfinite(arr).all():
            return 0, 0
        return int(np.isnan(arr).sum()), int(np.isinf(arr).sum())

    def check_image_voxels(self, path: Path) -> None:
        read = self.read_voxels(path)
        if read is None:
            return
        n_nan, n_inf = self._non_finite(*read)
        if n_nan or n_inf:
            parts = [f"{n} {kind}" for n, kind in ((n_nan, "NaN"), (n_inf, "Inf")) if n]
            self.add(
                path,
                f"contains {' and '.join(parts)} voxel{'s' if n_nan + n_inf != 1 else ''}; "
                "replace them with finite values (e.g. 0) before training",
            )

    def check_label_voxels(self, path: Path) -> None:
        read = self.read_voxels(path)
        if read is None:
            return
        image, scan = read
        if any(self._non_finite(image, scan)):
            self.add(path, "label map contains NaN/Inf values; save it with integer label values")
            return
        arr = sitk.GetArrayViewFromImage(image)
        if np.issubdtype(arr.dtype, np.floating) and not np.array_equal(arr, np.round(arr)):
            bad = arr[arr != np.round(arr)]
            self.add(
                path,
                f"label map holds non-integer values (e.g. {float(bad.flat[0]):g}); "
                "save it with integer label values (nearest-neighbour if it was resampled)",
            )
            return
        values = _label_values(arr)
        declared = set(self.dataset.labels.values())
        undeclared = [v.item() for v in values if v.item() not in declared]
        if undeclared:
            self.add(
                path,
                f"holds label value{'s' if len(undeclared) != 1 else ''} {_fmt_values(undeclared)} not declared "
                f"in dataset.json 'labels' (declared: {_fmt_values(sorted(declared))}); "
                "declare them in 'labels' or fix the label map",
            )

    # -- all --------------------------------------------------------------------------------------

    def run(self) -> list[Problem]:
        images, label = self.check_existence()
        headers = {p: self.header(p) for p in images}
        label_header = self.header(label) if label is not None else None

        usable = [h for h in headers.values() if h is not None and self.check_shape(h, is_label=False)]
        label_usable = label_header is not None and self.check_shape(label_header, is_label=True)
        if usable:
            ref = usable[0]
            for h in usable[1:]:
                self.compare(h, ref)
            if label_usable:
                assert label_header is not None
                self.compare(label_header, ref)

        for p, h in headers.items():
            if h is not None:
                self.check_image_voxels(p)
        if label_header is not None and label is not None:
            self.check_label_voxels(label)
        return self.problems


# --------------------------------------------------------------------------------------------------
# public API


def validate_case(record: CaseRecord, dataset: DatasetInfo, *, tolerance: float = 1e-3) -> list[Problem]:
    """All problems of one case (see :func:`validate_dataset`)."""
    return _CaseChecker(record, dataset, tolerance).run()


def _unexpected_file_problem(path: Path, dataset: DatasetInfo) -> Problem:
    ending = dataset.file_ending
    stem, file_ending = split_file_ending(path.name)
    if not path.name.endswith(ending) and file_ending.lower() in IMAGE_FILE_ENDINGS:
        return Problem(
            path,
            f"file ending '{file_ending}' differs from dataset.json's file_ending '{ending}'; "
            "convert or rename the file, or fix file_ending",
        )
    m = _CHANNEL_SUFFIX.match(path.name[: -len(ending)] if path.name.endswith(ending) else stem)
    if m is not None:
        return Problem(
            path,
            f"channel {m.group('channel')} is beyond the {dataset.num_channels} channel"
            f"{'s' if dataset.num_channels != 1 else ''} dataset.json declares "
            f"({', '.join(dataset.channel_names.values())}); remove the file or add the channel to channel_names",
        )
    return Problem(
        path,
        f"file name fits no case: the nnU-Net layout names images <case>_<channel:04d>{ending}; rename or remove it",
    )


def _dataset_problems(dataset: DatasetInfo) -> list[Problem]:
    problems: list[Problem] = []
    json_path = dataset.root / "dataset.json"
    if not dataset.training:
        where = dataset.root / "imagesTr" if dataset.layout == "nnunet" else json_path
        problems.append(Problem(where, "no training cases found; add training images and labels"))
    declared = dataset.num_training_declared
    if declared is not None and declared != len(dataset.training):
        problems.append(
            Problem(
                json_path,
                f"numTraining is {declared} but {len(dataset.training)} training cases were found; "
                "fix numTraining or add the missing cases",
            )
        )
    for split, records in (("training", dataset.training), ("test", dataset.test)):
        seen: set[str] = set()
        for rec in records:
            if rec.case_id in seen:
                problems.append(
                    Problem(json_path, f"case id '{rec.case_id}' appears twice in {split}; give every case its own files")
                )
            seen.add(rec.case_id)
    problems.extend(_unexpected_file_problem(p, dataset) for p in dataset.unexpected_files)
    return problems


def validate_dataset(
    dataset: DatasetInfo, *, check_test: bool = True, progress: bool = True, tolerance: float = 1e-3
) -> list[Problem]:
    """Check every case of a dataset and return all problems found (empty list: the dataset is fine).

    Args:
        dataset: from :func:`~ReCoKDLib.data.datasets.open_dataset`.
        check_test: also check the test cases (``imagesTs``/``labelsTs`` or MSD ``test``).
        progress: show a tqdm progress bar on stderr.
        tolerance: allowed geometry difference between the channels and the label of a case:
            relative for spacing, absolute (mm) for origin, absolute for direction cosines.

    Returns:
        One :class:`Problem` per file and problem: dataset-level problems first, then per case.
    """
    if tolerance < 0:
        raise ReCoKDError(f"tolerance must be >= 0, got {tolerance}; pass e.g. tolerance=1e-3")
    problems = _dataset_problems(dataset)
    records = list(dataset.training) + (list(dataset.test) if check_test else [])
    for record in tqdm(
        records, desc=f"validating {dataset.name}", unit="case", disable=not progress, leave=False
    ):
        problems.extend(validate_case(record, dataset, tolerance=tolerance))
    return problems


def require_valid(dataset: DatasetInfo, **kw) -> None:
    """Validate ``dataset`` (keywords as :func:`validate_dataset`) and raise if anything is wrong.

    Raises:
        DatasetValidationError: a :class:`~ReCoKDLib.errors.ReCoKDError` whose message gives the
            number of problems and then every problem, one per line.
    """
    problems = validate_dataset(dataset, **kw)
    if problems:
        raise DatasetValidationError(dataset, problems)
