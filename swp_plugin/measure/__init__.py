"""Measurement: MACs and parameters (with stripe indexes)."""

from .counting import count_ops_and_params, stripe_index_count
from .plots import plot_filter_shapes, plot_stripe_ratios
from .report import format_report, report

__all__ = [
    "count_ops_and_params", "format_report", "plot_filter_shapes", "plot_stripe_ratios", "report", "stripe_index_count"
]
