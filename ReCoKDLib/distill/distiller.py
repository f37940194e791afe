"""The Distiller: teacher, student, feature taps, adapters and distillation terms in one module."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ReCoKDError
from ..losses.msard import level_weights as make_level_weights
from ..losses.checks import require_5d, require_labels
from ..losses.registry import KDContext, build_kd_terms, resolve_method
from ..losses.segmentation import DeepSupervisedDiceCELoss
from ..models.taps import FeatureTaps, TapInfo
from ..utils.labels import IGNORE_LABEL, TEACHER_LABEL


@dataclass
class DistillOutput:
    """One step's result: the loss to back-propagate and a breakdown of every term.

    ``terms`` holds the segmentation loss under ``"seg"`` and each distillation term (level-weighted,
    before λ) under its own key; ``kd_weight`` is λ(t) for this step.
    """

    loss: torch.Tensor
    terms: dict[str, torch.Tensor]
    kd_weight: float
    student_output: torch.Tensor | list[torch.Tensor] = field(repr=False)

    def breakdown(self) -> dict[str, float]:
        """Plain floats for logging: every term, λ and the total."""
        out = {k: float(v.detach()) for k, v in self.terms.items()}
        out["lambda"] = self.kd_weight
        out["total"] = float(self.loss.detach())
        return out


def linear_warmup(progress: float, lambda_max: float, warmup_fraction: float) -> float:
    """λ(t): linear from 0 to λ_max over the first ``warmup_fraction`` of training, then constant."""
    if warmup_fraction <= 0:
        return lambda_max
    return lambda_max * min(1.0, max(0.0, progress) / warmup_fraction)


class Distiller(nn.Module):
    """Knowledge distillation of a frozen teacher into a student, backbone-agnostic.

    Features are tapped by module name from both networks; tapped levels are paired in order and must
    have equal resolutions. Terms that compare features element-wise get a trainable 1×1×1 conv adapter
    per level mapping student → teacher channels (identity when the counts match).

    ``L = L_seg + λ(t) · Σ_terms L_term``, with λ(t) warmed up linearly (:func:`linear_warmup`).

    A student at a coarser grid than its teacher (``teacher_scale`` > 1 along an axis: a fast student at
    2× the teacher's spacing) sees the patch at its grid; the teacher sees it upsampled by ``teacher_scale``
    (trilinear), so both cover the same field of view. Taps are then paired by resolution rather than in
    order (a student tap with the teacher tap whose stride is ``teacher_scale`` times its own; unpaired taps
    are left out), and the teacher's logits reach the student's grid as the log of their softmax averaged
    over each ``teacher_scale`` block: soft targets that keep the partial-volume information hard labels lose.

    Args:
        teacher, student: segmentation networks (B, C_in, D, H, W) → logits (B, K, D, H, W); in training
            mode the student may return a list of deep-supervision outputs (full resolution first).
        teacher_taps, student_taps: module names to tap, one per level, highest resolution first.
        num_classes: K, background included.
        method: a name from :data:`~ReCoKDLib.losses.KD_METHODS` (default ``"recokd"``) or a list of
            term names from :data:`~ReCoKDLib.losses.KD_TERMS`.
        probe_shape: input shape (B, C, D, H, W) for one dummy forward that learns the taps' channels
            and strides; defaults from a ``SegUNet`` teacher's spec.
        lambda_max: final λ (default: the method's).
        warmup_fraction: share of training over which λ rises from 0 (default 0.6, as the authors).
        alpha: level-weight decay, ``w_k ∝ 2^(-3αk)``.
        term_options: keyword options per term, e.g. ``{"msard": {"temperature": 0.5}}``.
        seg_loss: the segmentation loss (default Dice + CE with deep supervision).
        teacher_scale: (D, H, W) factors from the student's grid to the teacher's (default 1, 1, 1).
    """

    def __init__(
        self,
        teacher: nn.Module,
        student: nn.Module,
        teacher_taps: Sequence[str],
        student_taps: Sequence[str],
        num_classes: int,
        method: str | Sequence[str] = "recokd",
        probe_shape: Sequence[int] | None = None,
        lambda_max: float | None = None,
        warmup_fraction: float = 0.6,
        alpha: float = 0.4,
        term_options: Mapping[str, Mapping] | None = None,
        seg_loss: nn.Module | None = None,
        teacher_scale: Sequence[int] = (1, 1, 1),
    ):
        super().__init__()
        self.teacher_scale = tuple(int(v) for v in teacher_scale)
        scaled = self.teacher_scale != (1, 1, 1)
        if len(self.teacher_scale) != 3 or min(self.teacher_scale) < 1:
            raise ReCoKDError(f"teacher_scale must be 3 whole numbers >= 1, got {list(teacher_scale)}")
        if len(teacher_taps) != len(student_taps) and not scaled:
            raise ReCoKDError(f"{len(teacher_taps)} teacher taps but {len(student_taps)} student taps; pair them")
        term_names, default_lambda = resolve_method(method)
        self.method = method if isinstance(method, str) else "+".join(method)
        self.num_classes = int(num_classes)
        self.lambda_max = float(default_lambda if lambda_max is None else lambda_max)
        self.warmup_fraction = float(warmup_fraction)
        self.teacher = teacher
        self.student = student
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.teacher.eval()

        self.teacher_taps = FeatureTaps(teacher, teacher_taps)
        self.student_taps = FeatureTaps(student, student_taps)
        shape = tuple(probe_shape) if probe_shape is not None else _default_probe_shape(teacher)
        if scaled:
            shape = _scaled_probe_shape(shape, student, self.teacher_scale)
        teacher_info = self.teacher_taps.probe(_times(shape, self.teacher_scale))
        student_info = self.student_taps.probe(shape)
        if scaled:  # paired by resolution: the teacher's stride is the scale times the student's
            pairs = [(i, j) for j, s in enumerate(student_info) for i, t in enumerate(teacher_info)
                     if tuple(t.stride) == tuple(a * b for a, b in zip(s.stride, self.teacher_scale))]
        else:
            pairs = list(zip(range(len(teacher_info)), range(len(student_info))))
            for t, s in zip(teacher_info, student_info):
                if t.stride != s.stride:
                    raise ReCoKDError(
                        f"teacher tap {t.name!r} (stride {t.stride}) and student tap {s.name!r} (stride {s.stride}) "
                        "are at different resolutions; pair taps level by level"
                    )
        self._pairs = pairs
        self.teacher_info: list[TapInfo] = [teacher_info[i] for i, _ in pairs]
        self.student_info: list[TapInfo] = [student_info[j] for _, j in pairs]

        # no paired level (a scaled teacher whose taps meet none of the student's): logit terms only
        self.level_weights = make_level_weights(len(self.teacher_info), alpha) if self.teacher_info else []
        context = KDContext(
            num_classes=self.num_classes,
            teacher_channels=tuple(i.channels for i in self.teacher_info),
            student_channels=tuple(i.channels for i in self.student_info),
            level_weights=tuple(self.level_weights),
        )
        self.kd_terms = build_kd_terms(term_names, context, term_options)
        for term in self.kd_terms.values():  # forward() checks the labels once for all terms
            if hasattr(term, "check_labels"):
                term.check_labels = False
        if not pairs and any(not getattr(t, "needs_logits", False) for t in self.kd_terms.values()):
            raise ReCoKDError(f"no student tap meets a teacher tap at an equal grid (teacher scale "
                              f"{list(self.teacher_scale)}); choose a logit method (e.g. --method logit) or other taps")
        users = [t for t in self.kd_terms.values() if getattr(t, "needs_adapter", False)]
        bias = any(getattr(t, "adapter_bias", True) for t in users)
        self.adapters = nn.ModuleList(
            _adapter(s.channels, t.channels, bias) for s, t in zip(self.student_info, self.teacher_info)
        ) if users else nn.ModuleList()
        self.seg_loss = seg_loss if seg_loss is not None else DeepSupervisedDiceCELoss()

    # -- parameters and modes -----------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        """Everything the optimizer must update: student, adapters and the terms' own modules."""
        params = [*self.student.parameters(), *self.adapters.parameters(), *self.kd_terms.parameters()]
        return [p for p in params if p.requires_grad]

    def trainable_state_dict(self) -> dict[str, dict]:
        """State of the trained parts (the frozen teacher is not repeated in checkpoints)."""
        return {
            "student": self.student.state_dict(),
            "adapters": self.adapters.state_dict(),
            "kd_terms": self.kd_terms.state_dict(),
        }

    def load_trainable_state_dict(self, state: Mapping[str, Mapping]) -> None:
        self.student.load_state_dict(state["student"])
        self.adapters.load_state_dict(state["adapters"])
        self.kd_terms.load_state_dict(state["kd_terms"])

    def train(self, mode: bool = True) -> "Distiller":
        super().train(mode)
        self.teacher.eval()  # frozen: its norm layers and dropout stay in inference mode
        return self

    def kd_weight(self, progress: float) -> float:
        return linear_warmup(progress, self.lambda_max, self.warmup_fraction)

    # -- the step -----------------------------------------------------------------------------
    def forward(self, images: torch.Tensor, labels: torch.Tensor, progress: float = 1.0,
                checked: tuple[bool, bool] | None = None) -> DistillOutput:
        """One distillation step's loss.

        Args:
            images: (B, C_in, D, H, W).
            labels: integer labels (B, 1, D, H, W), values in [0, num_classes), and for unlabelled scans
                :data:`~ReCoKDLib.utils.labels.TEACHER_LABEL` (the teacher's arg-max of this very patch is the
                target) or :data:`~ReCoKDLib.utils.labels.IGNORE_LABEL` (no segmentation target; the KD
                terms' class-aware masks take the teacher's arg-max there).
            progress: share of training done, in [0, 1], for the λ warm-up.
            checked: what :meth:`check_labels` found for these labels, when the caller checked them already
                (the training loop checks each batch on the host before it moves it to the GPU); None checks
                here, at the cost of one host-device synchronisation.
        """
        require_5d(images, "images")
        from_teacher, left_out = checked if checked is not None else self.check_labels(labels)
        special = from_teacher or left_out
        try:
            student_out = self.student(images)
            teacher_logits = None
            if len(self.kd_terms) or special:
                with torch.no_grad():
                    teacher_logits = self._teacher_logits(images)
            seg_labels = kd_labels = labels
            if special:
                guess = teacher_logits.argmax(1, keepdim=True).to(labels.dtype)
                seg_labels = torch.where(labels == TEACHER_LABEL, guess, labels)  # IGNORE_LABEL stays left out
                kd_labels = torch.where(seg_labels == IGNORE_LABEL, guess, seg_labels)
            terms: dict[str, torch.Tensor] = {"seg": self._seg(student_out, seg_labels, left_out)}
            if len(self.kd_terms):
                terms.update(self._kd_terms(kd_labels, student_out, teacher_logits))
        finally:
            self.teacher_taps.clear()
            self.student_taps.clear()
        lam = self.kd_weight(progress)
        kd = [v for k, v in terms.items() if k != "seg"]
        loss = terms["seg"] + lam * sum(kd) if kd else terms["seg"]
        return DistillOutput(loss=loss, terms=terms, kd_weight=lam, student_output=student_out)

    def check_labels(self, labels: torch.Tensor) -> tuple[bool, bool]:
        """Refuse labels outside the classes (one line); return (any TEACHER_LABEL, any IGNORE_LABEL) voxel."""
        return require_labels(labels, self.num_classes, special=True)

    def _seg(self, outputs, labels: torch.Tensor, left_out: bool) -> torch.Tensor:
        if isinstance(self.seg_loss, DeepSupervisedDiceCELoss):  # tell it what the label check found
            return self.seg_loss(outputs, labels, ignore=left_out)
        return self.seg_loss(outputs, labels)

    def _teacher_logits(self, images: torch.Tensor) -> torch.Tensor:
        """The teacher's logits on the student's grid (see the class docstring for a scaled teacher)."""
        if self.teacher_scale == (1, 1, 1):
            return self.teacher(images)
        upsampled = F.interpolate(images, scale_factor=self.teacher_scale, mode="trilinear", align_corners=False)
        probabilities = torch.softmax(self.teacher(upsampled).float(), dim=1)
        pooled = F.avg_pool3d(probabilities, kernel_size=self.teacher_scale, stride=self.teacher_scale)
        return torch.log(pooled.clamp_min(1e-8))

    def _kd_terms(self, labels, student_out, teacher_logits) -> dict[str, torch.Tensor]:
        # in fp32 whatever the networks ran in: under fp16 autocast, MS-SARD's attention-weighted squared
        # error and MS-CA's affinities overflow (65504) with feature magnitudes a network reaches easily
        device = labels.device.type
        with torch.autocast(device_type=device, enabled=False):
            return self._kd_terms_fp32(labels, student_out, teacher_logits)

    def _kd_terms_fp32(self, labels, student_out, teacher_logits) -> dict[str, torch.Tensor]:
        all_teacher, all_student = self.teacher_taps.features(), self.student_taps.features()
        teacher_feats = [all_teacher[i].detach().float() for i, _ in self._pairs]
        student_feats = [all_student[j].float() for _, j in self._pairs]
        for t, s in zip(teacher_feats, student_feats):
            if t.shape[2:] != s.shape[2:]:
                raise ReCoKDError(
                    f"teacher and student features have grids {tuple(t.shape[2:])} and {tuple(s.shape[2:])}; "
                    "use a patch size divisible by both networks' strides"
                )
        adapted = [a(f) for a, f in zip(self.adapters, student_feats)] if len(self.adapters) else student_feats
        student_logits = (student_out[0] if isinstance(student_out, (list, tuple)) else student_out).float()
        teacher_logits = teacher_logits.float() if teacher_logits is not None else None
        out: dict[str, torch.Tensor] = {}
        for term in self.kd_terms.values():
            if getattr(term, "needs_logits", False):
                out.update(term(student_logits, teacher_logits))
            elif getattr(term, "needs_adapter", False):
                out.update(term(adapted, teacher_feats, labels))
            else:
                out.update(term(student_feats, teacher_feats, labels))
        return out

    def close(self) -> None:
        """Remove every hook; the networks are plain modules again."""
        self.teacher_taps.close()
        self.student_taps.close()

    def __enter__(self) -> "Distiller":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _adapter(student_channels: int, teacher_channels: int, bias: bool) -> nn.Module:
    if student_channels == teacher_channels:
        return nn.Identity()
    return nn.Conv3d(student_channels, teacher_channels, kernel_size=1, bias=bias)


def _times(shape: Sequence[int], scale: Sequence[int]) -> tuple[int, ...]:
    return (*shape[:2], *(int(n) * int(s) for n, s in zip(shape[2:], scale)))


def _scaled_probe_shape(teacher_shape: Sequence[int], student: nn.Module, scale: Sequence[int]) -> tuple[int, ...]:
    """A student input shape that divides by the student's strides and that, times ``scale``, is a multiple
    of the teacher's probe grid (which divides by the teacher's strides)."""
    spec = getattr(student, "spec", None)
    student_div = spec.divisor if spec is not None else (1, 1, 1)
    spatial = [math.lcm(int(d), int(t) // math.gcd(int(t), int(s))) for t, s, d in zip(teacher_shape[2:], scale, student_div)]
    return (*teacher_shape[:2], *spatial)


def _default_probe_shape(teacher: nn.Module) -> tuple[int, ...]:
    spec = getattr(teacher, "spec", None)
    if spec is None:
        raise ReCoKDError("cannot infer the teacher's input shape; pass probe_shape=(1, C, D, H, W)")
    d = spec.divisor
    return (1, spec.in_channels, *(2 * x for x in d))
