"""Building torch-pruning's DependencyGraph with a time limit, without leaving anything on the model."""

from __future__ import annotations

from typing import Dict

import torch
import torch.nn as nn
import torch_pruning as tp

from ..layers.stripe_conv import StripeConv2d
from ..utils import time_limit


def build_graph(model: nn.Module, example_inputs, options: Dict, timeout: float | None = None
                ) -> tp.DependencyGraph:
    """``tp.DependencyGraph().build_dependency(model, example_inputs, **options)`` within ``timeout`` seconds
    (:func:`time_limit`), with autograd on (the graph is traced through it) also under ``torch.no_grad()``.

    torch-pruning's tracing registers forward hooks, puts the model in eval mode and removes the hooks only when
    the traced forward succeeds; here the model keeps its mode, and hooks left behind by a failed or timed-out
    build are removed (else they would stay on the user's model).
    """
    hooks = {m: _hook_keys(m) for m in model.modules()}
    was_training = model.training
    try:
        with time_limit(timeout), torch.enable_grad():
            return tp.DependencyGraph().build_dependency(model, example_inputs, **options)
    finally:
        for module, keys in hooks.items():
            for table in _HOOK_TABLES:
                for key in [k for k in getattr(module, table) if k not in keys]:
                    del getattr(module, table)[key]
        model.train(was_training)


_HOOK_TABLES = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called")


def _hook_keys(module: nn.Module) -> set:
    return {key for table in _HOOK_TABLES for key in getattr(module, table)}


def norm_after(DG: tp.DependencyGraph) -> Dict[nn.Module, nn.Module]:
    """Each conv / ``StripeConv2d`` whose output is read only by a BatchNorm with running statistics (and that
    BatchNorm reads nothing else) -> that BatchNorm: the pairs a fold or a rescale may treat as one."""
    pairs: Dict[nn.Module, nn.Module] = {}
    for layer, node in DG.module2node.items():
        if not isinstance(layer, (nn.Conv2d, StripeConv2d)) or len(node.outputs) != 1:
            continue
        norm = node.outputs[0]
        bn = norm.module
        if (isinstance(bn, nn.modules.batchnorm._BatchNorm) and bn.track_running_stats
                and bn.running_var is not None and len(norm.inputs) == 1):
            pairs[layer] = bn
    return pairs
