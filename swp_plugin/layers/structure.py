"""A model's structure as plain Python: per module its kind and the shape attributes pruning changes.

``describe(model)`` maps module names to ``{"type": class name, "stripe": bool, **shape attributes}``: channel
counts of convs, linears and norms, and the full configuration of each ``StripeConv2d``. It is what
``swp_plugin.save`` records and what ``swp_plugin.deploy`` remembers of the model it started from; the loader
applies it again through a schema (:mod:`swp_plugin.persistence.schema`).
"""

from __future__ import annotations

from typing import Dict

import torch.nn as nn

from .stripe_conv import StripeConv2d

#: module type -> shape attributes recorded and restored (checked with isinstance, in order).
SHAPE_ATTRIBUTES: Dict[type, tuple] = {
    StripeConv2d: (
        "in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "padding_mode",
        "same_dynamic", "backend",
    ),
    nn.modules.conv._ConvNd: ("in_channels", "out_channels", "groups"),
    nn.Linear: ("in_features", "out_features"),
    nn.modules.batchnorm._BatchNorm: ("num_features",),
    nn.GroupNorm: ("num_groups", "num_channels"),
    nn.LayerNorm: ("normalized_shape",),
    nn.modules.instancenorm._InstanceNorm: ("num_features",),
    nn.PReLU: ("num_parameters",),
}


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


def kind(module: nn.Module) -> type | None:
    """The :data:`SHAPE_ATTRIBUTES` key ``module`` is described by (None: not recorded)."""
    return next((cls for cls in SHAPE_ATTRIBUTES if isinstance(module, cls)), None)


def describe(model: nn.Module) -> Dict[str, Dict]:
    """Module name -> ``{"type": class name, "stripe": bool, **shape attributes}`` (plain Python only)."""
    structure = {}
    for name, module in model.named_modules():
        cls = kind(module)
        if cls is None:
            continue
        entry = {a: _plain(getattr(module, a)) for a in SHAPE_ATTRIBUTES[cls]}
        entry.update(type=type(module).__name__, stripe=isinstance(module, StripeConv2d))
        if isinstance(module, StripeConv2d):
            entry.update(num_stripes=module.num_stripes, bias=module.bias is not None)
        structure[name] = entry
    return structure
