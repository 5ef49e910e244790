"""Memory layouts handed to PyTorch's convolution, and the dense kernel of a set of stripes.

PyTorch (2.13, oneDNN on CPU) picks its channels-last convolution when a weight or input *looks*
channels-last, and a tensor with a size-1 dimension can look both contiguous and channels-last: a
``(O, C, 1, 1)`` weight with strides ``(C, 1, C, C)`` passes ``is_contiguous()`` and is returned unchanged by
``.contiguous()``. The channels-last backward of a 1x1 convolution with unequal strides (e.g. ``(2, 1)``) and
more than one thread writes out of bounds (heap corruption; reproduction in docs/memory_safety.md). Everything
the stripe layers pass to PyTorch's convolution goes through :func:`standard_layout` first.
"""

from __future__ import annotations

from typing import Tuple

import torch


def row_major_strides(shape: Tuple[int, ...]) -> Tuple[int, ...]:
    """Strides of a row-major (C-contiguous) tensor of ``shape``, size-1 dims included."""
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


def standard_layout(t: torch.Tensor) -> torch.Tensor:
    """``t`` with exactly row-major strides (a copy only when its strides differ, e.g. channels-last or an
    ambiguous size-1 layout). Differentiable."""
    if t.stride() == row_major_strides(tuple(t.shape)):
        return t
    return t.clone(memory_format=torch.contiguous_format)


def scatter_dense(weight: torch.Tensor, dense_index: torch.Tensor, out_channels: int, kh: int, kw: int
                  ) -> torch.Tensor:
    """Dense kernel ``(out, C, kh, kw)`` (row-major) of stripes ``weight`` ``(S, C)`` at flat positions
    ``dense_index = stripe_out * kh * kw + stripe_pos``; pruned stripes are zeros. Differentiable."""
    flat = weight.new_zeros(out_channels * kh * kw, weight.shape[1]).index_copy(0, dense_index, weight)
    return standard_layout(flat.view(out_channels, kh, kw, -1).permute(0, 3, 1, 2))


def same_tensor(snapshot: torch.Tensor, tensor: torch.Tensor) -> bool:
    """Same dtype, device, shape and values (the check behind every cache of something derived from weights)."""
    return (snapshot.dtype == tensor.dtype and snapshot.device == tensor.device and snapshot.shape == tensor.shape
            and bool(torch.equal(snapshot, tensor)))
