"""Segmentation loss: Dice + cross-entropy with nnU-Net-style deep supervision."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from monai.losses import DeepSupervisionLoss, DiceCELoss
from torch import nn

from ..utils.labels import IGNORE_LABEL


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
    down-sampled (nearest) to each output's grid. Voxels labelled
    :data:`~ReCoKDLib.utils.labels.IGNORE_LABEL` count in neither term (:func:`masked_dice_ce`).

    Forward:
        outputs: logits (B, K, D, H, W), or a list of them at decreasing resolutions (full first).
        labels: integer labels (B, 1, D, H, W) at full resolution.
        ignore: whether any label is IGNORE_LABEL, when the caller knows it already (the distiller reads
            it with its label check); None looks (one host-device synchronisation more per step).
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
        self.include_background = include_background

    def forward(self, outputs: torch.Tensor | list[torch.Tensor], labels: torch.Tensor,
                ignore: bool | None = None) -> torch.Tensor:
        if isinstance(outputs, (list, tuple)) and self.num_outputs is None:
            self.loss.weights = deep_supervision_weights(len(outputs))
        if ignore is None:
            ignore = bool((labels == IGNORE_LABEL).any())
        if ignore:  # MONAI's loss is ~2x faster on CPU, so the masked one runs only where it must
            outs = list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]
            weights = self.loss.weights if isinstance(outputs, (list, tuple)) else [1.0]
            total = outs[0].new_zeros(())
            for w, out in zip(weights, outs):
                target = labels if out.shape[2:] == labels.shape[2:] else \
                    F.interpolate(labels.float(), size=out.shape[2:], mode="nearest-exact").long()
                total = total + w * masked_dice_ce(out, target, self.include_background)
            return total
        return self.loss(outputs, labels.float())


def masked_dice_ce(logits: torch.Tensor, labels: torch.Tensor, include_background: bool = False,
                   smooth: float = 1e-5) -> torch.Tensor:
    """Soft Dice + cross-entropy over the voxels not labelled :data:`~ReCoKDLib.utils.labels.IGNORE_LABEL`:

    ``CE = mean_{v: m_v} −log p_{y_v}(v)``; ``Dice = mean_{b, k} 1 − (2 Σ_v m p_k y_k + s) / (Σ_v m p_k + Σ_v m y_k + s)``
    with ``m`` the mask of kept voxels, ``p`` the softmax, ``y`` the one-hot labels, ``k`` over the foreground
    classes (all with ``include_background``), per sample ``b``. With nothing left out it equals MONAI's
    ``DiceCELoss(softmax=True, to_onehot_y=True, smooth_nr=s, smooth_dr=s)``.

    Args:
        logits: (B, K, D, H, W); labels: (B, 1, D, H, W) integers.
    """
    labels = labels.long()
    keep = labels != IGNORE_LABEL
    target = torch.where(keep, labels, torch.zeros_like(labels))[:, 0]
    # a sum over the kept voxels divided by their count (at least 1): the mean where any is kept, 0 where
    # none is, without asking the device which (F.cross_entropy's mean over no voxel is NaN)
    ce = F.cross_entropy(logits, torch.where(keep[:, 0], target, torch.full_like(target, -100)), ignore_index=-100,
                         reduction="sum") / keep.sum().clamp_min(1).float()  # (a voxel count overflows fp16)
    probs = torch.softmax(logits, dim=1)
    onehot = F.one_hot(target, logits.shape[1]).movedim(-1, 1).to(probs.dtype)
    if not include_background:
        probs, onehot = probs[:, 1:], onehot[:, 1:]
    m = keep.to(probs.dtype)
    dims = tuple(range(2, logits.ndim))
    inter = (probs * onehot * m).sum(dims)
    denom = (probs * m).sum(dims) + (onehot * m).sum(dims)
    dice = 1.0 - (2.0 * inter + smooth) / (denom + smooth)
    return dice.mean() + ce
