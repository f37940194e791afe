"""MS-SARD: multi-scale structure-aware region distillation (ReCo-KD, method.md)."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ReCoKDError
from .checks import check_levels, require_5d, require_labels, require_same_shape


def _attentions(magnitude: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(S, A)`` from ``|F|`` computed once: one abs (and one abs backward) serves both attentions,
    a measurable saving at full-resolution levels."""
    b, c = magnitude.shape[:2]
    flat = magnitude.reshape(b, c, -1)
    n = flat.shape[2]
    spatial = n * F.softmax(flat.mean(dim=1) / temperature, dim=1)
    channel = c * F.softmax(flat.mean(dim=2) / temperature, dim=1)
    return spatial, channel


def spatial_attention(features: torch.Tensor, temperature: float) -> torch.Tensor:
    """``S(F)[b, v] = N · softmax_v(mean_c |F[b, c, v]| / T)``.

    Args:
        features: (B, C, D, H, W).
    Returns:
        (B, N) with N = D·H·W; it averages to 1 over positions.
    """
    b, n = features.shape[0], features[0, 0].numel()
    energy = features.abs().mean(dim=1).reshape(b, n)
    return n * F.softmax(energy / temperature, dim=1)


def channel_attention(features: torch.Tensor, temperature: float) -> torch.Tensor:
    """``A(F)[b, c] = C · softmax_c(mean_v |F[b, c, v]| / T)``.

    Args:
        features: (B, C, D, H, W).
    Returns:
        (B, C); it averages to 1 over channels.
    """
    c = features.shape[1]
    energy = features.abs().flatten(2).mean(dim=2)
    return c * F.softmax(energy / temperature, dim=1)


