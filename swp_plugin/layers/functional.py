"""Stripe convolution in plain PyTorch ops (the exportable form), shared by ``StripeConv2d`` and the deployed
layer (``swp_plugin.deployment.DeployedStripeConv2d``) when they are exported to ONNX or have no compiled kernel."""

from __future__ import annotations

from typing import List, Tuple

import torch
import torch.nn.functional as F

from .layout import standard_layout


def selection_matrix(stripe_out: torch.Tensor, out_channels: int, dtype: torch.dtype) -> torch.Tensor:
    """``(out, S, 1, 1)`` 0/1: stripe ``s`` feeds output channel ``stripe_out[s]``."""
    num = stripe_out.numel()
    sel = torch.zeros(out_channels, num, device=stripe_out.device, dtype=dtype)
    sel[stripe_out, torch.arange(num, device=stripe_out.device)] = 1
    return sel[:, :, None, None]


def position_counts(stripe_pos: torch.Tensor, kernel_size: Tuple[int, int]) -> List[int]:
    """Number of stripes at each kernel position ``i * kw + j`` (Python ints: static loops when tracing)."""
    kh, kw = kernel_size
    return [int(c) for c in torch.bincount(stripe_pos.cpu(), minlength=kh * kw)[: kh * kw]]


def stripe_conv_pytorch(x: torch.Tensor, weight: torch.Tensor, selection: torch.Tensor, bias: torch.Tensor | None,
                        counts: List[int], kernel_size: Tuple[int, int], stride: Tuple[int, int],
                        dilation: Tuple[int, int]) -> torch.Tensor:
    """Stripe convolution of the already padded ``x`` ``(N, C, H, W)`` with stripes ``weight`` ``(S, C)`` sorted by
    kernel position (``counts`` per position): per position a 1x1 conv of the strided, shifted window with that
    position's stripes; the partial sums (stripe order) are concatenated and routed to their output channels by
    a 1x1 conv with ``selection`` (no scatter: exports to ONNX Conv/Slice/Concat, which onnxruntime runs well).
    At least one stripe must be kept."""
    (kh, kw), (sh, sw), (dh, dw) = kernel_size, stride, dilation
    height, width = x.shape[-2:]
    out_h = (height - dh * (kh - 1) - 1) // sh + 1
    out_w = (width - dw * (kw - 1) - 1) // sw + 1
    parts, start = [], 0
    for pos, count in enumerate(counts):
        if count == 0:
            continue
        i, j = divmod(pos, kw)
        window = x[:, :, i * dh : i * dh + (out_h - 1) * sh + 1 : sh, j * dw : j * dw + (out_w - 1) * sw + 1 : sw]
        stripes = standard_layout(weight[start : start + count, :, None, None])
        parts.append(F.conv2d(standard_layout(window), stripes))
        start += count
    partial = parts[0] if len(parts) == 1 else torch.cat(parts, 1)
    return F.conv2d(partial, selection, bias)
