"""Segmentation quality per class in physical units (MONAI metrics): Dice, HD95 and normalised
surface Dice (NSD) at a tolerance in mm.

Conventions for a class absent from a case:

- absent from both prediction and reference: nothing to score, every metric is NaN (left out of means);
- present in only one of them: Dice 0, NSD 0, HD95 NaN (undefined; counted by ``hd95_undefined``).
"""

from __future__ import annotations

import csv
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance, compute_surface_dice
from monai.networks.utils import one_hot

from ..errors import ReCoKDError
from ..utils.geometry import ImageGeometry
from ..utils.io import read_json
from ..utils.labels import LabelSet

__all__ = ["METRICS", "CaseScores", "FolderEvaluation", "dice_per_class", "read_label_map", "score_case", "summarise", "evaluate_folders", "write_csv", "format_table"]

METRICS = ("dice", "hd95", "nsd")


@dataclass
class CaseScores:
    """Scores of one case: ``scores[metric][class_name]`` (floats, NaN where undefined)."""

    case_id: str
    scores: dict[str, dict[str, float]] = field(default_factory=dict)


def _one_hot(labels: torch.Tensor | np.ndarray, num_classes: int) -> torch.Tensor:
    """(D, H, W) integer labels -> (1, K, D, H, W) one-hot."""
    tensor = torch.from_numpy(labels.astype(np.int64)) if isinstance(labels, np.ndarray) else labels.long()
    return one_hot(tensor[None, None], num_classes)


def dice_per_class(prediction: torch.Tensor | np.ndarray, reference: torch.Tensor | np.ndarray,
                   num_classes: int) -> np.ndarray:
    """Dice of each foreground class: the one Dice of ReCoKD (training's validation, ``recokd evaluate``,
    the benchmarks and the study all call it).

    ``Dice_k = 2 |P_k ∩ R_k| / (|P_k| + |R_k|)`` (MONAI ``compute_dice``) for the voxels ``P_k`` / ``R_k``
    labelled ``k`` in the prediction / reference: 0 when the class is in only one of them, NaN when it
    is in neither (nothing to score; left out of means).

    Args:
        prediction, reference: integer label maps (D, H, W) on the same grid (torch or numpy).
        num_classes: K, background included; values must be below K.

    Returns:
        (K − 1,) float64.
    """
    pred, ref = _one_hot(prediction, num_classes), _one_hot(reference, num_classes)
    dice = compute_dice(pred, ref, include_background=False, ignore_empty=False)[0].double()
    empty = (ref[0, 1:].flatten(1).sum(1) == 0) & (pred[0, 1:].flatten(1).sum(1) == 0)
    dice[empty] = float("nan")
    return dice.numpy()


def score_case(
    prediction: np.ndarray,
    reference: np.ndarray,
    spacing: Sequence[float],
    class_names: Sequence[str],
    tolerance_mm: float = 2.0,
    case_id: str = "case",
) -> CaseScores:
    """Dice, HD95 (mm) and NSD at ``tolerance_mm`` of each foreground class.

    Args:
        prediction, reference: integer label maps (D, H, W) on the same grid.
        spacing: voxel size (D, H, W) in mm.
        class_names: names indexed by label value (index 0 = background, not scored).
    """
    if prediction.shape != reference.shape:
        raise ReCoKDError(f"case {case_id!r}: prediction shape {prediction.shape} differs from reference {reference.shape}")
    k = len(class_names)
    top = int(max(prediction.max(initial=0), reference.max(initial=0)))
    if top >= k:
        raise ReCoKDError(f"case {case_id!r} has label value {top} but only {k} classes are known; pass the dataset's labels")
    pred, ref = _one_hot(prediction, k), _one_hot(reference, k)
    sp = [float(s) for s in spacing]
    dice = dice_per_class(prediction, reference, k)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI warns about empty classes; handled below
        hd = compute_hausdorff_distance(pred, ref, include_background=False, percentile=95, spacing=sp)[0].double().numpy()
        nsd = compute_surface_dice(pred, ref, class_thresholds=[float(tolerance_mm)] * (k - 1),
                                   include_background=False, spacing=sp)[0].double().numpy()
    in_pred = pred[0, 1:].flatten(1).any(1).numpy()
    in_ref = ref[0, 1:].flatten(1).any(1).numpy()
    out = CaseScores(case_id, {m: {} for m in METRICS})
    for i, name in enumerate(class_names[1:]):
        if not in_pred[i] and not in_ref[i]:
            h = n = math.nan
        elif in_pred[i] != in_ref[i]:
            h, n = math.nan, 0.0
        else:
            h, n = float(hd[i]), float(nsd[i])
        out.scores["dice"][name], out.scores["hd95"][name], out.scores["nsd"][name] = float(dice[i]), h, n
    return out


def summarise(cases: Sequence[CaseScores]) -> dict[str, dict[str, float]]:
    """Mean over cases of each metric and class (NaNs left out), plus ``"mean"`` over classes."""
    if not cases:
        return {m: {} for m in METRICS}
    names = list(cases[0].scores["dice"])
    out: dict[str, dict[str, float]] = {}
    for m in METRICS:
        per_class = {}
        for name in names:
            values = [c.scores[m][name] for c in cases if not math.isnan(c.scores[m][name])]
            per_class[name] = float(np.mean(values)) if values else math.nan
        finite = [v for v in per_class.values() if not math.isnan(v)]
        per_class["mean"] = float(np.mean(finite)) if finite else math.nan
        out[m] = per_class
    return out


