"""Deployment: the pruned model fixed for fast inference (BatchNorm folded, per-layer implementation measured,
ReLU / residual adds fused into the stripe kernel), and its ONNX export."""

from ..layers.deployed import DeployedStripeConv2d
from .forward import DeployedGraphModule
from .pipeline import DeployReport, deploy, jit_load

__all__ = ["DeployReport", "DeployedGraphModule", "DeployedStripeConv2d", "deploy", "jit_load"]
