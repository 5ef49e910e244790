"""Module surgery shared by the skeleton attachment and the pruner."""

from __future__ import annotations

import torch.nn as nn


def replace_module(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Put ``new`` wherever ``old`` is a child (a module may be registered under several parents)."""
    for parent in model.modules():
        for key, child in parent._modules.items():
            if child is old:
                parent._modules[key] = new
