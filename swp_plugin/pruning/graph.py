"""Building torch-pruning's DependencyGraph with a time limit, without leaving anything on the model."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Dict, Iterator, List, Tuple

import torch
import torch.nn as nn
import torch_pruning as tp
from torch_pruning import ops

from ..layers.stripe_conv import StripeConv2d
from ..utils import time_limit


@contextmanager
def graph_guard(model: nn.Module, timeout: float | None = None) -> Iterator[None]:
    """Around torch-pruning's tracing of ``model`` (a DependencyGraph build, or ``BasePruner.__init__``): within
    ``timeout`` seconds (:func:`time_limit`), with autograd on (the graph is traced through it) also under
    ``torch.no_grad()``; afterwards the model keeps its mode, and hooks left behind by a failed or timed-out build
    are removed (torch-pruning removes them only when the traced forward succeeds)."""
    hooks = {m: _hook_keys(m) for m in model.modules()}
    was_training = model.training
    try:
        with time_limit(timeout), torch.enable_grad():
            yield
    finally:
        for module, keys in hooks.items():
            for table in _HOOK_TABLES:
                for key in [k for k in getattr(module, table) if k not in keys]:
                    del getattr(module, table)[key]
        model.train(was_training)


def build_graph(model: nn.Module, example_inputs, options: Dict, timeout: float | None = None
                ) -> tp.DependencyGraph:
    """``tp.DependencyGraph().build_dependency(model, example_inputs, **options)`` under :func:`graph_guard`."""
    with graph_guard(model, timeout):
        return tp.DependencyGraph().build_dependency(model, example_inputs, **options)


_HOOK_TABLES = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called")


def _hook_keys(module: nn.Module) -> set:
    return {key for table in _HOOK_TABLES for key in getattr(module, table)}


#: Per-channel norms a conv's filters feed (``regularize`` masks their affine params for a dead filter).
MASKABLE_NORMS: Tuple[type, ...] = (nn.modules.batchnorm._BatchNorm,)


def fed_norms(DG: tp.DependencyGraph, module: nn.Module, direct: bool = False) -> List[nn.Module]:
    """The per-channel norms that read ``module``'s output: through single-input element-wise ops (activations,
    pooling; no add / concat), or with ``direct`` only a norm that is the output's sole reader (its weight and
    bias may be parametrized). The one conv -> norm discovery of the project (masks, rescaling, BN folding)."""
    node = DG.module2node.get(module)
    if node is None:
        return []
    if direct:  # a norm reads one activation; its other graph inputs are its own (parametrized) weight and bias
        if len(node.outputs) != 1:
            return []
        return [n.module for n in node.outputs if isinstance(n.module, MASKABLE_NORMS)]
    found: List[nn.Module] = []
    stack, seen = list(node.outputs), set()
    while stack:
        n = stack.pop()
        if id(n) in seen:
            continue
        seen.add(id(n))
        if isinstance(n.module, MASKABLE_NORMS):
            if n.module.affine:
                found.append(n.module)
        elif n.type == ops.OPTYPE.ELEMENTWISE and len(n.inputs) == 1:
            stack.extend(n.outputs)
    return found


def norm_after(DG: tp.DependencyGraph) -> Dict[nn.Module, nn.Module]:
    """Each conv / ``StripeConv2d`` whose output is read only by a BatchNorm with running statistics (and that
    BatchNorm reads nothing else) -> that BatchNorm: the pairs a fold or a rescale may treat as one."""
    pairs: Dict[nn.Module, nn.Module] = {}
    for layer in DG.module2node:
        if isinstance(layer, (nn.Conv2d, StripeConv2d)):
            norms = [bn for bn in fed_norms(DG, layer, direct=True) if bn.track_running_stats
                     and bn.running_var is not None]
            if norms:
                pairs[layer] = norms[0]
    return pairs
