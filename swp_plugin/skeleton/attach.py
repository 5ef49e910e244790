"""Attaching Filter Skeletons to a model's convolutions, and taking them off again.

Which layers get a Filter Skeleton (FS):

* ``nn.Conv2d`` and its mask-safe subclasses (timm ``Conv2dSame``), any kernel shape; for a 1x1 conv the
  FS is one gate per filter. Grouped and depthwise convs get one too (a depthwise stripe is one weight):
  it lets whole filters die so their channels can be removed, but their surviving stripes stay in a
  dense kernel (no stripe kernel speeds up a grouped conv).
* :class:`~swp_plugin.layers.StripeConv2d` (a second round of stripe pruning): one FS value per kept stripe.
* Weight-standardised convs (timm ``StdConv2d``/``ScaledStdConv2d``): first replaced by a plain conv whose
  weight carries the standardisation as a parametrization (:mod:`.standardization`), so that the FS acts on
  the standardised weight. Unknown ``nn.Conv2d`` subclasses that override ``forward`` are probed: they get
  an FS only if their output is linear in the weight.
"""

from __future__ import annotations

from typing import Callable, Dict, Iterable, Tuple

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from ..layers.padding import PLAIN_CONVS
from ..layers.stripe_conv import StripeConv2d
from .parametrizations import ChannelMask, FilterSkeleton, copy_with_own_class
from .standardization import WeightStandardization, unfold_standardization

#: Conv classes left dense, with the reason shown to the user (empty by default; an extension point).
EXCLUDED_CONVS: Dict[type, str] = {}

#: nn.Conv2d subclasses known to use their weight like nn.Conv2d (only the padding differs).
MASK_SAFE_CONVS: Tuple[type, ...] = PLAIN_CONVS


def _conv_skeleton_shape(conv: nn.Conv2d) -> Tuple[int, ...]:
    return (conv.out_channels, *conv.kernel_size)


def _conv_filter_alive(conv: nn.Conv2d, stripes: torch.Tensor) -> torch.Tensor:
    return stripes.flatten(1).any(dim=1)


def _stripe_skeleton_shape(layer: StripeConv2d) -> Tuple[int, ...]:
    return (layer.num_stripes,)


def _stripe_filter_alive(layer: StripeConv2d, stripes: torch.Tensor) -> torch.Tensor:
    return layer.per_filter(stripes, "any")


#: layer type -> (FS shape, filter-alive reduction of a stripe mask). Checked with isinstance, in order.
SKELETON_LAYOUTS: Dict[type, Tuple[Callable, Callable]] = {
    StripeConv2d: (_stripe_skeleton_shape, _stripe_filter_alive),
    nn.Conv2d: (_conv_skeleton_shape, _conv_filter_alive),
}


def _layout(module: nn.Module) -> Tuple[Callable, Callable] | None:
    for cls, layout in SKELETON_LAYOUTS.items():
        if isinstance(module, cls):
            return layout
    return None


def filter_alive(module: nn.Module, stripes: torch.Tensor) -> torch.Tensor:
    """Reduce a stripe mask of ``module`` (FS-shaped) to a per-output-channel bool ``(out,)``."""
    return _layout(module)[1](module, stripes)


def probe_input(conv: nn.Conv2d, batch: int = 2) -> torch.Tensor:
    """A small seeded random input that every kernel position of ``conv`` sees."""
    gen = torch.Generator().manual_seed(0)
    extent = max(d * (k - 1) + 1 for k, d in zip(conv.kernel_size, conv.dilation, strict=False))
    size = extent + 2 * max(conv.stride) + 3
    return torch.randn(batch, conv.in_channels, size, size, generator=gen).to(conv.weight)


@torch.no_grad()
def _output_is_linear_in_weight(conv: nn.Conv2d) -> bool:
    """Probe: y(W*a) + y(W*b) - y(0) == y(W*(a+b)) for random per-stripe scales a, b (the FS's role)."""
    gen = torch.Generator().manual_seed(1)
    x = probe_input(conv)
    w = conv.weight.detach().clone()
    a, b = (torch.rand(w.shape[0], 1, *w.shape[2:], generator=gen).to(w) for _ in range(2))
    outputs = []
    try:
        for weight in (w * a, w * b, torch.zeros_like(w), w * (a + b)):
            conv.weight.copy_(weight)
            outputs.append(conv(x))
    finally:
        conv.weight.copy_(w)
    ya, yb, y0, y = outputs
    return torch.allclose(ya + yb - y0, y, rtol=1e-4, atol=1e-5 * float(y.abs().max()) + 1e-6)


