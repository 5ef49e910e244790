"""Rebuilding a deployed model's structure from what :func:`~swp_plugin.deploy` recorded (``deploy_source``).

``swp_plugin.load`` of a deployed file calls :func:`rebuild` on a fresh model that already has the recorded
pre-deploy structure (stripe layers, channel counts), then loads the file's tensors into the result. Nothing is
measured and nothing runs on the file's data: the graph passes of :func:`deploy` run on placeholder weights and
valid placeholder stripes (the fused epilogues are found with shapes propagated by fake tensors), each layer gets
the recorded implementation, and the kernel plans are derived from the stripe indexes only when
``load_state_dict`` has checked them (:class:`~swp_plugin.layers.deployed.DeployedStripeConv2d`).
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn as nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.shape_prop import ShapeProp

from ..layers.checks import placeholder_stripes
from ..layers.deployed import DeployedStripeConv2d
from ..layers.stripe_conv import StripeConv2d
from .graph import fold_batchnorms, fuse_epilogues, trace
from .pipeline import _candidates, _fold_without_trace, _swap, swap_max_pools

IMPLEMENTATIONS = ("kernel", "dense")


def _placeholder(layer: nn.Module, num_stripes: int) -> StripeConv2d:
    """A stripe layer of ``layer``'s configuration with ``num_stripes`` valid placeholder stripes."""
    if isinstance(layer, StripeConv2d):
        stripe = layer
        with torch.no_grad():
            stripe.weight = nn.Parameter(stripe.weight.new_zeros(num_stripes, stripe.in_channels))
    else:
        kh, kw = layer.kernel_size
        mask = torch.zeros(layer.out_channels * kh * kw, dtype=torch.bool)
        mask[:num_stripes] = True  # stored order is position-major: the first keys are valid stripes
        mask = mask.view(kh * kw, layer.out_channels).t().reshape(layer.out_channels, kh, kw)
        stripe = StripeConv2d.from_dense(layer, mask=mask)
    stripe.stripe_out, stripe.stripe_pos = placeholder_stripes(num_stripes, stripe.out_channels)
    stripe._refresh()
    return stripe


@torch.no_grad()
def rebuild(model: nn.Module, example: Sequence[Tuple[Sequence[int], torch.dtype]], choices: Dict[str, str],
            num_stripes: Dict[str, int], dense_convs: bool = True, fuse: bool = True) -> nn.Module:
    """The deployed structure of ``model`` (changed in place where it is not traced) for the recorded
    ``choices`` (layer -> ``'kernel'`` / ``'dense'``; a layer not named is dense) and ``example`` input
    ``(shape, dtype)`` pairs; ``num_stripes``: stripes of each kernel layer (from the file's weights). Weights are
    placeholders: load the state dict into the result. Raises ``ValueError`` for a choice of no such layer."""
    for m in model.modules():  # valid structure-only stripes, and no kernel while the passes run
        if isinstance(m, StripeConv2d):
            m.stripe_out, m.stripe_pos = placeholder_stripes(m.num_stripes, m.out_channels)
            m.backend = "dense"
            m._refresh()
    deployed: nn.Module = model.eval()
    try:
        deployed, traced = trace(deployed), True
    except Exception:  # as deploy(): the module tree as it is
        traced = False
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    if fuse:
        if traced:
            fold_batchnorms(deployed)
        else:  # a forward on placeholder weights (dense backend)
            _fold_without_trace(deployed, tuple(torch.zeros(tuple(s), dtype=d) for s, d in example))
    layers = _candidates(deployed, dense_convs)
    unknown = sorted(set(choices) - set(layers))
    if unknown:
        raise ValueError(f"choices name layers the model has no deployable conv for: {unknown[:5]}")
    kernel: List[str] = []
    for name, layer in layers.items():
        if choices.get(name, "dense") == "kernel":
            _swap(deployed, name, DeployedStripeConv2d.from_stripe(_placeholder(layer, num_stripes[name])))
            kernel.append(name)
        elif isinstance(layer, StripeConv2d):
            _swap(deployed, name, layer.to_dense())
    swap_max_pools(deployed)
    if fuse and traced and kernel:
        with fake:
            inputs = [torch.empty(tuple(s), dtype=d) for s, d in example]
        ShapeProp(deployed, fake_mode=fake).propagate(*inputs)
        fuse_epilogues(deployed)
    return deployed
