"""Measurement: MACs and parameters (with stripe indexes), latency, reports and pictures."""

from .counting import count_ops_and_params, stripe_index_count
from .latency import measure_latency
from .plots import plot_filter_shapes, plot_stripe_ratios
from .report import format_report, report

__all__ = [
    "count_ops_and_params", "format_report", "measure_latency", "plot_filter_shapes", "plot_stripe_ratios", "report",
    "stripe_index_count",
]
