"""Inference-time layers: the stripe convolution and its padding rules."""

from .stripe_conv import BACKENDS, DYNAMIC_SAME_CONVS, StripeConv2d

__all__ = ["BACKENDS", "DYNAMIC_SAME_CONVS", "StripeConv2d"]
