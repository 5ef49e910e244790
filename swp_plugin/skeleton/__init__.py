"""Training-time Filter Skeletons: parametrizations and their attachment to a model."""

from .attach import (
    EXCLUDED_CONVS,
    MASK_SAFE_CONVS,
    SKELETON_LAYOUTS,
    attach_channel_mask,
    attach_skeletons,
    detach_skeletons,
    filter_alive,
    ineligibility_reason,
)
from .parametrizations import ChannelMask, FilterSkeleton
from .standardization import STANDARDIZED_CONVS, WeightStandardization, unfold_standardization

__all__ = [
    "EXCLUDED_CONVS",
    "MASK_SAFE_CONVS",
    "SKELETON_LAYOUTS",
    "STANDARDIZED_CONVS",
    "WeightStandardization",
    "ChannelMask",
    "FilterSkeleton",
    "attach_channel_mask",
    "attach_skeletons",
    "detach_skeletons",
    "filter_alive",
    "ineligibility_reason",
    "unfold_standardization",
]
