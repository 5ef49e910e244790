"""Which channels a stripe-pruned model can lose without changing its function, found through DepGraph.

A channel of a torch-pruning group is removed only when

1. every *producer* of it in the group (conv, linear or stripe-conv output channels) is dead: its filter
   weights and bias are exactly zero, and
2. every *consumer* of it in the group (conv, depthwise conv, linear or stripe-conv input channels) reads
   exactly zero on probe inputs (the example inputs and a random batch) - the norm a dead filter feeds
   outputs zero only if its affine parameters were masked (``regularize`` does that), and
3. no member of the group mixes channels or is the model output (LayerNorm, GroupNorm, attention, LSTM,
   the output node, unknown custom layers): removing a zero channel there would change the result.

Members are classified by what they are (conv, depthwise conv, linear, stripe conv, per-channel norm) and by the
direction of their pruning function, so a pruning function given in ``customized_pruners`` for one of these
types (e.g. an ``nn.Conv2d`` pruner subclass) is checked like the built-in one and used to prune. A member of
another type with a customized pruner is the user's layer: it does not block the group, and the rehearsal's output
comparison decides whether removing the channel there is exact.

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
from .notes import CLEANUP_SKIPPED, Note

#: seconds allowed to torch-pruning for building one channel group (normally milliseconds)
GROUP_TIMEOUT = 2.0

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
RootPlan = Tuple[nn.Module, Callable, List[int]]


def _zero_bias(module: nn.Module, out: int, device) -> torch.Tensor:
    bias = getattr(module, "bias", None)
    return torch.ones(out, dtype=torch.bool, device=device) if bias is None else bias.detach().eq(0)


def dead_outputs(module: nn.Module) -> torch.Tensor:
    """``(out,)`` bool: output channels whose weights and bias are all exactly zero."""
    weight = module.weight.detach()
    if isinstance(module, StripeConv2d):
        dead = ~module.per_filter(weight.ne(0).any(dim=1), "any")
    else:
        dead = weight.flatten(1).eq(0).all(dim=1)
    return dead & _zero_bias(module, dead.shape[0], weight.device)


@torch.no_grad()
def record_input_amax(model: nn.Module, probe_inputs: Sequence, forward: Callable = run_model
                      ) -> Dict[nn.Module, torch.Tensor]:
    """Per-channel max |input| of every conv / linear / stripe conv over forwards of ``probe_inputs``
    (``forward(model, inputs)``)."""
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
            forward(model, inputs)
    finally:
        for h in handles:
            h.remove()
    return amax


def _role(DG: tp.DependencyGraph, dep, custom_types: Tuple[type, ...]) -> str:
    """``'producer'``, ``'consumer'``, ``'pass'`` or ``'block'`` for one member of a group."""
    module, handler = dep.target.module, dep.handler
    if handler in _PER_CHANNEL_HANDLERS or dep.target.type in _PASS_THROUGH_TYPES:
        return "pass"
    out, into = DG.is_out_channel_pruning_fn(handler), DG.is_in_channel_pruning_fn(handler)
    if isinstance(module, nn.Conv2d) and ops.module2type(module) == ops.OPTYPE.DEPTHWISE_CONV:
        return "consumer" if (out or into) else "block"  # depthwise: in == out, it reads the channel
    if isinstance(module, (nn.Conv2d, nn.Linear, StripeConv2d)) and (out or into):
        return "producer" if out else "consumer"
    if isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.PReLU, nn.modules.instancenorm._InstanceNorm)):
        return "pass"
    if custom_types and isinstance(module, custom_types):
        return "pass"  # the user's layer with the user's pruning function: the rehearsal checks the outputs
    return "block"


def removable_roots(group, input_amax: Dict[nn.Module, torch.Tensor], custom_types: Tuple[type, ...] = ()
                    ) -> Set[int] | None:
    """Root indices of ``group`` whose channel can go (see module doc); ``None`` if the group is blocked.
    ``custom_types``: module classes with a user-given pruning function (``customized_pruners``)."""
    roots: Set[int] = set()
    failing: Set[int] = set()
    DG = group._DG
    for i, (dep, idxs) in enumerate(group):
        module = dep.target.module
        root_idxs = group[i].root_idxs
        roots.update(root_idxs)
        role = _role(DG, dep, custom_types)
        if role == "producer":
            dead = dead_outputs(module)
            failing.update(r for idx, r in zip(idxs, root_idxs, strict=False) if not bool(dead[idx]))
        elif role == "consumer":
            if module not in input_amax:
                return None
            values = input_amax[module]
            failing.update(r for idx, r in zip(idxs, root_idxs, strict=False) if float(values[idx]) != 0.0)
        elif role == "block":
            return None
    return roots - failing


def plan_channel_removal(
    DG: tp.DependencyGraph,
    roots: Iterable[nn.Module],
    input_amax: Dict[nn.Module, torch.Tensor],
    names: Dict[nn.Module, str] | None = None,
    group_timeout: float | None = GROUP_TIMEOUT,
    custom_types: Tuple[type, ...] = (),
) -> Tuple[List[RootPlan], List[Note]]:
    """Decide, before anything is pruned, which dead filters of ``roots`` are removed with their channel.

    Returns ``(plan, notes)``: ``plan`` lists ``(root module, its out-channel pruning fn, root indices)``
    (root indices stay valid while other groups are pruned; build each group right before pruning it);
    ``notes`` says which groups were blocked and why (``names``: module -> qualified name, for the notes);
    ``custom_types``: the module classes of ``customized_pruners`` (see :func:`removable_roots`).
    A group torch-pruning does not build within
    ``group_timeout`` seconds (its group search does not end on some attention blocks) is left alone.
    """
    plan: List[RootPlan] = []
    notes: List[Note] = []
    names = names or {}
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
        name = names.get(root, type(root).__name__)
        try:
            with time_limit(group_timeout, "torch-pruning's group search"):
                group = DG.get_pruning_group(root, fn, dead)
                covered.update((id(dep.target.module), dep.handler) for dep, _ in group)
                keep = removable_roots(group, input_amax, custom_types)
                if keep is None:
                    notes.append(Note(CLEANUP_SKIPPED, name, f"{len(dead)} dead filters kept (their channel group "
                                                             "cannot be pruned exactly)"))
                    continue
                idxs = sorted(keep)
                while idxs and not DG.check_pruning_group(DG.get_pruning_group(root, fn, idxs)):
                    idxs = idxs[:-1]  # torch-pruning's rule: keep at least one channel in every layer
        except Exception as err:  # torch-pruning cannot map this group (split/concat index errors, time limit)
            notes.append(Note(CLEANUP_SKIPPED, name, f"{len(dead)} dead filters kept (torch-pruning: "
                                                     f"{type(err).__name__}: {err})"))
            continue
        if idxs:
            plan.append((root, fn, idxs))
    return plan, notes
