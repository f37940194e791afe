"""The training augmentation presets (``--augment``) and what they mirror; torch-free, so a bundle's
card and the 3D Slicer module can say which test-time flips a model may use without loading PyTorch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from ..errors import ReCoKDError

__all__ = ["AUGMENT_PRESETS", "THIN_SLAB_RATIO", "AugmentConfig", "trained_mirror_axes"]

#: the augmentation presets of ``--augment`` (see :meth:`AugmentConfig.preset`)
AUGMENT_PRESETS = ("none", "light", "nnunet")
#: a patch whose in-plane extent exceeds this many times its depth is a thin slab (nnU-Net's rule for
#: its "dummy 2D" augmentation): it is rotated and scaled in-plane only
THIN_SLAB_RATIO = 3.0


@dataclass(frozen=True)
class AugmentConfig:
    """Which augmentations run and how strong (nnU-Net-like, lighter where CPU time matters).

    Probabilities are per patch. ``elastic`` is off by default (slow on a CPU). ``in_plane_only`` rotates
    and scales about the depth axis only (thin slabs: a 3D rotation of an 8-slice slab would fill most
    of the patch with padding); ``mirror_axes`` are the axes (0 = D, 1 = H, 2 = W) mirrored at
    ``flip_prob`` each.
    """

    enabled: bool = True
    rotate_degrees: float = 30.0
    scale_range: float = 0.15
    affine_prob: float = 0.2
    in_plane_only: bool = False
    elastic: bool = False
    elastic_prob: float = 0.2
    mirror_axes: tuple[int, ...] = (0, 1, 2)
    flip_prob: float = 0.5
    intensity_scale: float = 0.1
    intensity_shift: float = 0.1
    intensity_prob: float = 0.15
    gamma: tuple[float, float] = (0.7, 1.5)
    gamma_prob: float = 0.3
    noise_std: float = 0.1
    noise_prob: float = 0.1
    lowres_zoom: tuple[float, float] = (0.5, 1.0)
    lowres_prob: float = 0.25

    @classmethod
    def preset(cls, name: str, patch_size: Sequence[int] | None = None, elastic: bool = False) -> "AugmentConfig":
        """``none`` (no augmentation), ``light`` (small in-plane rotation and scaling, mild intensity
        changes; no mirroring, noise or resolution loss) or ``nnunet`` (the nnU-Net-like set above).
        A thin-slab ``patch_size`` is rotated and scaled in-plane only, whatever the preset."""
        if name not in AUGMENT_PRESETS:
            raise ReCoKDError(f"augmentation {name!r} is not one of {', '.join(AUGMENT_PRESETS)}")
        thin = patch_size is not None and max(patch_size[1:]) > THIN_SLAB_RATIO * patch_size[0]
        if name == "none":
            return cls(enabled=False)
        if name == "light":
            return cls(rotate_degrees=15.0, scale_range=0.1, affine_prob=0.2, in_plane_only=True, elastic=elastic,
                       mirror_axes=(), intensity_prob=0.15, gamma_prob=0.15, noise_prob=0.0, lowres_prob=0.0)
        return cls(in_plane_only=thin, elastic=elastic)


def trained_mirror_axes(augment: Any, patch_size: Any = None) -> tuple[int, ...] | None:
    """The axes a training with augmentation ``augment`` (a preset name, or run.json's older ``True`` /
    ``False``) mirrored; ``None`` when ``augment`` is not recorded or not known."""
    if isinstance(augment, bool):
        augment = "nnunet" if augment else "none"
    if augment not in AUGMENT_PRESETS:
        return None
    config = AugmentConfig.preset(augment, tuple(patch_size) if patch_size else None)
    return tuple(config.mirror_axes) if config.enabled else ()
