"""Inference-time layers: the stripe convolution (trainable, backends), its deployed form, their padding rules."""

from .deployed import DeployedStripeConv2d
from .stripe_conv import BACKENDS, DYNAMIC_SAME_CONVS, StripeConv2d

__all__ = ["BACKENDS", "DYNAMIC_SAME_CONVS", "DeployedStripeConv2d", "StripeConv2d"]
