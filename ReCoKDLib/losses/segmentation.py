"""Segmentation loss: Dice + cross-entropy with nnU-Net-style deep supervision."""

from __future__ import annotations

from typing import Sequence

import torch
from monai.losses import DeepSupervisionLoss, DiceCELoss
from torch import nn


def deep_supervision_weights(num_outputs: int) -> list[float]:
    """nnU-Net's weights ``1/2^i`` for output i (0 = full resolution), normalised to sum 1.

    (nnU-Net also builds a lowest-resolution output with weight 0; :class:`~ReCoKDLib.models.SegUNet`
    omits it.)
    """
    raw = [0.5**i for i in range(max(num_outputs, 1))]
    total = sum(raw)
    return [w / total for w in raw]


class DeepSupervisedDiceCELoss(nn.Module):
    """``L_seg = Σ_i ω_i · (Dice_i + CE_i)`` over deep-supervision outputs.

    Dice is soft Dice over foreground classes (per sample, as nnU-Net's 3d_fullres); the labels are
    down-sampled (nearest) to each output's grid.

    Forward:
        outputs: logits (B, K, D, H, W), or a list of them at decreasing resolutions (full first).
        labels: integer labels (B, 1, D, H, W) at full resolution.
        Returns a scalar tensor.
    """

    def __init__(self, num_outputs: int | None = None, include_background: bool = False):
        super().__init__()
        dice_ce = DiceCELoss(
            include_background=include_background, to_onehot_y=True, softmax=True, smooth_nr=1e-5, smooth_dr=1e-5
        )
        weights: Sequence[float] | None = deep_supervision_weights(num_outputs) if num_outputs else None
        self.loss = DeepSupervisionLoss(dice_ce, weights=weights)
        self.num_outputs = num_outputs

    def forward(self, outputs: torch.Tensor | list[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        if isinstance(outputs, (list, tuple)) and self.num_outputs is None:
            self.loss.weights = deep_supervision_weights(len(outputs))
        return self.loss(outputs, labels.float())