def _case_files(folder: Path) -> dict[str, Path]:
    from ..data.datasets import IMAGE_FILE_ENDINGS, split_file_ending

    if not folder.is_dir():
        raise ReCoKDError(f"{folder} is not a folder; pass a folder of label images")
    out = {}
    for p in sorted(folder.iterdir()):
        stem, ending = split_file_ending(p.name)
        if p.is_file() and not p.name.startswith(".") and ending.lower() in IMAGE_FILE_ENDINGS:
            out[stem] = p
    return out


def read_label_map(path: str | Path) -> tuple[np.ndarray, ImageGeometry]:
    """A reference or predicted label map as (D, H, W) int64 and its geometry (``geometry.spacing_dhw``
    is what :func:`score_case` takes). Raises :class:`ReCoKDError` naming the file when it is not a 3D
    map of non-negative integers."""
    import SimpleITK as sitk

    from ..data.datasets import read_image

    image = read_image(path, verify=True)  # a truncated NIfTI is an error, not zero-filled labels to score
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise ReCoKDError(f"{path} is not a 3D label map; supply one integer per voxel")
    array = sitk.GetArrayFromImage(image)
    if np.issubdtype(array.dtype, np.floating):
        if not np.all(np.isfinite(array)) or not np.all(array == np.round(array)):
            raise ReCoKDError(f"{path} has non-integer voxels; it is not a label map")
    if array.size and array.min() < 0:
        raise ReCoKDError(f"{path} has negative label values; it is not a label map")
    return array.astype(np.int64), ImageGeometry.of(image)


@dataclass
class FolderEvaluation:
    """Result of :func:`evaluate_folders`.

    Attributes:
        cases: per-case scores.
        summary: :func:`summarise` of ``cases``.
        class_names: the foreground class names scored.
        missing: reference cases without a prediction (not scored).
    """

    cases: list[CaseScores]
    summary: dict[str, dict[str, float]]
    class_names: list[str]
    missing: list[str]


def evaluate_folders(
    pred_dir: str | Path,
    gt_dir: str | Path,
    labels: Mapping[str, int] | None = None,
    tolerance_mm: float = 2.0,
    postprocess: str = "none",
) -> FolderEvaluation:
    """Score every prediction in ``pred_dir`` against the same-named reference in ``gt_dir``.

    Labels default to ``dataset.json`` in ``gt_dir`` or its parent, else ``label_<v>`` for the values
    seen. Spacing is the reference's (physical units, mm). ``postprocess`` applies a
    :mod:`~ReCoKDLib.inference.postprocessing` mode to each prediction before scoring (to choose a
    model's post-processing on held-out predictions without predicting again); the files are not changed.
    """
    from ..inference.postprocessing import postprocess_labels

    pred_dir, gt_dir = Path(pred_dir), Path(gt_dir)
    preds, refs = _case_files(pred_dir), _case_files(gt_dir)
    common = sorted(set(preds) & set(refs))
    if not common:
        raise ReCoKDError(f"no prediction in {pred_dir} has a same-named reference in {gt_dir}; name them alike (case.nii.gz)")
    missing = sorted(set(refs) - set(preds))
    label_set = None if labels is None else LabelSet(labels, source="labels")
    if label_set is None:
        for candidate in (gt_dir / "dataset.json", gt_dir.parent / "dataset.json"):
            if candidate.is_file():
                try:
                    label_set = LabelSet.parse(read_json(candidate, "dataset description").get("labels"), str(candidate))
                    break
                except ReCoKDError:
                    label_set = None  # not a dataset description with labels: name them by value
    loaded = []
    top = 0
    for case in common:
        p, p_geometry = read_label_map(preds[case])
        p = postprocess_labels(p, postprocess)
        r, r_geometry = read_label_map(refs[case])
        if p.shape != r.shape or not p_geometry.matches(r_geometry):
            raise ReCoKDError(f"{preds[case]} is not on the voxel grid of {refs[case]} (shape/spacing/origin/direction differ); "
                              "predict on the reference images")
        loaded.append((case, p, r, r_geometry.spacing_dhw))
        top = max(top, int(p.max(initial=0)), int(r.max(initial=0)))
    if label_set is None:
        label_set = LabelSet({"background": 0, **{f"label_{v}": v for v in range(1, top + 1)}})
    names = label_set.names
    cases = [score_case(p, r, sp, names, tolerance_mm, case) for case, p, r, sp in loaded]
    return FolderEvaluation(cases, summarise(cases), names[1:], missing)


def write_csv(path: str | Path, cases: Sequence[CaseScores], summary: dict[str, dict[str, float]], class_names: Sequence[str]) -> Path:
    """One row per case and metric-class pair, then the mean rows (case ``mean``)."""
    from ..utils.io import atomic_write

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["case", "class", *METRICS])
            for c in cases:
                for name in class_names:
                    w.writerow([c.case_id, name, *(f"{c.scores[m][name]:.6g}" for m in METRICS)])
            for name in [*class_names, "mean"]:
                w.writerow(["mean", name, *(f"{summary[m][name]:.6g}" for m in METRICS)])

    return atomic_write(path, write)


def format_table(summary: dict[str, dict[str, float]], class_names: Sequence[str], tolerance_mm: float = 2.0) -> str:
    """A markdown table: one row per class (and the mean), columns Dice, HD95 (mm), NSD."""
    lines = [f"| class | Dice | HD95 (mm) | NSD@{tolerance_mm:g}mm |", "|---|---|---|---|"]
    for name in [*class_names, "mean"]:
        d, h, n = (summary[m][name] for m in METRICS)
        lines.append(f"| {name} | {d:.4f} | {h:.2f} | {n:.4f} |")
    return "\n".join(lines)
