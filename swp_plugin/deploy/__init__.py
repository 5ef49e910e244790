"""Deployment: the pruned model fixed for fast inference (BatchNorm folded, per-layer implementation measured,
ReLU / residual adds fused into the stripe kernel), and its ONNX export."""

from .deployment import DeployReport, deploy
from .layer import DeployedStripeConv2d

__all__ = ["DeployReport", "DeployedStripeConv2d", "deploy"]
