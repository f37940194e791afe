"""Segmentation metrics (MONAI implementations)."""

from __future__ import annotations

import numpy as np
import torch
from monai.metrics import compute_dice
from monai.networks.utils import one_hot


def dice_per_class(prediction: torch.Tensor, reference: torch.Tensor, num_classes: int) -> np.ndarray:
    """Dice of each foreground class.

    Args:
        prediction, reference: integer label maps (D, H, W).
    Returns:
        (num_classes − 1,) float64; NaN where the class is absent from both (nothing to score).
    """
    pred = one_hot(prediction.long()[None, None], num_classes)
    ref = one_hot(reference.long()[None, None], num_classes)
    dice = compute_dice(pred, ref, include_background=False, ignore_empty=False)[0].double()
    empty = (ref[0, 1:].flatten(1).sum(1) == 0) & (pred[0, 1:].flatten(1).sum(1) == 0)
    dice[empty] = float("nan")
    return dice.numpy()
