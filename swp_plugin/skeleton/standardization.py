"""Weight-standardised convolutions (timm ``StdConv2d`` / ``ScaledStdConv2d``) made stripe-prunable.

These convs standardise their weight in ``forward`` (zero mean, unit variance per filter), which would turn a
masked stripe back into a nonzero one. Before Filter Skeletons are attached, each one is replaced by a plain
``nn.Conv2d`` (``Conv2dSame`` for TF 'SAME' padding) whose weight carries the standardisation as a
:class:`WeightStandardization` parametrization; the Filter Skeleton then follows it in the chain:
``W -> standardise(W) * FS * alive``. Same function, same gradients (the raw weight and the gain stay the
trained parameters), and merging bakes the standardised, masked weight into a plain conv, exactly.
"""

from __future__ import annotations

from typing import Callable, Dict, Iterable, List, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import ScaledStdConv2d, ScaledStdConv2dSame, StdConv2d, StdConv2dSame
from timm.layers.conv2d_same import Conv2dSame
from torch.nn.utils import parametrize

from ..layers.padding import is_dynamic_same
from ..utils import swap_module
from .parametrizations import copy_with_own_class


class WeightStandardization(nn.Module):
    """``W (out, C_in/g, kh, kw) -> (W - mean_o) / sqrt(var_o + eps) * gain * scale``, per output filter ``o``.

    ``gain`` ``(out, 1, 1, 1)`` is the trained gain of a ``ScaledStdConv2d`` (``None`` for ``StdConv2d``).
    """

    def __init__(self, eps: float, gain: nn.Parameter | None = None, scale: float = 1.0) -> None:
        super().__init__()
        self.eps, self.scale = float(eps), float(scale)
        self.gain = gain

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        affine = None if self.gain is None else (self.gain * self.scale).view(-1)
        out = weight.shape[0]
        return F.batch_norm(weight.reshape(1, out, -1), None, None, weight=affine, training=True, momentum=0.0,
                            eps=self.eps).reshape_as(weight)

    def extra_repr(self) -> str:
        return f"eps={self.eps:g}, scaled={self.gain is not None}"


def _plain_conv(conv: nn.Conv2d) -> nn.Conv2d:
    """A plain conv (same geometry, sharing ``weight`` and ``bias``) that pads like ``conv``."""
    geometry = dict(stride=conv.stride, dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None)
    with torch.device("meta"):
        if is_dynamic_same(conv):
            plain = Conv2dSame(conv.in_channels, conv.out_channels, conv.kernel_size, **geometry)
        else:
            plain = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, padding=conv.padding,
                              padding_mode=conv.padding_mode, **geometry)
    plain.weight, plain.bias = conv.weight, conv.bias
    plain.train(conv.training)
    return plain


def _std(conv: StdConv2d) -> WeightStandardization:
    return WeightStandardization(conv.eps)


def _scaled_std(conv: ScaledStdConv2d) -> WeightStandardization:
    return WeightStandardization(conv.eps, conv.gain, conv.scale)


#: conv class -> the parametrization equivalent to its weight transform (checked with isinstance, in order).
STANDARDIZED_CONVS: Dict[type, Callable[[nn.Conv2d], WeightStandardization]] = {
    ScaledStdConv2dSame: _scaled_std,
    ScaledStdConv2d: _scaled_std,
    StdConv2dSame: _std,
    StdConv2d: _std,
}


def _standardization(conv: nn.Module) -> Callable[[nn.Conv2d], WeightStandardization] | None:
    if parametrize.is_parametrized(conv):
        return None
    return next((make for cls, make in STANDARDIZED_CONVS.items() if isinstance(conv, cls)), None)


def unfold_standardization(model: nn.Module, ignored: Iterable[nn.Module] = ()) -> List[Tuple[str, str]]:
    """Replace every weight-standardised conv of ``model`` (not in ``ignored``) by a plain conv whose weight
    carries a :class:`WeightStandardization` parametrization. The model computes the same function.

    Returns ``(qualified name, original class name)`` of each replaced conv.
    """
    ignored_ids = {id(m) for m in ignored}
    replaced, seen = [], set()
    for name, module in list(model.named_modules()):
        make = _standardization(module)
        if make is None or id(module) in ignored_ids or id(module) in seen:
            continue
        seen.add(id(module))
        plain = _plain_conv(module)
        parametrize.register_parametrization(plain, "weight", make(module))
        copy_with_own_class(plain)
        swap_module(model, module, plain)
        replaced.append((name, type(module).__name__))
    return replaced
