"""Padding of a convolution as an explicit ``(left, right, top, bottom)`` tuple.

``StripeConv2d`` runs its stripes on a padded input, so it needs the exact padding the dense convolution
used: symmetric integers, PyTorch's ``padding='same'`` (extra pixel on the right/bottom), ``'valid'``, or
timm's TensorFlow-like dynamic 'SAME' padding (:class:`timm.layers.Conv2dSame`), which depends on the
input size.
"""

from __future__ import annotations

from typing import Tuple, Union

from timm.layers.padding import pad_same_arg

PaddingSpec = Union[str, Tuple[int, int]]


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
