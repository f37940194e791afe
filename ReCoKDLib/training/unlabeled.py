"""Distillation on scans without labels: the teacher labels them (issue 29).

A clinic has a teacher and many scans of its own, few or none of them labelled. There the teacher is the
annotator it lacks. Each unlabelled scan is preprocessed with the teacher's plan (an nnU-Net teacher's
included), the frozen teacher predicts it once, whole (a Gaussian-blended sliding window in plan space,
as at inference), and the arg-max is the scan's target, cached per teacher (by its weights' sha256),
plan and case. The scans then join the training stream as pseudo-labelled cases, so the segmentation
loss, foreground oversampling and ReCo-KD's class-aware MS-SARD masks all use the teacher's labels where
no label exists, and every KD method works on them unchanged. They never enter validation.

Sources of unlabelled scans (``recokd distill --unlabeled DIR [DIR ...]``):

- a folder of images, one file per case (``scan.nii.gz``) or one per channel (``scan_0000.nii.gz``,
  ``scan_0001.nii.gz``), checked like a dataset's images (geometry, channels, NaN; one line per bad file);
- a dataset folder (``dataset.json``): its images, training and test alike; its labels are not read.

``--labeled-cases FILE`` keeps the labels of the listed training cases only: the split's other training
cases are used as unlabelled scans (a label-scarce study on a fully labelled dataset). Their labels are
never read for training.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data.datasets import CaseRecord, DatasetInfo, group_cases, open_dataset
from ..data.preprocessing import PreprocessedCase
from ..data.validation import Problem, validate_case
from ..errors import ReCoKDError
from ..inference.sliding_window import predict_logits
from ..utils.io import atomic_write

__all__ = ["UNLABELED_PREFIX", "TeacherTargets", "unlabeled_records", "teacher_targets", "split_labeled",
           "UnlabeledValidationError"]

#: the case ids of unlabelled scans start with this (they never clash with a dataset's ids)
UNLABELED_PREFIX = "unlabeled-"


class UnlabeledValidationError(ReCoKDError):
    """Unlabelled scans that cannot be used: the count, then one problem per line (file and fix)."""

    def __init__(self, problems: Sequence[Problem]):
        self.problems = list(problems)
        n = len(self.problems)
        head = f"{n} problem{'s' if n != 1 else ''} in the unlabeled scans; fix or remove these files:"
        ValueError.__init__(self, "\n".join([head] + [f"  {p}" for p in self.problems]))  # one per line, on purpose


def _tag(folder: Path) -> str:
    """A short stable tag of a folder, so that equal file names in two folders are two cases."""
    return hashlib.sha256(str(folder.resolve()).encode("utf-8")).hexdigest()[:8]


def unlabeled_records(folders: Sequence[str | Path], dataset: DatasetInfo, check: bool = True,
                      progress: bool = False) -> list[CaseRecord]:
    """The unlabelled scans of ``folders`` as label-less case records of ``dataset``'s channels.

    Raises:
        ReCoKDError: a folder is missing or holds no images; :class:`UnlabeledValidationError` (``check``)
            listing every bad file: a channel count other than the dataset's, 2D or 5D images, channels on
            different grids, NaN or infinite voxels, unreadable files.
    """
    records: list[CaseRecord] = []
    for folder in map(Path, folders):
        if not folder.is_dir():
            raise ReCoKDError(f"unlabeled scans folder {folder} does not exist; give a folder of images")
        tag = _tag(folder)
        if (folder / "dataset.json").is_file():
            found = open_dataset(folder)
            if found.num_channels != dataset.num_channels:
                raise ReCoKDError(f"{folder} has {found.num_channels} channel(s) but {dataset.name} has "
                                  f"{dataset.num_channels}; give scans of the teacher's channels")
            cases = [(r.case_id, r.image_files, r.layout) for r in (*found.training, *found.test)]
        else:
            cases = [(case, tuple(paths), "nnunet") for case, paths in group_cases(folder).items()]
        if not cases:
            raise ReCoKDError(f"{folder} holds no image files (.nii.gz, .nrrd, .mha, ...); give a folder of scans")
        records += [CaseRecord(f"{UNLABELED_PREFIX}{tag}-{case}", tuple(files), None, layout) for case, files, layout in cases]
    if check:
        problems: list[Problem] = []
        for record in tqdm(records, desc="checking unlabeled scans", unit="case", disable=not progress, leave=False):
            if record.layout == "nnunet" and len(record.image_files) != dataset.num_channels:
                problems.append(Problem(record.image_files[0], (
                    f"case has {len(record.image_files)} channel file(s) but {dataset.name} has {dataset.num_channels} "
                    f"({', '.join(dataset.channel_names.values())}); name them <case>_0000, <case>_0001, ...")))
                continue
            problems += validate_case(record, dataset)
        if problems:
            raise UnlabeledValidationError(problems)
    return records


def split_labeled(train_ids: Sequence[str], labeled_file: str | Path | None) -> tuple[list[str], list[str]]:
    """(labelled, hidden) training case ids: with ``labeled_file``, the listed ones keep their labels and the
    split's others are used without theirs; without it, every training case is labelled."""
    if labeled_file is None:
        return list(train_ids), []
    from .splits import read_case_list

    wanted = read_case_list(labeled_file)
    unknown = [w for w in wanted if w not in set(train_ids)]
    if unknown:
        raise ReCoKDError(f"--labeled-cases {labeled_file} names {', '.join(unknown[:5])}, which are not training cases of "
                          "this split (validation cases cannot be labelled training cases); fix the list")
    if not wanted:
        raise ReCoKDError(f"--labeled-cases {labeled_file} names no case; list at least one labelled case")
    keep = set(wanted)
    return [i for i in train_ids if i in keep], [i for i in train_ids if i not in keep]


