"""timm's feature-size attributes kept truthful after channels were removed before the classifier.

A timm model records its feature sizes in plain attributes: ``model.num_features`` (channels of
``forward_features``), ``model.head_hidden_size`` (width of ``forward_head(..., pre_logits=True)``) and, in a
``ClassifierHead``, ``head.in_features`` / ``head.num_features``. ``reset_classifier(n)`` builds the new classifier
from them, so once a channel cleanup removed dead filters feeding the head they must follow the model.
"""

from __future__ import annotations

from typing import Dict

import torch
import torch.nn as nn

from .modules import run_model


def _channels(t: torch.Tensor, fmt: str) -> int:
    return int(t.shape[-1] if t.dim() != 4 or fmt == "NHWC" else t.shape[1])


@torch.no_grad()
def sync_feature_sizes(model: nn.Module, example_inputs) -> Dict[str, int]:
    """Set timm's ``num_features`` / ``head_hidden_size`` (and a head module's stale ``in_features`` /
    ``num_features``, also of a head fed by a pre-logits MLP) of ``model`` to the sizes measured on
    ``example_inputs``; a model without timm's ``forward_features`` / ``forward_head`` API (or whose
    ``forward_features`` does not run on ``example_inputs``) is left alone. Returns ``{attribute: new value}`` of
    what changed."""
    if not all(hasattr(model, a) for a in ("forward_features", "forward_head", "num_features")):
        return {}
    was_training = model.training
    try:
        model.eval()
        features = run_model(model.forward_features, example_inputs)
        pre_logits = model.forward_head(features, pre_logits=True)
    except Exception:  # inputs meant for a forward_fn, a head without pre_logits: nothing to measure
        return {}
    finally:
        model.train(was_training)
    if not isinstance(features, torch.Tensor) or not isinstance(pre_logits, torch.Tensor):
        return {}
    fmt = str(getattr(model, "output_fmt", "NCHW"))
    old, new = model.num_features, _channels(features, fmt)
    changed: Dict[str, int] = {}
    if old != new:
        model.num_features = changed["num_features"] = new
        for name, module in _heads(model):  # ClassifierHead and the like keep their own copy
            if getattr(module, "in_features", None) == old:
                module.in_features = changed[f"{name}.in_features"] = new
                if getattr(module, "num_features", None) == old and not getattr(module, "hidden_size", None):
                    module.num_features = new
    hidden = _channels(pre_logits, fmt if pre_logits.dim() == 4 else "NLC")
    old_hidden = getattr(model, "head_hidden_size", hidden)
    if old_hidden != hidden:
        model.head_hidden_size = changed["head_hidden_size"] = hidden
        for name, module in _heads(model):  # a head after a pre-logits MLP (VGG's ConvMlp) reads its width
            if getattr(module, "in_features", None) == old_hidden and _classifier_inputs(module) == hidden:
                module.in_features = changed[f"{name}.in_features"] = hidden
                if getattr(module, "num_features", None) == old_hidden:
                    module.num_features = hidden
    return changed


def _heads(model: nn.Module):
    """``(name, module)`` of timm's head modules (``ClassifierHead``, ``NormMlpClassifierHead``...)."""
    return [(n, m) for n, m in model.named_modules() if type(m).__name__.endswith("Head")]


def _classifier_inputs(head: nn.Module) -> int | None:
    """The input width of a head's classifier ``fc`` (a ``Linear`` or a 1x1 conv) when the head has no hidden
    layer of its own, else ``None``."""
    fc = getattr(head, "fc", None)
    if getattr(head, "hidden_size", None) or not isinstance(fc, (nn.Linear, nn.Conv2d)):
        return None
    return fc.in_features if isinstance(fc, nn.Linear) else fc.in_channels
