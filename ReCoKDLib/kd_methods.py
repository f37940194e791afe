"""The distillation methods by name: the terms each combines and its default λ_max.

Torch-free, so that the 3D Slicer module lists the same methods as ``recokd distill --method`` without
importing PyTorch. The terms themselves are registered in :mod:`ReCoKDLib.losses.registry`.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["KDMethod", "KD_METHODS", "DEFAULT_METHOD", "DEFAULT_METHOD_WITH_TEACHER_LABELS", "method_names"]


@dataclass(frozen=True)
class KDMethod:
    """A named distillation method: its terms and default λ_max."""

    terms: tuple[str, ...]
    lambda_max: float
    description: str


#: λ_max defaults are per method because the terms' magnitudes differ; see docs for how they were chosen.
KD_METHODS: dict[str, KDMethod] = {
    "none": KDMethod((), 0.0, "no distillation: the student trains on labels alone"),
    "recokd": KDMethod(("msard", "msca"), 1.0, "ReCo-KD: MS-SARD + MS-CA (pooled affinity)"),
    "recokd-gc": KDMethod(("msard", "msca_gc"), 1.0, "ReCo-KD with the global-context MS-CA variant"),
    "msard": KDMethod(("msard",), 1.0, "MS-SARD alone (ablation)"),
    "msca": KDMethod(("msca",), 1.0, "MS-CA alone (ablation)"),
    "logit": KDMethod(("logit_kd",), 1.0, "logit KD (Hinton), per-voxel KL at temperature T"),
    "fitnet": KDMethod(("fitnet",), 1.0, "FitNet feature MSE through the adapter"),
    "cwd": KDMethod(("cwd",), 1.0, "channel-wise distillation"),
    "skd": KDMethod(("skd",), 1.0, "SKD pooled pairwise affinity at one level"),
}

#: what ``recokd distill`` and the Slicer panel use unless told otherwise (docs/results.md says why)
DEFAULT_METHOD = "recokd"
#: ... when the student also learns from teacher-labelled scans (``--unlabeled``, ``--labeled-cases``): the
#: teacher's labels alone. Measured with paired seeds, ReCo-KD's feature terms on top of the same teacher labels
#: added +0.002 [-0.008, +0.012] (phantom, 2 labels, 5 seeds) and +0.000 [-0.005, +0.006] (LA2018, 4 labels,
#: 3 seeds) for 1.5-3x the training time (docs/results.md, "Distilling with unlabeled scans")
DEFAULT_METHOD_WITH_TEACHER_LABELS = "none"


def method_names() -> list[str]:
    """The method names, the default first (the order of a choice list)."""
    return [DEFAULT_METHOD, *(name for name in KD_METHODS if name != DEFAULT_METHOD)]