def ineligibility_reason(module: nn.Module) -> str | None:
    """Why ``module`` gets no Filter Skeleton, or ``None`` if it gets one."""
    if _layout(module) is None:
        return "not a 2-D convolution"
    if parametrize.is_parametrized(module, "weight") and not all(
            isinstance(p, WeightStandardization) for p in module.parametrizations["weight"]):
        return "its weight is already parametrized"
    for cls, reason in EXCLUDED_CONVS.items():
        if isinstance(module, cls):
            return reason
    cls = parametrize.type_before_parametrizations(module)
    if isinstance(module, nn.Conv2d) and cls not in MASK_SAFE_CONVS:
        if cls.forward is not nn.Conv2d.forward and not _output_is_linear_in_weight(module):
            return "its forward is not linear in its weight (the stripe mask would not hold); left dense"
    return None


def _is_other_conv(module: nn.Module) -> bool:
    """A convolution-like layer (``kernel_size`` and a weight) that is not 2-D ``nn.Conv2d`` (e.g. timm
    ``CondConv2d``, ``nn.ConvTranspose2d``, ``nn.Conv1d``)."""
    weight = getattr(module, "weight", None)
    return hasattr(module, "kernel_size") and isinstance(weight, torch.Tensor) and weight.dim() >= 2


def attach_skeletons(
    model: nn.Module, ignored: Iterable[nn.Module] = ()
) -> Tuple[Dict[str, FilterSkeleton], Dict[str, str]]:
    """Attach a :class:`FilterSkeleton` (init 1) to every eligible conv of ``model`` not in ``ignored``.

    Weight-standardised convs are first replaced by plain convs (:func:`unfold_standardization`).
    Returns ``(skeletons, skipped)``: qualified conv name -> FS parametrization module, and qualified
    name -> reason for each conv left without one.
    """
    unfold_standardization(model, ignored)
    ignored_ids = {id(m) for m in ignored}
    skeletons: Dict[str, FilterSkeleton] = {}
    skipped: Dict[str, str] = {}
    seen = set()
    for name, module in model.named_modules():
        if id(module) in seen:
            continue
        if _layout(module) is None:
            if _is_other_conv(module):  # a conv-like layer we cannot stripe-prune: say so
                seen.add(id(module))
                skipped[name] = f"{type(module).__name__} is not an nn.Conv2d (no stripe layout); left dense"
            continue
        seen.add(id(module))
        if id(module) in ignored_ids:
            skipped[name] = "in ignored_layers"
            continue
        reason = ineligibility_reason(module)
        if reason is not None:
            skipped[name] = reason
            continue
        weight = module.weight
        fs = FilterSkeleton(_layout(module)[0](module), device=weight.device, dtype=weight.dtype)
        parametrize.register_parametrization(module, "weight", fs)
        copy_with_own_class(module)
        skeletons[name] = fs
    return skeletons, skipped


def attach_channel_mask(module: nn.Module, tensor_name: str) -> ChannelMask:
    """Register a :class:`ChannelMask` on the 1-D parameter ``module.<tensor_name>`` and return it."""
    tensor = getattr(module, tensor_name)
    mask = ChannelMask(tensor.shape[0], device=tensor.device)
    parametrize.register_parametrization(module, tensor_name, mask)
    copy_with_own_class(module)
    return mask


def detach_skeletons(model: nn.Module, merge: bool = True) -> int:
    """Remove every Filter Skeleton and channel mask of swp_plugin from ``model``.

    ``merge=True`` bakes them into the weights (``W <- W * FS * alive``, masked norm params; a weight
    standardisation is baked in too, leaving a plain conv); ``merge=False`` restores the original tensors, as
    if no skeleton had been attached (a standardised conv keeps its standardisation parametrization).
    Returns the number of tensors freed.
    """
    ours = (FilterSkeleton, ChannelMask, WeightStandardization)
    count = 0
    for module in model.modules():
        if not parametrize.is_parametrized(module):
            continue
        for tensor_name in list(module.parametrizations.keys()):
            chain = list(module.parametrizations[tensor_name])
            if not all(isinstance(p, ours) for p in chain) or not any(
                    isinstance(p, (FilterSkeleton, ChannelMask)) for p in chain):
                continue
            parametrize.remove_parametrizations(module, tensor_name, leave_parametrized=merge)
            if not merge:
                for p in chain:
                    if isinstance(p, WeightStandardization):
                        parametrize.register_parametrization(module, tensor_name, p)
                        copy_with_own_class(module)
            count += 1
    return count


def skeleton_of(module: nn.Module) -> FilterSkeleton:
    """The :class:`FilterSkeleton` in the weight parametrizations of ``module``."""
    return next(p for p in module.parametrizations["weight"] if isinstance(p, FilterSkeleton))


def skeleton_input(module: nn.Module) -> torch.Tensor:
    """The weight the Filter Skeleton multiplies (after a weight standardisation, if any)."""
    weight = module.parametrizations["weight"].original
    for p in module.parametrizations["weight"]:
        if isinstance(p, FilterSkeleton):
            return weight
        weight = p(weight)
    return weight

