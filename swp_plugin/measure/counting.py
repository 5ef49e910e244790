"""MACs and parameters of a (stripe-pruned) model, on top of ``tp.utils.count_ops_and_params``.

Parameters follow the paper's convention: a ``StripeConv2d`` counts its kept stripes' weights
(``S x C_in``) plus its stripe index, one entry per (kept filter, kernel position): ``out x kh x kw``.
``include_indexes=False`` gives the weights-only figure.
"""

from __future__ import annotations

from typing import Any, Tuple

import torch
import torch.nn as nn
from torch_pruning.utils import op_counter

from ..layers.deployed import DeployedStripeConv2d
from ..layers.stripe_conv import StripeConv2d

#: the stripe layers: stripe weights ``(S, C_in)``, ``out_channels``, ``kernel_size``
STRIPE_LAYERS = (StripeConv2d, DeployedStripeConv2d)


def stripe_macs(module: nn.Module, output: torch.Tensor, bias: bool = False) -> int:
    """MACs of a stripe layer for ``output`` ``(N, out, H_out, W_out)``: ``N * H_out * W_out * S * C_in`` (plus
    ``out`` per position for the bias with ``bias=True``): the one definition every count and report uses."""
    positions = output.shape[0] * output.shape[2] * output.shape[3]
    macs = module.num_stripes * module.in_channels * positions
    if bias and module.bias is not None:
        macs += module.out_channels * positions
    return int(macs)


def stripe_conv_macs_hook(module: nn.Module, inputs, output) -> None:
    """torch-pruning counting hook of the stripe layers (bias included, as torch-pruning counts convs)."""
    module.__flops__ += stripe_macs(module, output, bias=True)


def _counting_hooks(model: nn.Module) -> dict:
    """Hooks for StripeConv2d and for subclasses of counted layers (timm's Conv2dSame, BatchNormAct2d,
    parametrized convs), which torch-pruning's counter looks up by exact type and would count as 0."""
    hooks = {cls: stripe_conv_macs_hook for cls in STRIPE_LAYERS}
    for module in model.modules():
        cls = type(module)
        if isinstance(module, STRIPE_LAYERS):  # subclasses too (the Triton layer)
            hooks[cls] = stripe_conv_macs_hook
        if cls in op_counter.MODULES_MAPPING or cls in hooks:
            continue
        for base in cls.__mro__[1:]:
            if base in op_counter.MODULES_MAPPING:
                hooks[cls] = op_counter.MODULES_MAPPING[base]
                break
    return hooks


def stripe_index_count(model: nn.Module) -> int:
    """Number of stripe-index entries of all ``StripeConv2d`` in ``model``: ``sum(out * kh * kw)``."""
    return sum(
        m.out_channels * m.kernel_size[0] * m.kernel_size[1] for m in model.modules() if isinstance(m, STRIPE_LAYERS)
    )


def count_ops_and_params(
    model: nn.Module, example_inputs: Any, include_indexes: bool = True, **kwargs
) -> Tuple[float, int]:
    """``(macs, params)`` of ``model`` for one forward of ``example_inputs`` (per batch, like torch-pruning).

    ``params`` includes the stripe indexes unless ``include_indexes=False``. ``kwargs`` go to
    ``tp.utils.count_ops_and_params`` (e.g. ``layer_wise=True``, which then returns its 4-tuple with the
    totals adjusted).
    """
    op_counter.CUSTOM_MODULES_MAPPING = _counting_hooks(model)
    result = op_counter.count_ops_and_params(model, example_inputs, **kwargs)
    extra = stripe_index_count(model) if include_indexes else 0
    return (result[0], result[1] + extra, *result[2:])
