"""MS-CA: multi-scale context alignment (ReCo-KD, method.md), with bounded memory."""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .checks import check_levels, require_5d, require_same_grid, require_same_shape

#: Default position budget per level: 16³ pooled positions, an affinity of 4096² floats per sample.
DEFAULT_MAX_POSITIONS = 16**3


def pooled_grid(size: Sequence[int], max_positions: int) -> tuple[int, ...]:
    """The largest grid, keeping the aspect ratio of ``size``, with at most ``max_positions`` positions.

    A grid already within budget is kept as is (no pooling).
    """
    size = tuple(int(s) for s in size)
    if max_positions < 1:
        raise ValueError("max_positions must be >= 1")
    if math.prod(size) <= max_positions:
        return size
    scale = (max_positions / math.prod(size)) ** (1.0 / len(size))
    grid = [max(1, min(s, math.floor(s * scale))) for s in size]
    # Rounding may leave room: grow the dimension that is shrunk most while the budget allows.
    while True:
        order = sorted(range(len(grid)), key=lambda i: grid[i] / size[i])
        for i in order:
            if grid[i] < size[i] and math.prod(grid) // grid[i] * (grid[i] + 1) <= max_positions:
                grid[i] += 1
                break
        else:
            return tuple(grid)


def _pooled_unit_features(features: torch.Tensor, max_positions: int) -> torch.Tensor:
    """Adaptive-average-pool (B, C, D, H, W) to at most ``max_positions`` positions and L2-normalise
    each position's channel vector; returns F̂ of shape (B, C, P)."""
    grid = pooled_grid(features.shape[2:], max_positions)
    if tuple(grid) != tuple(features.shape[2:]):
        features = F.adaptive_avg_pool3d(features, grid)
    return F.normalize(features.flatten(2), dim=1, eps=1e-8)


def affinity(features: torch.Tensor, max_positions: int = DEFAULT_MAX_POSITIONS) -> torch.Tensor:
    """Cosine-similarity affinity between spatial positions after pooling to a bounded grid.

    Args:
        features: (B, C, D, H, W).
        max_positions: P_max; the map is adaptive-average-pooled to P ≤ P_max positions first.
    Returns:
        G: (B, P, P), ``G = F̂ᵀ F̂`` with F̂ the pooled features L2-normalised over channels.
        Independent of C, so teacher and student need no adapter.
    """
    require_5d(features, "features for the affinity")
    flat = _pooled_unit_features(features, max_positions)
    return torch.bmm(flat.transpose(1, 2), flat)


def affinity_mse(student: torch.Tensor, teacher: torch.Tensor, max_positions: int = DEFAULT_MAX_POSITIONS) -> torch.Tensor:
    """``mean_{b,i,j} (G_s − G_t)²`` for the affinities of :func:`affinity`, without building them.

    With ``A = F̂_s`` (C_s × P) and ``B = F̂_t`` (C_t × P), ``G_s = AᵀA`` and ``G_t = BᵀB``, and
    ``‖AᵀA − BᵀB‖²_F = ‖AAᵀ‖²_F − 2‖ABᵀ‖²_F + ‖BBᵀ‖²_F``: the same value from C×C Gram matrices, in
    O(P·C²) time and O(C²) memory instead of O(P²). The three norms are summed in float64 so the
    cancellation costs no precision.

    Args:
        student: (B, C_s, D, H, W); teacher: (B, C_t, D, H, W) on the same grid (channels may differ).
    Returns:
        a scalar tensor.
    """
    require_5d(student, "student features")
    require_5d(teacher, "teacher features")
    require_same_grid(student, teacher, "affinity")
    a = _pooled_unit_features(student, max_positions)
    with torch.no_grad():
        b = _pooled_unit_features(teacher.detach(), max_positions)
        bb = torch.bmm(b, b.transpose(1, 2)).double().pow(2).sum()
    aa = torch.bmm(a, a.transpose(1, 2)).double().pow(2).sum()
    ab = torch.bmm(a, b.transpose(1, 2)).double().pow(2).sum()
    positions = a.shape[2]
    total = (aa - 2 * ab + bb).clamp_min(0.0)
    return (total / (a.shape[0] * positions * positions)).to(student.dtype)


