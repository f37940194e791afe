"""Losses: segmentation (Dice + CE, deep supervision), ReCo-KD's MS-SARD and MS-CA, and KD baselines."""

from .baselines import ChannelWiseDistillationLoss, FitNetLoss, LogitKDLoss, PairwiseAffinityLoss
from .msard import level_weights
from .msard import MSSARDLoss, channel_attention, region_masks, region_terms, resize_labels, spatial_attention
from .msca import AffinityContextLoss, GlobalContextBlock, GlobalContextLoss, affinity, affinity_mse, pooled_grid
from .registry import KD_METHODS, KD_TERMS, KDContext, build_kd_terms, register_kd_term, resolve_method
from .segmentation import DeepSupervisedDiceCELoss, deep_supervision_weights

__all__ = [
    "AffinityContextLoss",
    "ChannelWiseDistillationLoss",
    "DeepSupervisedDiceCELoss",
    "FitNetLoss",
    "GlobalContextBlock",
    "GlobalContextLoss",
    "KDContext",
    "KD_METHODS",
    "KD_TERMS",
    "LogitKDLoss",
    "MSSARDLoss",
    "PairwiseAffinityLoss",
    "affinity",
    "affinity_mse",
    "build_kd_terms",
    "channel_attention",
    "deep_supervision_weights",
    "level_weights",
    "pooled_grid",
    "region_masks",
    "region_terms",
    "register_kd_term",
    "resize_labels",
    "resolve_method",
    "spatial_attention",
]
