"""torch-pruning support for :class:`StripeConv2d`: a ``BasePruningFunc`` and the ``customized_pruners``
dict to hand to any torch-pruning pruner or ``DependencyGraph``::

    tp.pruner.BNScalePruner(model, example_inputs, ..., customized_pruners=swp_plugin.customized_pruners())
"""

from __future__ import annotations

from typing import Dict, Sequence

import torch.nn as nn
import torch_pruning as tp

from ..layers.stripe_conv import StripeConv2d


class StripeConvPruningFunc(tp.pruner.BasePruningFunc):
    """Removes output channels (with their stripes and bias) or input channels of a ``StripeConv2d``."""

    TARGET_MODULES = StripeConv2d

    def prune_out_channels(self, layer: StripeConv2d, idxs: Sequence[int]) -> nn.Module:
        layer.remove_out_channels(idxs)
        return layer

    def prune_in_channels(self, layer: StripeConv2d, idxs: Sequence[int]) -> nn.Module:
        layer.remove_in_channels(idxs)
        return layer

    def get_out_channels(self, layer: StripeConv2d) -> int:
        return layer.out_channels

    def get_in_channels(self, layer: StripeConv2d) -> int:
        return layer.in_channels


STRIPE_CONV_PRUNER = StripeConvPruningFunc()


def customized_pruners() -> Dict[type, tp.pruner.BasePruningFunc]:
    """``{StripeConv2d: pruning function}`` for torch-pruning's ``customized_pruners`` argument."""
    return {StripeConv2d: STRIPE_CONV_PRUNER}


def torch_pruning_kwargs() -> Dict[str, object]:
    """Options that let any torch-pruning pruner work on a stripe-pruned model::

        tp.pruner.BNScalePruner(model, x, importance=..., **swp_plugin.torch_pruning_kwargs())

    ``customized_pruners`` registers the pruning function of ``StripeConv2d``; ``root_module_types`` adds
    ``StripeConv2d`` to torch-pruning's default roots (convs, linears, LSTMs) so its groups are found.
    """
    return {
        "customized_pruners": customized_pruners(),
        "root_module_types": [tp.ops.TORCH_CONV, tp.ops.TORCH_LINEAR, tp.ops.TORCH_LSTM, StripeConv2d],
    }
