"""Knowledge-distillation baselines, in the same framework as ReCo-KD for a fair comparison.

Feature baselines use the same taps, adapters and level weights as ReCo-KD; only the term differs.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .checks import check_levels, require_5d, require_same_shape
from .msca import DEFAULT_MAX_POSITIONS, affinity_mse


class LogitKDLoss(nn.Module):
    """Hinton's logit distillation, per voxel.

    ``L = T² · mean_{b,v} Σ_c p_t[c] · (log p_t[c] − log p_s[c])`` with ``p = softmax(z / T)`` over classes.

    Forward:
        student_logits, teacher_logits: (B, K, D, H, W). Returns ``{"logit_kd": L}``.
    """

    needs_adapter = False
    needs_logits = True

    def __init__(self, temperature: float = 2.0, weight: float = 1.0):
        super().__init__()
        self.temperature = temperature
        self.weight = weight

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> dict[str, torch.Tensor]:
        require_5d(student_logits, "student logits")
        require_same_shape(student_logits, teacher_logits, "logit KD")
        t = self.temperature
        log_p_s = F.log_softmax(student_logits / t, dim=1)
        log_p_t = F.log_softmax(teacher_logits.detach() / t, dim=1)
        kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1)  # (B, D, H, W)
        return {"logit_kd": self.weight * kl.mean() * t * t}


class FitNetLoss(nn.Module):
    """FitNet-style feature imitation: ``L = Σ_k w_k · mean (F_s,k' − F_t,k)²`` (adapted student)."""

    needs_adapter = True

    def __init__(self, level_weights: Sequence[float], weight: float = 1.0):
        super().__init__()
        self.level_weights = list(level_weights)
        self.weight = weight

    def forward(self, student_features, teacher_features, labels=None) -> dict[str, torch.Tensor]:
        check_levels(student_features, teacher_features, self.level_weights)
        total = 0.0
        for w, fs, ft in zip(self.level_weights, student_features, teacher_features):
            require_same_shape(fs, ft, "FitNet")
            total = total + w * F.mse_loss(fs, ft.detach())
        return {"fitnet": self.weight * total}


class ChannelWiseDistillationLoss(nn.Module):
    """CWD (Shu et al., 2021): each channel's spatial map as a distribution.

    ``φ(F)[b, c, :] = softmax_v(F[b, c, v] / T)``;
    ``L = Σ_k w_k · T² / (B·C) · Σ_{b,c} KL(φ(F_t) ‖ φ(F_s'))``.
    """

    needs_adapter = True
    adapter_bias = False  # a per-channel spatial softmax ignores constant shifts: a bias would never learn

    def __init__(self, level_weights: Sequence[float], temperature: float = 4.0, weight: float = 1.0):
        super().__init__()
        self.level_weights = list(level_weights)
        self.temperature = temperature
        self.weight = weight

    def forward(self, student_features, teacher_features, labels=None) -> dict[str, torch.Tensor]:
        check_levels(student_features, teacher_features, self.level_weights)
        t = self.temperature
        total = 0.0
        for w, fs, ft in zip(self.level_weights, student_features, teacher_features):
            require_same_shape(fs, ft, "CWD")
            b, c = fs.shape[:2]
            log_p_s = F.log_softmax(fs.reshape(b, c, -1) / t, dim=2)
            log_p_t = F.log_softmax(ft.detach().reshape(b, c, -1) / t, dim=2)
            kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum()
            total = total + w * kl * (t * t) / (b * c)
        return {"cwd": self.weight * total}


class PairwiseAffinityLoss(nn.Module):
    """SKD's pairwise (structured) distillation: pooled cosine affinity at one level.

    ``L = mean (G_s − G_t)²`` with ``G`` from :func:`~ReCoKDLib.losses.msca.affinity` (via
    :func:`~ReCoKDLib.losses.msca.affinity_mse`) at level ``level``
    (default 0, the highest tapped resolution, like SKD's final feature map).
    """

    needs_adapter = False

    def __init__(self, level: int = 0, max_positions: int = DEFAULT_MAX_POSITIONS, weight: float = 1.0):
        super().__init__()
        self.level = level
        self.max_positions = max_positions
        self.weight = weight

    def forward(self, student_features, teacher_features, labels=None) -> dict[str, torch.Tensor]:
        fs, ft = student_features[self.level], teacher_features[self.level]
        return {"skd": self.weight * affinity_mse(fs, ft, self.max_positions)}
