"""Which channels a stripe-pruned model can lose without changing its function, found through DepGraph.

A channel of a torch-pruning group is removed only when

1. every *producer* of it in the group (conv, linear or stripe-conv output channels) is dead: its filter
   weights and bias are exactly zero, and
2. every *consumer* of it in the group (conv, depthwise conv, linear or stripe-conv input channels) reads
   exactly zero on probe inputs (the example inputs and a random batch) - the norm a dead filter feeds
   outputs zero only if its affine parameters were masked (``regularize`` does that), and
3. no member of the group mixes channels or is the model output (LayerNorm, GroupNorm, attention, LSTM,
   the output node, unknown custom layers): removing a zero channel there would change the result.

Residual, concat and split partners come from the DepGraph group, so a channel shared by several
producers stays unless all of them are dead.
"""

from __future__ import annotations

from typing import Callable, Dict, Iterable, List, Sequence, Set, Tuple

import torch
import torch.nn as nn
import torch_pruning as tp
from torch_pruning import ops

from ..layers.stripe_conv import StripeConv2d
from ..utils import run_model, time_limit
from .functions import STRIPE_CONV_PRUNER

#: seconds allowed to torch-pruning for building one channel group (normally milliseconds)
GROUP_TIMEOUT = 2.0

_PRODUCER_HANDLERS = (tp.prune_conv_out_channels, tp.prune_linear_out_channels, STRIPE_CONV_PRUNER.prune_out_channels)
_CONSUMER_HANDLERS = (
    tp.prune_conv_in_channels,
    tp.prune_linear_in_channels,
    tp.prune_depthwise_conv_out_channels,  # in == out for depthwise: it reads the channel
    STRIPE_CONV_PRUNER.prune_in_channels,
)
_PER_CHANNEL_HANDLERS = (
    tp.prune_batchnorm_out_channels,
    tp.prune_prelu_out_channels,
    tp.prune_instancenorm_out_channels,
)
_PASS_THROUGH_TYPES = {
    ops.OPTYPE.ELEMENTWISE,
    ops.OPTYPE.CONCAT,
    ops.OPTYPE.SPLIT,
    ops.OPTYPE.RESHAPE,
    ops.OPTYPE.SLICE,
    ops.OPTYPE.EXPAND,
    ops.OPTYPE.UNBIND,
    ops.OPTYPE.PARAMETER,
}
#: Per-channel norms whose affine params ``regularize`` masks for a dead filter.
MASKABLE_NORMS: Tuple[type, ...] = (nn.modules.batchnorm._BatchNorm,)

RootPlan = Tuple[nn.Module, Callable, List[int]]


def _zero_bias(module: nn.Module, out: int, device) -> torch.Tensor:
    bias = getattr(module, "bias", None)
    return torch.ones(out, dtype=torch.bool, device=device) if bias is None else bias.detach().eq(0)


def dead_outputs(module: nn.Module) -> torch.Tensor:
    """``(out,)`` bool: output channels whose weights and bias are all exactly zero."""
    weight = module.weight.detach()
    if isinstance(module, StripeConv2d):
        live = torch.zeros(module.out_channels, device=weight.device)
        live.index_add_(0, module.stripe_out, weight.ne(0).any(dim=1).float())
        dead = live.eq(0)
    else:
        dead = weight.flatten(1).eq(0).all(dim=1)
    return dead & _zero_bias(module, dead.shape[0], weight.device)


def fed_norms(DG: tp.DependencyGraph, module: nn.Module) -> List[nn.Module]:
    """The per-channel norms that read ``module``'s output through single-input ops only (no add/concat)."""
    node = DG.module2node.get(module)
    found: List[nn.Module] = []
    stack = list(node.outputs) if node is not None else []
    seen = set()
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


