"""Measurement: MACs and parameters (with stripe indexes)."""

from .counting import count_ops_and_params, stripe_index_count

__all__ = ["count_ops_and_params", "stripe_index_count"]
