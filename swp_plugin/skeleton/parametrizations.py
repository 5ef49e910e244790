"""Training-time masks as ``torch.nn.utils.parametrize`` parametrizations.

* :class:`FilterSkeleton` multiplies a conv weight by its learnable Filter Skeleton (FS), one value per
  stripe, and by a persistent ``alive`` mask: a stripe whose |FS| fell under the threshold stays dead,
  whatever the optimizer does to its FS value afterwards (momentum, weight decay), so pruning it later
  changes nothing.
* :class:`ChannelMask` zeroes whole channels of a 1-D parameter (the affine weight/bias of the BatchNorm a
  conv feeds, or the conv's own bias) once every stripe of the filter that produces the channel is dead.

Both keep the model code untouched: the conv or norm still reads ``self.weight``.

:func:`copy_with_own_class` makes copies of a parametrized module independent: ``torch.nn.utils.parametrize``
gives the module a class of its own that holds the parametrized properties, and ``copy.deepcopy`` (timm's
``ModelEmaV3`` too) shares that class with the copy, so removing a parametrization from one (``step()``,
``detach_skeletons``) deletes the property from the other's class as well. It also gives that class a compact
``repr``: the layer's own line with its masks, ``Conv2d(3, 8, kernel_size=(3, 3), ..., [weight=FilterSkeleton(
shape=(8, 3, 3), alive=72/72)])``, as many lines as the plain layer (``tp.utils.print_tool`` compares models line
by line).
"""

from __future__ import annotations

import copy
from typing import Sequence

import torch
import torch.nn as nn
from torch.nn.modules.module import _addindent
from torch.nn.utils import parametrize


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


def _deepcopy_with_own_class(self: nn.Module, memo: dict) -> nn.Module:
    """``copy.deepcopy`` of a parametrized module whose replica gets a copy of the parametrized class."""
    found = memo.get(id(self))
    if found is not None:
        return found
    cls = type(self)
    own = type(cls.__name__, cls.__bases__, {k: v for k, v in cls.__dict__.items()
                                             if k not in ("__dict__", "__weakref__")})
    replica = own.__new__(own)
    memo[id(self)] = replica
    replica.__dict__ = copy.deepcopy(self.__dict__, memo)
    return replica


def _compact_repr(self: nn.Module) -> str:
    """The plain layer's ``repr`` with its parametrizations on its first line (see the module docstring)."""
    extra = self.extra_repr()
    marks = ", ".join(f"{tensor}={type(p).__name__}({p.extra_repr()})"
                      for tensor, chain in self.parametrizations.items() for p in chain)
    head = f"{parametrize.type_before_parametrizations(self).__name__}({extra}{', ' if extra else ''}[{marks}]"
    children = [f"({k}): {_addindent(repr(m), 2)}" for k, m in self._modules.items() if k != "parametrizations"]
    return head + (")" if not children else "\n  " + "\n  ".join(children) + "\n)")


def copy_with_own_class(module: nn.Module) -> None:
    """Make deep copies of the parametrized ``module`` independent of it, and its ``repr`` compact (see the module
    docstring); call after ``parametrize.register_parametrization``."""
    type(module).__deepcopy__ = _deepcopy_with_own_class
    type(module).__repr__ = _compact_repr