@torch.no_grad()
def record_input_amax(model: nn.Module, probe_inputs: Sequence) -> Dict[nn.Module, torch.Tensor]:
    """Per-channel max |input| of every conv / linear / stripe conv over forwards of ``probe_inputs``."""
    amax: Dict[nn.Module, torch.Tensor] = {}

    def hook(module, inputs):
        x = inputs[0].detach()
        dim = -1 if isinstance(module, nn.Linear) else 1
        reduce = [d for d in range(x.dim()) if d != dim % x.dim()]
        value = x.abs().amax(dim=reduce) if reduce else x.abs()
        amax[module] = value if module not in amax else torch.maximum(amax[module], value)

    handles = [
        m.register_forward_pre_hook(hook)
        for m in model.modules()
        if isinstance(m, (nn.Conv2d, nn.Linear, StripeConv2d))
    ]
    try:
        for inputs in probe_inputs:
            run_model(model, inputs)
    finally:
        for h in handles:
            h.remove()
    return amax


def removable_roots(group, input_amax: Dict[nn.Module, torch.Tensor]) -> Set[int] | None:
    """Root indices of ``group`` whose channel can go (see module doc); ``None`` if the group is blocked."""
    roots: Set[int] = set()
    failing: Set[int] = set()
    for i, (dep, idxs) in enumerate(group):
        module, handler = dep.target.module, dep.handler
        root_idxs = group[i].root_idxs
        roots.update(root_idxs)
        if handler in _PRODUCER_HANDLERS:
            dead = dead_outputs(module)
            failing.update(r for idx, r in zip(idxs, root_idxs, strict=False) if not bool(dead[idx]))
        elif handler in _CONSUMER_HANDLERS:
            if module not in input_amax:
                return None
            values = input_amax[module]
            failing.update(r for idx, r in zip(idxs, root_idxs, strict=False) if float(values[idx]) != 0.0)
        elif handler in _PER_CHANNEL_HANDLERS or dep.target.type in _PASS_THROUGH_TYPES:
            continue
        else:
            return None
    return roots - failing


def plan_channel_removal(
    DG: tp.DependencyGraph,
    roots: Iterable[nn.Module],
    input_amax: Dict[nn.Module, torch.Tensor],
    group_timeout: float | None = GROUP_TIMEOUT,
) -> Tuple[List[RootPlan], List[str]]:
    """Decide, before anything is pruned, which dead filters of ``roots`` are removed with their channel.

    Returns ``(plan, notes)``: ``plan`` lists ``(root module, its out-channel pruning fn, root indices)``
    (root indices stay valid while other groups are pruned; build each group right before pruning it);
    ``notes`` says which groups were blocked and why. A group torch-pruning does not build within
    ``group_timeout`` seconds (its group search does not end on some attention blocks) is left alone.
    """
    plan: List[RootPlan] = []
    notes: List[str] = []
    covered: Set[Tuple[int, Callable]] = set()
    for root in roots:
        if root not in DG.module2node:
            continue
        fn = DG.get_pruner_of_module(root).prune_out_channels
        if (id(root), fn) in covered:
            continue
        dead = dead_outputs(root).nonzero().flatten().tolist()
        if not dead:
            continue
        name = DG._module2name.get(root, type(root).__name__)
        try:
            with time_limit(group_timeout, "torch-pruning's group search"):
                group = DG.get_pruning_group(root, fn, dead)
                covered.update((id(dep.target.module), dep.handler) for dep, _ in group)
                keep = removable_roots(group, input_amax)
                if keep is None:
                    notes.append(f"{name}: {len(dead)} dead filters kept (their channel group cannot be pruned "
                                 "exactly)")
                    continue
                idxs = sorted(keep)
                while idxs and not DG.check_pruning_group(DG.get_pruning_group(root, fn, idxs)):
                    idxs = idxs[:-1]  # torch-pruning's rule: keep at least one channel in every layer
        except Exception as err:  # noqa: BLE001 - torch-pruning cannot map this group (split/concat index errors)
            notes.append(f"{name}: {len(dead)} dead filters kept (torch-pruning: {type(err).__name__}: {err})")
            continue
        if idxs:
            plan.append((root, fn, idxs))
    return plan, notes