def resize_labels(labels: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Nearest-neighbour resize of integer labels (B, 1, D, H, W) to ``size``; returns int64."""
    if tuple(labels.shape[2:]) == tuple(size):
        return labels.long()
    return F.interpolate(labels.float(), size=tuple(size), mode="nearest-exact").long()


def region_masks(labels: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Class-aware, scale-normalised foreground and background masks.

    ``M_fg[b, v] = Σ_{c≥1} 1[y[b,v]=c] / n_{b,c}`` and ``M_bg[b, v] = 1[y[b,v]=0] / n_{b,0}``, where
    ``n_{b,c}`` counts the voxels of class c in sample b. Each present structure gets total weight 1,
    whatever its size; absent classes contribute nothing (no division by zero).

    Args:
        labels: integer labels (B, 1, D, H, W) on the feature grid, values in [0, num_classes).
    Returns:
        ``(M_fg, M_bg)``, each (B, N) float32 with N = D·H·W.
    """
    b = labels.shape[0]
    flat = labels.reshape(b, -1).long()
    counts = torch.zeros(b, num_classes, device=labels.device, dtype=torch.float32)
    counts.scatter_add_(1, flat, torch.ones_like(flat, dtype=torch.float32))
    inverse = torch.where(counts > 0, 1.0 / counts.clamp_min(1.0), torch.zeros_like(counts))
    per_voxel = inverse.gather(1, flat)  # 1 / n_{b, y[b,v]}
    is_bg = flat == 0
    m_fg = torch.where(is_bg, torch.zeros_like(per_voxel), per_voxel)
    m_bg = torch.where(is_bg, per_voxel, torch.zeros_like(per_voxel))
    return m_fg, m_bg


def _masked_mean(
    error: torch.Tensor, mask: torch.Tensor, spatial: torch.Tensor, tau: float, channels: int
) -> torch.Tensor:
    """``Σ_{b,v} M^τ · S_t · E / (C · Σ_{b,v} M^τ)``; zero (not NaN) when the mask is empty.

    ``M^τ · S_t`` carries no gradient, so it is formed first and met with ``E`` in one dot product:
    no (B, N) product with a graph is kept.
    """
    m = mask.pow(tau) if tau != 1.0 else mask
    denom = m.sum() * channels
    num = torch.dot((m * spatial).reshape(-1), error.reshape(-1))
    return torch.where(denom > 0, num / denom.clamp_min(1e-12), num * 0.0)


def region_terms(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    temperature: float = 0.5,
    tau: float = 1.0,
) -> dict[str, torch.Tensor]:
    """MS-SARD terms at one level (method.md, steps 1–4).

    Args:
        student: adapted student features F_s' (B, C, D, H, W).
        teacher: teacher features F_t, same shape (no gradient flows into it).
        labels: integer labels (B, 1, D, H, W) on this grid, values in [0, num_classes).
        num_classes: classes including background.
        temperature: T of the attention softmaxes.
        tau: exponent of the masks.

    Returns:
        ``{"foreground": L_fg, "background": L_bg, "attention": L_att}``, scalar tensors, where
        ``L_fg = Σ M_fg^τ · S_t · A_t · (F_s' − F_t)² / (C · Σ M_fg^τ)`` (``L_bg`` with ``M_bg``) and
        ``L_att = mean|A(F_s') − A(F_t)| + mean|S(F_s') − S(F_t)|``.
    """
    require_5d(student, "student features")
    require_5d(teacher, "teacher features")
    require_same_shape(student, teacher, "region_terms")
    require_labels(labels, num_classes)
    if labels.shape[0] != student.shape[0] or tuple(labels.shape[2:]) != tuple(student.shape[2:]):
        raise ReCoKDError(
            f"labels {tuple(labels.shape)} are not on the feature grid {tuple(student.shape)}; resize them first"
        )
    return _region_terms(student, teacher, labels, num_classes, temperature, tau)


def _region_terms(
    student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, num_classes: int, temperature: float, tau: float
) -> dict[str, torch.Tensor]:
    """:func:`region_terms` without the input checks (the caller has validated once per step)."""
    teacher = teacher.detach()
    b, c = student.shape[:2]
    s_t, a_t = _attentions(teacher.abs(), temperature)
    s_s, a_s = _attentions(student.abs(), temperature)
    m_fg, m_bg = region_masks(labels, num_classes)
    diff = (student - teacher).reshape(b, c, -1)
    # E[b, v] = Σ_c A_t[b, c] · (F_s' − F_t)²[b, c, v], shared by both regions; (B, N) only.
    error = torch.einsum("bc,bcn->bn", a_t, diff * diff)
    return {
        "foreground": _masked_mean(error, m_fg, s_t, tau, c),
        "background": _masked_mean(error, m_bg, s_t, tau, c),
        "attention": (a_s - a_t).abs().mean() + (s_s - s_t).abs().mean(),
    }


class MSSARDLoss(nn.Module):
    """Multi-scale structure-aware region distillation.

    ``L = Σ_k w_k · (α_fg·L_fg,k + α_bg·L_bg,k + α_att·L_att,k)`` over feature levels k, each level's
    labels resized (nearest) to its grid; see :func:`region_terms` for the per-level terms.

    Args:
        num_classes: classes including background.
        level_weights: one weight per level (see :func:`~ReCoKDLib.losses.checks.level_weights`).
        temperature: attention temperature T (default 0.5).
        tau: mask exponent (default 1).
        fg_weight, bg_weight, att_weight: coefficients of the three terms (default 1).

    Attribute ``check_labels`` (True): a caller that has checked the labels already (the
    :class:`~ReCoKDLib.distill.Distiller`) sets it False to spare the step a host-device synchronisation.

    Forward:
        student_features: list of adapted student maps (B, C_k, D_k, H_k, W_k).
        teacher_features: list of teacher maps of the same shapes.
        labels: (B, 1, D, H, W) integer labels at input resolution.
        Returns ``{"msard_fg", "msard_bg", "msard_att"}``, level-weighted scalar tensors.
    """

    needs_adapter = True
    check_labels = True

    def __init__(
        self,
        num_classes: int,
        level_weights: Sequence[float],
        temperature: float = 0.5,
        tau: float = 1.0,
        fg_weight: float = 1.0,
        bg_weight: float = 1.0,
        att_weight: float = 1.0,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.level_weights = list(level_weights)
        self.temperature = temperature
        self.tau = tau
        self.coefficients = {"foreground": fg_weight, "background": bg_weight, "attention": att_weight}

    def forward(
        self, student_features: Sequence[torch.Tensor], teacher_features: Sequence[torch.Tensor], labels: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        check_levels(student_features, teacher_features, self.level_weights)
        if self.check_labels:
            require_labels(labels, self.num_classes)
        totals = {"foreground": 0.0, "background": 0.0, "attention": 0.0}
        for w, fs, ft in zip(self.level_weights, student_features, teacher_features):
            require_same_shape(fs, ft, "MS-SARD")
            terms = _region_terms(
                fs, ft, resize_labels(labels, fs.shape[2:]), self.num_classes, self.temperature, self.tau
            )
            for key, value in terms.items():
                totals[key] = totals[key] + w * self.coefficients[key] * value
        return {"msard_fg": totals["foreground"], "msard_bg": totals["background"], "msard_att": totals["attention"]}


def level_weights(num_levels: int, alpha: float = 0.4) -> list[float]:
    """ReCo-KD's level weights ``w_k ∝ r^k`` with ``r = 2^(-3α)``, normalised to sum 1 (level 0 = full res)."""
    if num_levels < 1:
        raise ReCoKDError("need at least one feature level")
    r = 2.0 ** (-3.0 * alpha)
    raw = [r**k for k in range(num_levels)]
    total = sum(raw)
    return [w / total for w in raw]
