"""MACs and parameters of a (stripe-pruned) model, registered with torch-pruning's own counter.

At import, this module registers the stripe layers' counting in ``tp.utils.op_counter``'s ``MODULES_MAPPING``
(torch-pruning's extension point for layer counts), so ``tp.utils.count_ops_and_params`` and
``tp.utils.print_tool`` see stripes at every phase of the lifecycle:

* ``StripeConv2d`` / ``DeployedStripeConv2d``: ``N * H_out * W_out * S * C_in`` (+ the bias), :func:`stripe_macs`;
* a ``groups=1`` conv with a Filter Skeleton (training time): its *live* stripes, what ``step()`` converts it to
  (a grouped conv keeps its dense count: it stays dense);
* subclasses of a counted layer (timm ``Conv2dSame``, ``BatchNormAct2d``, parametrized convs and norms), which
  torch-pruning looks up by exact type and would count as zero, count as their nearest counted base class.

Parameters follow the paper's convention: a ``StripeConv2d`` counts its kept stripes' weights (``S x C_in``) plus
its stripe index, one entry per (kept filter, kernel position): ``out x kh x kw``. ``include_indexes=False``
gives the weights-only figure, which is what ``tp.utils.count_ops_and_params`` reports (it sums
``parameters()``; the index is a buffer). MACs are the same in both.
"""

from __future__ import annotations

from typing import Any, Callable, Tuple

import torch
import torch.nn as nn
from torch.nn.utils import parametrize
from torch_pruning.utils import op_counter

from ..layers.deployed import DeployedStripeConv2d
from ..layers.stripe_conv import StripeConv2d
from ..skeleton.parametrizations import FilterSkeleton

#: the stripe layers: stripe weights ``(S, C_in)``, ``out_channels``, ``kernel_size``
STRIPE_LAYERS = (StripeConv2d, DeployedStripeConv2d)


def stripe_macs(module: nn.Module, output: torch.Tensor, bias: bool = False, stripes: int | None = None) -> int:
    """MACs of a stripe layer for ``output`` ``(N, out, H_out, W_out)``: ``N * H_out * W_out * S * C_in`` (plus
    ``out`` per position for the bias with ``bias=True``): the one definition every count and report uses.
    ``stripes`` overrides ``S`` (the live stripes of a skeleton conv)."""
    positions = output.shape[0] * output.shape[2] * output.shape[3]
    macs = (module.num_stripes if stripes is None else stripes) * module.in_channels * positions
    if bias and module.bias is not None:
        macs += module.out_channels * positions
    return int(macs)


def stripe_conv_macs_hook(module: nn.Module, inputs, output) -> None:
    """torch-pruning counting hook of the stripe layers (bias included, as torch-pruning counts convs)."""
    module.__flops__ += stripe_macs(module, output, bias=True)


def _skeleton(module: nn.Module) -> FilterSkeleton | None:
    if not parametrize.is_parametrized(module, "weight"):
        return None
    return next((p for p in module.parametrizations["weight"] if isinstance(p, FilterSkeleton)), None)


def skeleton_conv_macs_hook(module: nn.Module, inputs, output) -> None:
    """Counting hook of an ``nn.Conv2d`` subclass: with a Filter Skeleton and ``groups=1``, its live stripes
    (``alive`` and a nonzero FS), else the dense convolution's count (torch-pruning's conv hook)."""
    fs = _skeleton(module)
    if fs is None or module.groups != 1:
        op_counter.conv_flops_counter_hook(module, inputs, output)
        return
    live = int((fs.alive & fs.skeleton.ne(0)).sum())  # a StripeConv2d's FS (S,) too (a second round)
    module.__flops__ += stripe_macs(module, output, bias=True, stripes=live)


class _Counted(dict):
    """``MODULES_MAPPING`` that also answers for subclasses of its keys (nearest base class first), for the
    stripe layers and for skeleton convs; torch-pruning's counter looks layers up by exact type."""

    def resolve(self, cls: type) -> Callable | None:
        if dict.__contains__(self, cls):
            return dict.__getitem__(self, cls)
        for base in cls.__mro__[1:]:
            if issubclass(base, STRIPE_LAYERS):
                return skeleton_conv_macs_hook if base is StripeConv2d else stripe_conv_macs_hook
            if base is nn.Conv2d:
                return skeleton_conv_macs_hook
            if dict.__contains__(self, base):
                return dict.__getitem__(self, base)
        return None

    def __contains__(self, cls: object) -> bool:
        return isinstance(cls, type) and self.resolve(cls) is not None

    def __missing__(self, cls: type) -> Callable:
        hook = self.resolve(cls) if isinstance(cls, type) else None
        if hook is None:
            raise KeyError(cls)
        return hook

    def get(self, cls, default=None):
        return self[cls] if cls in self else default


def register_counting() -> None:
    """Register the stripe layers' counting in torch-pruning's counter (idempotent; done at import)."""
    mapping = op_counter.MODULES_MAPPING
    if not isinstance(mapping, _Counted):
        mapping = op_counter.MODULES_MAPPING = _Counted(mapping)
    mapping.update({cls: stripe_conv_macs_hook for cls in STRIPE_LAYERS})


register_counting()


def stripe_index_count(model: nn.Module) -> int:
    """Number of stripe-index entries of all ``StripeConv2d`` in ``model``: ``sum(out * kh * kw)``."""
    return sum(
        m.out_channels * m.kernel_size[0] * m.kernel_size[1] for m in model.modules() if isinstance(m, STRIPE_LAYERS)
    )


def count_ops_and_params(
    model: nn.Module, example_inputs: Any, include_indexes: bool = True, **kwargs
) -> Tuple[float, int]:
    """``(macs, params)`` of ``model`` for one forward of ``example_inputs`` (per batch, like torch-pruning).

    ``macs`` equals ``tp.utils.count_ops_and_params`` (the same registered hooks). ``params`` includes the stripe
    indexes unless ``include_indexes=False`` (then it equals torch-pruning's figure too). ``kwargs`` go to
    ``tp.utils.count_ops_and_params`` (e.g. ``layer_wise=True``, which then returns its 4-tuple with the
    totals adjusted).
    """
    register_counting()
    result = op_counter.count_ops_and_params(model, example_inputs, **kwargs)
    extra = stripe_index_count(model) if include_indexes else 0
    return (result[0], result[1] + extra, *result[2:])
