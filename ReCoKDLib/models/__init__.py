"""Networks and feature taps."""

from .weights import load_weights, save_weights
from .taps import FeatureTaps, TapInfo
from .unet import (
    SegUNet,
    UNetSpec,
    build_pair,
    build_unet,
    count_parameters,
    dynunet_tap_names,
    isotropic_spec,
    nnunet_filters,
)

__all__ = [
    "FeatureTaps",
    "TapInfo",
    "SegUNet",
    "UNetSpec",
    "build_pair",
    "build_unet",
    "count_parameters",
    "dynunet_tap_names",
    "isotropic_spec",
    "nnunet_filters",
    "load_weights",
    "save_weights",
]
