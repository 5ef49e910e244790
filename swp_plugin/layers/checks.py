"""Checks of a stripe layer's index tensors (the invariants the backends and the compiled kernel rely on).

A stripe layer keeps ``S`` stripes: ``stripe_out`` ``(S,)`` and ``stripe_pos`` ``(S,)`` int64, the stripes sorted
by kernel position, then by output channel, each stripe at most once; ``weight`` ``(S, C_in)``. Indexes that break
this (a damaged or edited file) make the backends compute different functions, or the kernel read out of bounds:
:func:`check_stripes` refuses them with a ``ValueError`` that names the problem and the first bad stripe.
"""

from __future__ import annotations

from typing import Tuple

import torch


def check_stripes(stripe_out: torch.Tensor, stripe_pos: torch.Tensor, num_stripes: int, out_channels: int,
                  kernel_size: Tuple[int, int]) -> None:
    """Raise ``ValueError`` unless ``(stripe_out, stripe_pos)`` are ``num_stripes`` valid, sorted, unique stripes of
    a layer with ``out_channels`` filters of ``kernel_size``."""
    kh, kw = kernel_size
    for name, index, bound in (("stripe_out", stripe_out, out_channels), ("stripe_pos", stripe_pos, kh * kw)):
        if not isinstance(index, torch.Tensor) or index.dtype != torch.long or index.dim() != 1:
            got = f"{index.dtype} {tuple(index.shape)}" if isinstance(index, torch.Tensor) else type(index).__name__
            raise ValueError(f"{name} must be a 1-d int64 tensor, got {got}")
        if index.numel() != num_stripes:
            raise ValueError(f"{name} has {index.numel()} entries for {num_stripes} stripes (weight rows)")
        if num_stripes:
            low, high = int(index.min()), int(index.max())
            if low < 0 or high >= bound:
                bad = int(((index < 0) | (index >= bound)).nonzero()[0])
                raise ValueError(f"{name}[{bad}] = {int(index[bad])} is outside [0, {bound})")
    if num_stripes > 1:
        key = stripe_pos.cpu() * out_channels + stripe_out.cpu()  # stored order: position, then output channel
        step = key[1:] - key[:-1]
        if bool((step <= 0).any()):
            bad = int((step <= 0).nonzero()[0]) + 1
            what = "duplicates" if int(step[bad - 1]) == 0 else "is out of order after"
            raise ValueError(f"stripe {bad} (output channel {int(stripe_out[bad])}, position {int(stripe_pos[bad])}) "
                             f"{what} stripe {bad - 1}: stripes must be sorted by kernel position, then output "
                             "channel, each at most once")


def placeholder_stripes(num_stripes: int, out_channels: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(stripe_out, stripe_pos)`` of the first ``num_stripes`` stripes in stored order (valid for any layer with
    at least that many stripes): the structure of a layer whose indexes are loaded afterwards."""
    key = torch.arange(num_stripes, dtype=torch.long)
    return key % out_channels, key // out_channels