class AffinityContextLoss(nn.Module):
    """Multi-scale context alignment by pairwise affinity.

    ``L_ctx = Σ_k w_k · mean_{b,i,j} (G_s,k − G_t,k)²`` with ``G`` from :func:`affinity`, evaluated by
    :func:`affinity_mse` without materialising any P×P matrix: memory is O(B · C²) per level after
    pooling to at most P_max positions, whatever the patch size.

    Args:
        level_weights: one weight per level.
        max_positions: position budget P_max per level (default 16³).
        weight: coefficient of the term.

    Forward:
        student_features, teacher_features: lists of (B, C_k, D_k, H_k, W_k); channel counts may differ.
        Returns ``{"msca": L_ctx}``.
    """

    needs_adapter = False

    def __init__(self, level_weights: Sequence[float], max_positions: int = DEFAULT_MAX_POSITIONS, weight: float = 1.0,
                 key: str = "msca"):
        super().__init__()
        self.level_weights = list(level_weights)
        self.max_positions = int(max_positions)
        self.weight = weight
        self.key = key

    def forward(self, student_features, teacher_features, labels=None) -> dict[str, torch.Tensor]:
        check_levels(student_features, teacher_features, self.level_weights)
        total = 0.0
        for w, fs, ft in zip(self.level_weights, student_features, teacher_features):
            require_same_grid(fs, ft, "MS-CA")
            total = total + w * affinity_mse(fs, ft, self.max_positions)
        return {self.key: self.weight * total}


class GlobalContextBlock(nn.Module):
    """Global-context block: attention pooling → 1×1×1 conv (C→C/2) → GroupNorm → ReLU → 1×1×1 conv (C/2→C).

    Shapes: (B, C, D, H, W) → context (B, C, 1, 1, 1), broadcast-added to the input by the caller.
    The last conv is zero-initialised, so the block starts as "no context".
    """

    def __init__(self, channels: int):
        super().__init__()
        hidden = max(channels // 2, 1)
        # No bias: softmax is shift-invariant, a bias would never receive gradient.
        self.attention = nn.Conv3d(channels, 1, kernel_size=1, bias=False)
        self.transform = nn.Sequential(
            nn.Conv3d(channels, hidden, kernel_size=1),
            nn.GroupNorm(1, hidden),
            nn.ReLU(inplace=True),
            nn.Conv3d(hidden, channels, kernel_size=1),
        )
        nn.init.zeros_(self.transform[-1].weight)
        nn.init.zeros_(self.transform[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        weights = F.softmax(self.attention(x).reshape(b, 1, -1), dim=2)  # (B, 1, N)
        pooled = torch.bmm(x.reshape(b, c, -1), weights.transpose(1, 2)).reshape(b, c, 1, 1, 1)
        return self.transform(pooled)


class GlobalContextLoss(nn.Module):
    """MS-CA, global-context variant (the ReCo-KD authors' code).

    ``L_ctx = Σ_k w_k · mean (F_s' + ctx_s(F_s') − F_t − ctx_t(F_t))²`` with one trainable
    :class:`GlobalContextBlock` per side and level.

    Args:
        channels: teacher channels per level (student features arrive adapted to them).
        level_weights: one weight per level.
        weight: coefficient of the term.
    """

    needs_adapter = True

    def __init__(self, channels: Sequence[int], level_weights: Sequence[float], weight: float = 1.0):
        super().__init__()
        if len(channels) != len(level_weights):
            raise ValueError("one channel count per level")
        self.level_weights = list(level_weights)
        self.weight = weight
        self.student_blocks = nn.ModuleList(GlobalContextBlock(c) for c in channels)
        self.teacher_blocks = nn.ModuleList(GlobalContextBlock(c) for c in channels)

    def forward(self, student_features, teacher_features, labels=None) -> dict[str, torch.Tensor]:
        check_levels(student_features, teacher_features, self.level_weights)
        total = 0.0
        for k, (w, fs, ft) in enumerate(zip(self.level_weights, student_features, teacher_features)):
            require_same_shape(fs, ft, "MS-CA (global context)")
            ft = ft.detach()
            s = fs + self.student_blocks[k](fs)
            t = ft + self.teacher_blocks[k](ft)
            total = total + w * F.mse_loss(s, t)
        return {"msca_gc": self.weight * total}
