"""The convert phase: merged convolutions become ``StripeConv2d`` (exactly), the stripe layers drop empty stripes."""

from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.nn as nn

from ..layers.padding import PLAIN_CONVS
from ..layers.stripe_conv import StripeConv2d
from ..skeleton.attach import probe_input
from ..utils import swap_module
from .notes import KEPT_DENSE, Note


def convert_to_stripes(model: nn.Module, names: Iterable[str], note: Callable[[Note], None] = lambda n: None
                       ) -> None:
    """Convert the convs ``names`` of ``model`` (skeletons merged) in place: a ``groups=1`` conv becomes a
    ``StripeConv2d`` of its stripes with a nonzero weight (hooks, mode and device kept), a ``StripeConv2d``
    drops its all-zero stripes; grouped convs and convs whose forward is not a plain convolution stay dense
    (reported through ``note``)."""
    modules = dict(model.named_modules())
    for name in names:
        layer = modules[name]
        if isinstance(layer, StripeConv2d):
            layer.select_stripes(layer.weight.detach().ne(0).any(dim=1))
        elif layer.groups != 1:
            note(Note(KEPT_DENSE, name, f"grouped conv (groups={layer.groups}) kept dense, dead stripes zeroed"))
        else:
            stripe = StripeConv2d.from_dense(layer)
            if same_function(layer, stripe):
                swap_module(model, layer, stripe)
            else:
                note(Note(KEPT_DENSE, name, f"{type(layer).__name__} forward differs from a plain conv; kept dense"))


@torch.no_grad()
def same_function(conv: nn.Conv2d, stripe: StripeConv2d) -> bool:
    """True for the conv classes known to be plain convolutions, else checked on a probe input."""
    if type(conv) in PLAIN_CONVS:
        return True
    x = probe_input(conv)
    return torch.allclose(stripe(x), conv(x), rtol=1e-4, atol=1e-5)
