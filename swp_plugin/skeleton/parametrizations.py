"""Training-time masks as ``torch.nn.utils.parametrize`` parametrizations.

* :class:`FilterSkeleton` multiplies a conv weight by its learnable Filter Skeleton (FS), one value per
  stripe, and by a persistent ``alive`` mask: a stripe whose |FS| fell under the threshold stays dead,
  whatever the optimizer does to its FS value afterwards (momentum, weight decay), so pruning it later
  changes nothing.
* :class:`ChannelMask` zeroes whole channels of a 1-D parameter (the affine weight/bias of the BatchNorm a
  conv feeds, or the conv's own bias) once every stripe of the filter that produces the channel is dead.

Both keep the model code untouched: the conv or norm still reads ``self.weight``.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn


class FilterSkeleton(nn.Module):
    """``weight -> weight * (skeleton * alive)[:, None]``.

    Shapes: for an ``nn.Conv2d`` weight ``(out, C_in/g, kh, kw)`` the skeleton is ``(out, kh, kw)``; for a
    ``StripeConv2d`` weight ``(S, C_in)`` it is ``(S,)`` (one value per kept stripe).
    """

    def __init__(self, shape: Sequence[int], device=None, dtype=None) -> None:
        super().__init__()
        self.skeleton = nn.Parameter(torch.ones(tuple(shape), device=device, dtype=dtype))
        self.register_buffer("alive", torch.ones(tuple(shape), dtype=torch.bool, device=device))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * (self.skeleton * self.alive).unsqueeze(1)

    def extra_repr(self) -> str:
        return f"shape={tuple(self.skeleton.shape)}, alive={int(self.alive.sum())}/{self.alive.numel()}"


class ChannelMask(nn.Module):
    """``tensor -> tensor * mask`` with a persistent bool ``mask`` of shape ``(C,)``."""

    def __init__(self, num_channels: int, device=None) -> None:
        super().__init__()
        self.register_buffer("mask", torch.ones(num_channels, dtype=torch.bool, device=device))

    def forward(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor * self.mask

    def extra_repr(self) -> str:
        return f"alive={int(self.mask.sum())}/{self.mask.numel()}"
