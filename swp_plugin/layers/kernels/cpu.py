"""The compiled CPU stripe kernel (``stripe_cpu.cpp``): availability, stripe plan, autograd wrapper.

The kernel is an implicit GEMM over the shifted input: the stripes are grouped by kernel position into weight
panels (:func:`make_plan`, :func:`pack`), and each panel's 1x1 products over the input shifted by its position
are added straight into the output channels, with bias, an optional residual and ReLU in the epilogue (see
``stripe_cpu.cpp``). The kernel checks the plan at every call: a malformed one raises.
It is built at first use (:mod:`.build`: a child process with a time limit, a lock that dies with its owner);
when there is no compiler or the build fails or times out, :func:`available` is False (one warning) and
``StripeConv2d`` uses its pure-PyTorch paths. ``SWP_DISABLE_CPP=1`` (or :func:`set_enabled`) forces that.

Float32 on CPU only. Backward (for training through the kernel) is the dense convolution's backward with
the pruned stripes as zeros, gathered back to the kept stripes. Here nothing derived from the weights is cached:
:func:`stripe_conv_cpu` packs the stripe weights at each call (the deployed layer packs them once).
"""

from __future__ import annotations

import os
import threading
import warnings
from dataclasses import dataclass
from typing import Tuple

import torch
import torch.nn.functional as F

from ..layout import scatter_dense, standard_layout
from . import build

_lock = threading.Lock()
_state = {"loaded": None, "enabled": os.environ.get("SWP_DISABLE_CPP", "") in ("", "0"), "error": None}

#: epilogue activations of the kernel
ACTIVATIONS = {None: 0, "relu": 1}


def _env_cache_limit() -> int:
    """``SWP_KERNEL_CACHE_MB`` (MB of freed kernel blocks kept; default 256)."""
    text = os.environ.get("SWP_KERNEL_CACHE_MB", "") or "256"
    try:
        mb = int(text)
    except ValueError:
        mb = -1
    if mb < 0:
        raise ValueError(f"SWP_KERNEL_CACHE_MB must be a whole number of MB >= 0, got {text!r}")
    return mb << 20


#: the kernel's block cache (outputs and scratch buffers): most bytes of free blocks kept (see set_cache_limit)
_cache = {"limit": _env_cache_limit()}


def set_cache_limit(nbytes: int) -> int:
    """Keep at most ``nbytes`` of freed kernel outputs and scratch buffers for reuse (default 256 MB; 0: none,
    every block goes back to the C library at once); returns the previous limit. Large blocks handed back to the
    C library are returned to the system and fault in again page by page at their next use (a resnet18 stem
    call at batch 8 spent half its time so), which the cache avoids. ``swp_plugin.config.set_kernel_cache_limit``
    is the public switch."""
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
        raise ValueError(f"kernel cache limit: a number of bytes >= 0, got {nbytes!r}")
    previous, _cache["limit"] = _cache["limit"], nbytes
    if _state["loaded"]:
        torch.ops.swp_stripe.set_cache_limit(nbytes)
    return previous


def cache_limit() -> int:
    """Most bytes of freed kernel blocks kept for reuse (:func:`set_cache_limit`)."""
    return _cache["limit"]


def cached_bytes() -> int:
    """Bytes of freed kernel blocks held for reuse now (0 while the kernel is not loaded)."""
    return int(torch.ops.swp_stripe.cached_bytes()) if _state["loaded"] else 0


def set_enabled(enabled: bool) -> None:
    """Allow (default) or forbid the compiled kernel; forbidden, ``available()`` is False."""
    _state["enabled"] = bool(enabled)


def build_error() -> str | None:
    """Why the last build/load failed (None if it did not fail or was not tried)."""
    return _state["error"]


def available() -> bool:
    """True if the compiled kernel is enabled and loaded (builds it on the first call; never hangs: see
    :mod:`.build`)."""
    if not _state["enabled"]:
        return False
    if _state["loaded"] is None:
        with _lock:
            if _state["loaded"] is None:
                try:
                    if not hasattr(torch.ops.swp_stripe, "forward"):  # another copy of the package loaded it
                        build.load()
                        torch.library.register_fake("swp_stripe::forward")(_fake_forward)
                        torch.library.register_fake("swp_stripe::max_pool2d")(_fake_max_pool)
                    torch.ops.swp_stripe.set_cache_limit(_cache["limit"])
                    _state["loaded"] = True
                except Exception as error:  # no compiler, build error, time limit: fall back, say why once
                    _state["loaded"], _state["error"] = False, f"{type(error).__name__}: {error}"
                    warnings.warn(f"swp_plugin: compiled stripe kernel unavailable, using PyTorch paths "
                                  f"({_state['error'][:400]})", RuntimeWarning, stacklevel=3)
    return bool(_state["loaded"])


