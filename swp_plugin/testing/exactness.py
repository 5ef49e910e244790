"""Helpers for exactness checks of stripe pruning (used by the tests and benchmarks/timm_coverage.py).

Random sparse skeletons, trained-like BatchNorm weights for them, one step of the documented training loop,
BatchNorm statistics that keep a random deep net's activations alive, and the relative error ``max|a - b| / max|a|``.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize

from ..layers.stripe_conv import StripeConv2d
from ..utils import swap_module


def calibrate_bn(model: nn.Module, x: torch.Tensor, passes: int = 3) -> None:
    """Set BatchNorm running stats to the statistics of ``model`` on ``x`` (noisy copies), then eval().

    Default running stats (mean 0, var 1) make a random deep net's features fade to ~0, which would hide
    errors; calibrated stats keep every layer's activations at unit scale.
    """
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _ in range(passes):
            model(x + 0.1 * torch.randn(x.shape, generator=gen).to(x))
    model.eval()


def randomize_skeletons(pruner, dead_stripes: float = 0.5, dead_filters: float = 0.0, seed: int = 0) -> None:
    """FS values uniform in (0.1, 1); a fraction of stripes set to exactly 0, every filter keeping one, then
    a fraction ``dead_filters`` of whole filters set to 0."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for fs in pruner.skeletons.values():
            values = 0.1 + 0.9 * torch.rand(fs.shape, generator=gen)
            values[torch.rand(fs.shape, generator=gen) < dead_stripes] = 0
            if fs.dim() > 1:  # keep a stripe in every filter (a 1x1 filter is a single stripe)
                flat = values.view(fs.shape[0], -1)
                empty = flat.eq(0).all(dim=1)
                flat[empty, torch.randint(flat.shape[1], (int(empty.sum()),), generator=gen)] = 0.5
            if dead_filters:
                values[torch.rand(fs.shape[0], generator=gen) < dead_filters] = 0
            fs.copy_(values)


@torch.no_grad()
def unzero_norm_weights(model: nn.Module, value: float = 1.0) -> int:
    """Set to ``value`` the affine weight of every BatchNorm of ``model`` whose weight is all zero (a zero-initialised
    residual branch: timm's ``zero_init_last``, RepViT's ``bn_weight_init=0``); the raw weight if a channel mask
    parametrizes it. Returns how many. Call it before :func:`randomize_skeletons`.

    Filters die in training, when no weight of a net is exactly zero any more. At random init with a random
    skeleton's dead filters, a residual channel whose producing filter is dead stays exactly zero through a stage
    while such a branch (alive, weight 0) still adds to it; every train-mode BatchNorm that then sees the channel as
    a constant multiplies its gradient by ``weight / sqrt(eps)`` (316 for 1, eps 1e-5), and the compounded gradient
    lands on those zero weights (``benchmarks/dead_channel_gradients.py``)."""
    count = 0
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
            weight = m.parametrizations.weight.original if parametrize.is_parametrized(m, "weight") else m.weight
            if not weight.any():
                weight.fill_(value)
                count += 1
    return count


def regularized_step(model: nn.Module, pruner, x: torch.Tensor, num_classes: int = 10, lr: float = 0.01,
                     loss_fn: Callable | None = None) -> None:
    """One step of the documented loop: forward, backward, ``pruner.regularize``, ``optimizer.step``.
    ``loss_fn(output, n)`` for models whose output is not logits ``(n, num_classes)`` (default: cross-entropy
    with labels ``arange(n) % num_classes``)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    model.train()
    y = model(x)
    loss = loss_fn(y, x.shape[0]) if loss_fn is not None else F.cross_entropy(y, torch.arange(x.shape[0]) % num_classes)
    optimizer.zero_grad()
    loss.backward()
    pruner.regularize(model)
    optimizer.step()


def outputs_around_step(model: nn.Module, pruner, x: torch.Tensor, features: bool = False):
    """Calibrate BatchNorm, then eval-mode outputs (and ``forward_features``) before and after ``pruner.step()``."""
    calibrate_bn(model, x)

    def outputs():
        with torch.no_grad():
            return (model(x), model.forward_features(x)) if features else (model(x),)

    before = outputs()
    pruner.step()
    return before, outputs()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max|a - b| / max|a|."""
    return float((a - b).abs().max() / a.abs().max())


def random_stripe_model(model: nn.Module, keep: float, seed: int = 0) -> nn.Module:
    """Replace every ``groups=1`` ``nn.Conv2d`` of ``model`` (in place) by a ``StripeConv2d`` keeping a random
    fraction ``keep`` of its stripes (each filter keeps at least one, so no channel goes). Returns ``model``.

    The latency benchmark's stand-in for a trained skeleton; same weights as the dense model, masked.
    """
    gen = torch.Generator().manual_seed(seed)
    convs = [m for m in model.modules()
             if isinstance(m, nn.Conv2d) and m.groups == 1 and type(m).forward is nn.Conv2d.forward]
    for conv in convs:
        out, _, kh, kw = conv.weight.shape
        mask = torch.rand(out, kh, kw, generator=gen) < keep
        empty = ~mask.view(out, -1).any(1)
        mask.view(out, -1)[empty, torch.randint(kh * kw, (int(empty.sum()),), generator=gen)] = True
        with torch.no_grad():
            conv.weight.mul_(mask[:, None].to(conv.weight))
        swap_module(model, conv, StripeConv2d.from_dense(conv, mask))
    return model
