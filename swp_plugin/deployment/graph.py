"""Graph passes of deployment, on a ``torch.fx`` trace: BatchNorm folding and epilogue fusion.

The tracer keeps convolutions (``nn.Conv2d`` and its subclasses, ``StripeConv2d``, ``DeployedStripeConv2d``),
BatchNorms (timm's ``BatchNormAct2d`` included) and timm's no-trace modules as leaves, so that a pass sees
``conv -> bn -> relu`` and ``conv -> add -> relu`` as call nodes.

* :func:`fold_batchnorms`: ``conv -> BatchNorm`` (eval-mode statistics; the conv's output read by nothing else)
  becomes the conv with scaled weights and a shifted bias; a ``BatchNormAct2d`` leaves its activation behind.
* :func:`fuse_epilogues`: ``DeployedStripeConv2d -> relu`` and ``DeployedStripeConv2d -> add(other) [-> relu]``
  (same shapes, no broadcast) run in the kernel's epilogue; ``nn.Identity`` calls between them (timm's
  ``drop_block`` and ``aa`` in eval) are dropped first.
"""

from __future__ import annotations

import operator
from typing import Dict, List, Tuple

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import BatchNormAct2d, get_notrace_functions, is_notrace_module

from ..layers.deployed import DeployedStripeConv2d
from ..layers.padding import PLAIN_CONVS
from ..layers.stripe_conv import StripeConv2d
from .forward import DeployedGraphModule

_BN = nn.modules.batchnorm._BatchNorm
LEAVES = (nn.Conv2d, StripeConv2d, DeployedStripeConv2d, _BN)
#: convs a BatchNorm folds into: their output is ``conv(x, W) + b``, linear in the weight
FOLDABLE = PLAIN_CONVS + (StripeConv2d,)

_RELU_FUNCTIONS = (F.relu, torch.relu, torch.relu_, F.relu_)
_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)


class DeployTracer(fx.Tracer):
    """``torch.fx`` tracer with convolutions, BatchNorms and timm's no-trace modules as leaves."""

    def __init__(self) -> None:
        super().__init__(autowrap_functions=tuple(f for f in get_notrace_functions() if callable(f)))

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, LEAVES) or is_notrace_module(type(m)) or super().is_leaf_module(m, module_qualified_name)


def trace(model: nn.Module) -> DeployedGraphModule:
    """A :class:`~.forward.DeployedGraphModule` (an ``fx.GraphModule``) of ``model`` (raises what ``torch.fx``
    raises for untraceable models)."""
    graph = DeployTracer().trace(model)
    for node in graph.nodes:  # annotations name aliases TorchScript cannot resolve; Tensor is its default
        node.type = None
    return DeployedGraphModule(model, graph, class_name=type(model).__name__)


def bn_scale_shift(bn: _BN) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(scale, shift)`` ``(C,)`` with ``bn(x) = x * scale + shift`` in eval mode."""
    scale = torch.rsqrt(bn.running_var.double() + bn.eps)
    if bn.affine:
        scale = scale * bn.weight.detach().double()
    shift = -bn.running_mean.double() * scale
    if bn.affine:
        shift = shift + bn.bias.detach().double()
    return scale, shift


def foldable_norm(bn: nn.Module) -> bool:
    """A BatchNorm that is an affine map in eval mode (running statistics kept)."""
    return isinstance(bn, _BN) and bn.track_running_stats and bn.running_mean is not None and not bn.training


@torch.no_grad()
def fold_into(conv: nn.Module, bn: _BN) -> None:
    """Fold ``bn`` (eval mode) into ``conv`` in place: ``bn(conv(x)) == conv'(x)``."""
    scale, shift = bn_scale_shift(bn)
    weight = conv.weight
    if isinstance(conv, StripeConv2d):
        per_stripe = scale[conv.stripe_out].view(-1, 1)
    else:
        per_stripe = scale.view(-1, *[1] * (weight.dim() - 1))
    bias = shift if conv.bias is None else conv.bias.detach().double() * scale + shift
    weight.copy_((weight.double() * per_stripe).to(weight.dtype))
    conv.bias = nn.Parameter(bias.to(weight.dtype), requires_grad=conv.weight.requires_grad)
    if isinstance(conv, StripeConv2d):
        conv._refresh()


def _module_calls(gm: fx.GraphModule) -> Dict[str, int]:
    calls: Dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    return calls


def fold_batchnorms(gm: fx.GraphModule) -> List[Tuple[str, str]]:
    """Fold every ``conv -> BatchNorm`` pair of ``gm`` (in place); returns the ``(conv, norm)`` names folded."""
    modules, calls, folded = dict(gm.named_modules()), _module_calls(gm), []
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not foldable_norm(modules.get(node.target)) or len(node.args) != 1:
            continue
        source = node.args[0]
        conv = modules.get(source.target) if isinstance(source, fx.Node) and source.op == "call_module" else None
        if (conv is None or type(conv) not in FOLDABLE or len(source.users) != 1 or calls[source.target] != 1
                or calls[node.target] != 1 or node.kwargs):
            continue
        bn = modules[node.target]
        if isinstance(bn, BatchNormAct2d) and not isinstance(bn.drop, nn.Identity):
            continue
        fold_into(conv, bn)
        folded.append((source.target, node.target))
        if isinstance(bn, BatchNormAct2d) and not isinstance(bn.act, nn.Identity):  # the activation stays, as a
            node.target = _unused_name(gm, f"{node.target.replace('.', '_')}_act")  # module of its own: the emptied
            gm.add_submodule(node.target, bn.act)  # BatchNormAct2d goes (it would not script without its drop)
        else:
            node.replace_all_uses_with(source)
            gm.graph.erase_node(node)
    _finish(gm)
    return folded


