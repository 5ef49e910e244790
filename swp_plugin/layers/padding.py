"""Padding of a convolution as an explicit ``(left, right, top, bottom)`` tuple.

``StripeConv2d`` runs its stripes on a padded input, so it needs the exact padding the dense convolution
used: symmetric integers, PyTorch's ``padding='same'`` (extra pixel on the right/bottom), ``'valid'``, or
timm's TensorFlow-like dynamic 'SAME' padding (:class:`timm.layers.Conv2dSame`), which depends on the
input size.
"""

from __future__ import annotations

from typing import Tuple, Union

import torch.nn as nn
from timm.layers.conv2d_same import Conv2dSame, Conv2dSameExport
from timm.layers.padding import pad_same_arg

PaddingSpec = Union[str, Tuple[int, int]]

#: Conv classes whose padding is TensorFlow-like 'SAME', computed from the input size at each forward.
DYNAMIC_SAME_CONVS: Tuple[type, ...] = (Conv2dSame, Conv2dSameExport)

#: Conv classes whose forward is a plain convolution of ``weight`` and ``bias`` (only the padding differs): a
#: weight mask holds, BatchNorm folds, ``StripeConv2d`` reproduces them.
PLAIN_CONVS: Tuple[type, ...] = (nn.Conv2d,) + DYNAMIC_SAME_CONVS


def is_dynamic_same(conv: nn.Module) -> bool:
    """True for a conv that pads TF-'SAME' from the input size (timm ``Conv2dSame``, ``StdConv2dSame``...)."""
    return isinstance(conv, DYNAMIC_SAME_CONVS) or bool(getattr(conv, "same_pad", False))


def static_padding(
    padding: PaddingSpec, kernel_size: Tuple[int, int], dilation: Tuple[int, int]
) -> Tuple[int, int, int, int]:
    """Return ``(left, right, top, bottom)`` for a static padding spec of ``nn.Conv2d``."""
    if padding == "valid":
        return (0, 0, 0, 0)
    if padding == "same":
        pads = []
        for k, d in zip(reversed(kernel_size), reversed(dilation), strict=False):  # width first, like F.pad
            total = d * (k - 1)
            pads += [total // 2, total - total // 2]
        return tuple(pads)  # type: ignore[return-value]
    ph, pw = padding
    return (pw, pw, ph, ph)


def dynamic_same_padding(
    input_size: Tuple[int, int],
    kernel_size: Tuple[int, int],
    stride: Tuple[int, int],
    dilation: Tuple[int, int],
) -> Tuple[int, int, int, int]:
    """TensorFlow-like 'SAME' padding for an input of spatial size ``(H, W)`` (timm's rule)."""
    return tuple(pad_same_arg(list(input_size), list(kernel_size), list(stride), list(dilation)))  # type: ignore[return-value]
