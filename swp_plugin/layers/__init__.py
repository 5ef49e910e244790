"""Inference-time layers: the stripe convolution (trainable, backends), its deployed form, their padding rules."""

from .deployed import DeployedStripeConv2d
from .padding import DYNAMIC_SAME_CONVS, PLAIN_CONVS
from .stripe_conv import BACKENDS, StripeConv2d

__all__ = ["BACKENDS", "DYNAMIC_SAME_CONVS", "PLAIN_CONVS", "DeployedStripeConv2d", "StripeConv2d"]
