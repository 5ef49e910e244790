"""A model average (timm's ``ModelEmaV3``, or any copy of the model) carried through ``StripePruner.step()``.

An EMA copy taken while the skeletons are attached (``ModelEmaV3(model)`` after ``StripePruner(model, ...)``) is a
deep copy with its own Filter Skeletons; it averages the weights *and* the skeletons, and copies the ``alive``
masks (bool buffers) from the model at each update. :func:`step_with_ema` replaces ``pruner.step()``::

    pruner = StripePruner(model, x, ...)
    ema = timm.utils.ModelEmaV3(model, decay=0.999)       # after the pruner: the EMA has skeletons too
    ...training: loss.backward(); pruner.regularize(model); optimizer.step(); ema.update(model)
    step_with_ema(pruner, ema)                             # model pruned; the EMA gets the same structure
    ema.update(model)                                      # and keeps averaging

The EMA's own averaged weights are kept: its skeletons are merged into them (with the model's stripe masks), the
channel groups the model's step removed are removed from the EMA (torch-pruning's pruning history, replayed on
the EMA's DependencyGraph) and its convs become ``StripeConv2d`` with exactly the model's stripes. The EMA's
function is its own (an average), so no exactness check applies to it; its structure is checked: every tensor
of its ``state_dict`` has the model's shape.
"""

from __future__ import annotations

from typing import List

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from .layers.stripe_conv import StripeConv2d
from .pruning.graph import build_graph
from .skeleton import detach_skeletons
from .skeleton.parametrizations import FilterSkeleton
from .utils import swap_module


def _has_skeleton(module: nn.Module) -> bool:
    return parametrize.is_parametrized(module, "weight") and any(
        isinstance(p, FilterSkeleton) for p in module.parametrizations["weight"])


def _check_copy(pruner, copy: nn.Module) -> None:
    """The copy has the model's structure and a Filter Skeleton on every skeleton conv (refused before any change)."""
    model_sd, copy_sd = pruner.model.state_dict(), copy.state_dict()
    if list(model_sd) != list(copy_sd) or any(model_sd[k].shape != copy_sd[k].shape for k in model_sd):
        raise ValueError("step_with_ema: the EMA model's state_dict differs from the model's (keys or shapes): create "
                         "the EMA (e.g. timm.utils.ModelEmaV3(model)) after StripePruner(model, ...), from that model")
    modules = dict(copy.named_modules())
    missing = [n for n in pruner.names if n not in modules or not _has_skeleton(modules[n])]
    if missing:
        raise ValueError(f"step_with_ema: the EMA model has no Filter Skeleton on {missing[:3]}: create the EMA after "
                         "the StripePruner (then it is a copy with skeletons)")


def _inputs_on(inputs, device: torch.device):
    if isinstance(inputs, torch.Tensor):
        return inputs.to(device)
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(_inputs_on(t, device) for t in inputs)
    return inputs


def step_with_ema(pruner, ema) -> None:
    """``pruner.step()``, then the same structure on ``ema`` (timm ``ModelEma*``: its ``.module``; or a model copy).

    Intermediate steps of an iterative target only kill stripes: the EMA keeps its skeletons (its next
    ``update`` copies the ``alive`` masks). Raises ``ValueError`` before anything changes if ``ema`` is not a copy
    of the pruner's model with skeletons."""
    copy = getattr(ema, "module", ema)
    _check_copy(pruner, copy)
    model = pruner.model
    with torch.no_grad():  # the model's stripe and channel masks (bool buffers), as ModelEmaV3.update copies them
        copy_sd = copy.state_dict()
        for key, value in model.state_dict().items():
            if value.dtype == torch.bool:
                copy_sd[key].copy_(value)
    names = {m: n for n, m in model.named_modules()}
    history: List[list] = []
    for group in pruner.step(interactive=True) or ():
        dep, idxs = group[0]  # the root, as torch-pruning's own pruning history records it
        history.append([names[dep.target.module], pruner.DG.is_out_channel_pruning_fn(dep.trigger),
                        [int(getattr(i, "idx", i)) for i in idxs]])
        group.prune()
    if any(_has_skeleton(m) for m in model.modules()):  # an intermediate step: nothing merged yet
        return
    detach_skeletons(copy, merge=True)
    if history:
        device = next(copy.parameters()).device
        graph = build_graph(copy, _inputs_on(pruner.example_inputs, device), pruner.graph_options)
        graph.load_pruning_history(history)
    _convert_like(model, copy, pruner.names)
    model_sd, copy_sd = model.state_dict(), copy.state_dict()
    bad = [k for k in model_sd if k not in copy_sd or model_sd[k].shape != copy_sd[k].shape]
    if bad or len(model_sd) != len(copy_sd):
        raise RuntimeError(f"step_with_ema: the EMA's structure does not match the pruned model's at {bad[:3]}")


@torch.no_grad()
def _convert_like(model: nn.Module, copy: nn.Module, names: List[str]) -> None:
    """Give every skeleton layer of ``copy`` (merged, channels removed) the stripes of ``model``'s layer."""
    for name in names:
        target, layer = model.get_submodule(name), copy.get_submodule(name)
        if isinstance(target, StripeConv2d):
            dense = layer.to_dense() if isinstance(layer, StripeConv2d) else layer
            stripe = StripeConv2d.from_dense(dense, mask=target.stripe_mask(), backend=target.backend)
            swap_module(copy, layer, stripe)
        else:  # kept dense (grouped conv, ...): its dead stripes zeroed as in the model
            layer.weight.mul_(target.weight.ne(0).any(dim=1, keepdim=True))