def _unused_name(gm: fx.GraphModule, name: str) -> str:
    candidate, k = name, 0
    while hasattr(gm, candidate):
        k += 1
        candidate = f"{name}_{k}"
    return candidate


def _is_relu(node: fx.Node, modules: Dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return type(modules.get(node.target)) is nn.ReLU
    if node.op == "call_function":
        return node.target in _RELU_FUNCTIONS and len(node.args) == 1
    return node.op == "call_method" and node.target in ("relu", "relu_") and len(node.args) == 1


def _added_operand(node: fx.Node, source: fx.Node) -> fx.Node | None:
    """The other operand when ``node`` adds ``source`` to a tensor node (no alpha, no broadcast check here)."""
    if node.kwargs or len(node.args) != 2 or not (
            (node.op == "call_function" and node.target in _ADD_FUNCTIONS)
            or (node.op == "call_method" and node.target in ("add", "add_"))):
        return None
    a, b = node.args
    other = b if a is source else a if b is source else None
    return other if isinstance(other, fx.Node) and other is not source else None


def _same_shape(a: fx.Node, b: fx.Node) -> bool:
    ma, mb = a.meta.get("tensor_meta"), b.meta.get("tensor_meta")
    return (ma is not None and mb is not None and hasattr(ma, "shape") and hasattr(mb, "shape")
            and tuple(ma.shape) == tuple(mb.shape) and ma.dtype == mb.dtype == torch.float32)


def _drop_identities(gm: fx.GraphModule, modules: Dict[str, nn.Module]) -> None:
    """Remove the calls of ``nn.Identity`` (timm's eval-time ``drop_block`` and ``aa``, between a conv and its
    ReLU) from the graph, in place."""
    for node in list(gm.graph.nodes):
        if (node.op == "call_module" and type(modules.get(node.target)) is nn.Identity and len(node.args) == 1
                and not node.kwargs and isinstance(node.args[0], fx.Node)):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)


def planned_epilogues(gm: fx.GraphModule) -> Dict[str, Tuple[bool, bool]]:
    """``name -> (residual, relu)``: what :func:`fuse_epilogues` would move into the epilogue of each conv called
    once, were it on the kernel (the residual's shape is only checked then). Drops ``nn.Identity`` calls."""
    modules = dict(gm.named_modules())
    _drop_identities(gm, modules)
    calls, planned, claimed = _module_calls(gm), {}, set()
    for node in gm.graph.nodes:  # in graph order, as fuse_epilogues: an add goes to the first conv it follows
        if (node.op != "call_module" or not isinstance(modules.get(node.target), LEAVES[:3])
                or calls[node.target] != 1 or len(node.users) != 1 or len(node.args) != 1):
            continue
        user = next(iter(node.users))
        residual = user not in claimed and _added_operand(user, node) is not None
        if residual:
            claimed.add(user)
            user = next(iter(user.users)) if len(user.users) == 1 else None
        relu = user is not None and _is_relu(user, modules)
        if residual or relu:
            planned[node.target] = (residual, relu)
    gm.recompile()
    return planned


def fuse_epilogues(gm: fx.GraphModule) -> List[str]:
    """Move ReLUs and residual adds that follow a ``DeployedStripeConv2d`` into its epilogue (in place). Needs
    shape metadata (``torch.fx.passes.shape_prop.ShapeProp``), and drops it. Returns what was fused, one line per
    layer."""
    modules = dict(gm.named_modules())
    _drop_identities(gm, modules)
    calls, fused = _module_calls(gm), []
    for node in list(gm.graph.nodes):
        layer = modules.get(node.target) if node.op == "call_module" else None
        if not isinstance(layer, DeployedStripeConv2d) or layer.residual or layer.act != "none":
            continue
        if calls[node.target] != 1 or len(node.users) != 1 or len(node.args) != 1:
            continue
        user = next(iter(node.users))
        parts = []
        other = _added_operand(user, node)
        if other is not None and _same_shape(node, other):
            with gm.graph.inserting_before(user):
                merged = gm.graph.call_module(node.target, (node.args[0], other))
            merged.meta = dict(user.meta)
            user.replace_all_uses_with(merged)
            gm.graph.erase_node(user)
            gm.graph.erase_node(node)
            layer.residual, node = True, merged
            parts.append("residual")
            user = next(iter(node.users)) if len(node.users) == 1 else None
        if user is not None and _is_relu(user, modules):
            user.replace_all_uses_with(node)
            gm.graph.erase_node(user)
            layer.act, layer.act_code = "relu", 1
            parts.append("relu")
        if parts:
            fused.append(f"{node.target}: {' + '.join(parts)}")
    for node in gm.graph.nodes:  # used up; torch.save cannot pickle it (tp.state_dict copies the graph)
        node.meta.pop("tensor_meta", None)
    _finish(gm)
    return fused


def _finish(gm: fx.GraphModule) -> None:
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