@dataclass
class TeacherTargets:
    """The teacher's labels of unlabelled cases, in plan space: ``labels[case]`` (D, H, W) uint8 and
    ``confidence[case]`` (D, H, W) uint8, the teacher's top softmax probability × 255."""

    labels: dict[str, np.ndarray]
    confidence: dict[str, np.ndarray]
    folder: Path


def teacher_targets(teacher: torch.nn.Module, cases: Sequence[PreprocessedCase], patch_size: Sequence[int],
                    folder: str | Path, device: torch.device | str = "cpu", progress: bool = True) -> TeacherTargets:
    """The teacher's arg-max of each case (whole volume, Gaussian-blended sliding window, overlap 0.5),
    computed once per case and cached in ``folder`` (name it by teacher and plan: the targets are theirs).

    Args:
        teacher: (B, C, d, h, w) -> logits (B, K, d, h, w).
        cases: preprocessed cases (their ``label``, if any, is never read).
        patch_size: the sliding window (the teacher's training patch).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    labels, confidence = {}, {}
    todo = [c for c in cases if not (folder / f"{c.case_id}.npz").is_file()]
    bar = tqdm(total=len(todo), desc="teacher labels the unlabeled scans", unit="case",
               disable=not progress or not todo, leave=False)
    try:
        for case in cases:
            path = folder / f"{case.case_id}.npz"
            if case in todo:
                with torch.no_grad():
                    logits = predict_logits(teacher, torch.from_numpy(np.ascontiguousarray(case.image)), patch_size,
                                            overlap=0.5, device=device)
                    probs = torch.softmax(logits, dim=0)
                    top, label = probs.max(dim=0)
                arrays = {"label": label.numpy().astype(np.uint8),
                          "confidence": np.round(top.numpy() * 255).astype(np.uint8)}

                def write(tmp: Path, arrays=arrays) -> None:
                    with open(tmp, "wb") as f:
                        np.savez_compressed(f, **arrays)

                atomic_write(path, write)
                bar.update()
            try:
                with np.load(path, allow_pickle=False) as data:
                    labels[case.case_id], confidence[case.case_id] = data["label"], data["confidence"]
            except (OSError, ValueError, KeyError) as exc:
                raise ReCoKDError(f"cached teacher labels {path} are unreadable ({exc}); delete the file and run again") from None
            if labels[case.case_id].shape != case.image.shape[1:]:
                raise ReCoKDError(f"cached teacher labels {path} do not fit case {case.case_id} "
                                  f"({labels[case.case_id].shape} vs {case.image.shape[1:]}); delete the file and run again")
    finally:
        bar.close()
    return TeacherTargets(labels, confidence, folder)


def case_fractions(num_labeled: int, num_unlabeled: int, unlabeled_fraction: float | None) -> list[float] | None:
    """How often each case is drawn: labelled cases first. ``unlabeled_fraction`` is the share of patches
    drawn from unlabelled cases (``None``: every case alike). ``None`` when there is nothing to weigh."""
    if not num_unlabeled or unlabeled_fraction is None:
        return None
    if not num_labeled:
        return [1.0 / num_unlabeled] * num_unlabeled
    f = float(unlabeled_fraction)
    if not (0.0 <= f <= 1.0) or math.isnan(f):
        raise ReCoKDError(f"--unlabeled-fraction must be in [0, 1], got {unlabeled_fraction}")
    return [(1 - f) / num_labeled] * num_labeled + [f / num_unlabeled] * num_unlabeled