def _fake_forward(x, packed, panels, phases, bias, residual, out_channels, out_h, out_w, sh, sw, tile, act):
    """Shape of the op's output, for ``torch.compile`` / ``torch.export`` (fake tensors)."""
    return x.new_empty((x.shape[0], out_channels, out_h, out_w))


def _fake_max_pool(x, kh, kw, sh, sw, ph, pw):
    """Shape of the max pooling op's output (fake tensors)."""
    return x.new_empty((x.shape[0], x.shape[1], (x.shape[2] + 2 * ph - kh) // sh + 1,
                        (x.shape[3] + 2 * pw - kw) // sw + 1))


#: stripes (rows) of one weight panel of the kernel (``MR`` in ``stripe_cpu.cpp``)
PANEL_ROWS = 6
#: a panel's plan row: phase, row shift, column shift, rows, then ``PANEL_ROWS`` output channels
_HEAD = 4


@dataclass
class StripePlan:
    """Index layout of one layer for the kernel, for a given top/left zero padding (structure only).

    The stripes are grouped by kernel position into panels of at most :data:`PANEL_ROWS` (sizes balanced within
    a position, rows sorted by output channel). ``order`` ``(panels * PANEL_ROWS,)``: the stored stripe of each
    packed weight row (-1: padding); ``panels`` ``(panels, 4 + PANEL_ROWS)``: phase, row shift, column shift
    (in phase-image pixels), number of rows, each row's output channel; ``phases`` ``(P, 2)``: the stride phases
    (row, column offset) the panels read.
    """

    order: torch.Tensor
    panels: torch.Tensor
    phases: torch.Tensor


def make_plan(
    stripe_out: torch.Tensor,
    stripe_pos: torch.Tensor,
    out_channels: int,
    kernel_size: Tuple[int, int],
    stride: Tuple[int, int],
    dilation: Tuple[int, int],
    pad_top: int,
    pad_left: int,
) -> StripePlan:
    """Plan for stripes ``(stripe_out, stripe_pos)`` (sorted by position, then channel)."""
    stripe_out, stripe_pos = stripe_out.cpu().long(), stripe_pos.cpu().long()
    kw = kernel_size[1]
    (sh, sw), (dh, dw) = stride, dilation
    dy = (stripe_pos // kw) * dh - pad_top
    dx = (stripe_pos % kw) * dw - pad_left
    a, b = dy % sh, dx % sw
    qy, qx = (dy - a) // sh, (dx - b) // sw
    key = (a * sw + b) * (kernel_size[0] * kw) + stripe_pos  # phase, then position
    perm = torch.argsort(key * max(1, out_channels) + stripe_out, stable=True)
    keys = key[perm]
    phase_keys = torch.unique(a * sw + b)
    phase_index = {int(k): i for i, k in enumerate(phase_keys.tolist())}
    _, counts = torch.unique_consecutive(keys, return_counts=True)
    order, panels, start = [], [], 0
    for count in counts.tolist():
        sel = perm[start : start + count]
        s0 = int(sel[0])
        phase = phase_index[int(a[s0] * sw + b[s0])]
        num = -(-count // PANEL_ROWS)
        sizes = [count // num + (1 if i < count % num else 0) for i in range(num)]
        offset = 0
        for size in sizes:
            rows = sel[offset : offset + size]
            outs = stripe_out[rows].tolist()
            panels.append([phase, int(qy[s0]), int(qx[s0]), size] + outs + [outs[-1]] * (PANEL_ROWS - size))
            order.extend(rows.tolist() + [-1] * (PANEL_ROWS - size))
            offset += size
        start += count
    phases = torch.stack([phase_keys // sw, phase_keys % sw], 1) if phase_keys.numel() else torch.zeros(1, 2)
    return StripePlan(torch.tensor(order, dtype=torch.long),
                      torch.tensor(panels, dtype=torch.long).view(-1, _HEAD + PANEL_ROWS),
                      phases.long().contiguous())


def pack(weight: torch.Tensor, plan: StripePlan) -> torch.Tensor:
    """The stripe weights ``(S, C_in)`` in the kernel's panel layout ``(panels, C_in, PANEL_ROWS)`` (float32,
    padding rows zero)."""
    weight = weight.detach().float()
    padded = torch.cat([weight, weight.new_zeros(1, weight.shape[1])])
    rows = torch.where(plan.order >= 0, plan.order, weight.shape[0]).to(weight.device)
    return padded.index_select(0, rows).view(-1, PANEL_ROWS, weight.shape[1]).transpose(1, 2).contiguous()


def tile_pixels(in_channels: int, out_channels: int) -> int:
    """Output pixels per work item. Up to 256 channels in and out together, the item's input and output tiles
    (``(C_in + C_out) x T`` floats) take ~16 KB, at least 64 pixels: they stay in the L1 cache while the item's
    panels run over them (ResNet56 at batch 1 about 11% faster than with the L2-sized tiles, resnet18's 64- and
    128-channel 3x3 convs 1-5%). Wider layers keep tiles of ~512 KB (the L2 cache): their packed weights, read
    again by every item, cost more than the L1 misses (resnet18's 256- and 512-channel convs were 2-6% slower
    with 64-pixel tiles)."""
    channels = max(1, in_channels + out_channels)
    if channels <= 256:
        return max(64, (1 << 12) // channels)
    return max(64, min(4096, (1 << 17) // channels))


def kernel_forward(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, plan: StripePlan,
                   out_channels: int, out_hw: Tuple[int, int], stride: Tuple[int, int],
                   residual: torch.Tensor | None = None, act: str | None = None) -> torch.Tensor:
    """One call of the kernel (no autograd): ``x`` float32 CPU NCHW, ``packed`` from :func:`pack`."""
    return torch.ops.swp_stripe.forward(
        x, packed, plan.panels, plan.phases, None if bias is None else bias.detach(), residual, out_channels,
        out_hw[0], out_hw[1], stride[0], stride[1], tile_pixels(x.shape[1], out_channels), ACTIVATIONS[act])


class _StripeCpu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, plan, out_hw, stride, dilation, pad, dense_index, kernel_size, out_channels):
        ctx.save_for_backward(x, weight)
        ctx.meta = (bias is not None, stride, dilation, pad, dense_index, kernel_size, out_channels)
        return kernel_forward(x, pack(weight, plan), bias, plan, out_channels, out_hw, stride)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        has_bias, stride, dilation, pad, dense_index, (kh, kw), out_channels = ctx.meta
        dense = scatter_dense(weight, dense_index, out_channels, kh, kw)
        xp = F.pad(x, pad) if any(pad) else x
        grad_x, grad_w, grad_b = torch.ops.aten.convolution_backward(
            standard_layout(grad), standard_layout(xp), dense, [out_channels] if has_bias else None, list(stride),
            [0, 0], list(dilation), False, [0, 0], 1,
            [ctx.needs_input_grad[0], ctx.needs_input_grad[1], has_bias],
        )
        if grad_x is not None and any(pad):
            left, right, top, bottom = pad
            grad_x = grad_x[:, :, top : grad_x.shape[2] - bottom, left : grad_x.shape[3] - right]
        if grad_w is not None:
            grad_w = grad_w.permute(0, 2, 3, 1).reshape(-1, weight.shape[1]).index_select(0, dense_index)
        return grad_x, grad_w, grad_b if has_bias else None, None, None, None, None, None, None, None, None


def stripe_conv_cpu(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    plan: StripePlan,
    out_hw: Tuple[int, int],
    stride: Tuple[int, int],
    dilation: Tuple[int, int],
    pad: Tuple[int, int, int, int],
    dense_index: torch.Tensor,
    kernel_size: Tuple[int, int],
    out_channels: int,
) -> torch.Tensor:
    """Stripe convolution of ``x`` (float32 CPU NCHW, zero padding ``pad`` = (l, r, t, b) not applied yet;
    ``plan`` made for ``pad``'s top/left), differentiable. ``dense_index`` = ``stripe_out * kh * kw + stripe_pos``."""
    needs_grad = x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    if torch.is_grad_enabled() and needs_grad:
        return _StripeCpu.apply(x, weight, bias, plan, out_hw, stride, dilation, pad, dense_index, kernel_size,
                                out_channels)
    return kernel_forward(x, pack(weight, plan), bias, plan, out_channels, out_hw, stride)
