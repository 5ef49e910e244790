"""The compiled CPU stripe kernel (``stripe_cpu.cpp``): availability, stripe plan, autograd wrapper.

The kernel computes, per cache-sized tile of the output and per stride phase, one GEMM of all the phase's
stripes with the (unshifted) input rows, then the shifted sum of each output channel's stripe rows
(output-side shift-add, see ``stripe_cpu.cpp``), with bias, an optional residual and ReLU in the epilogue.
It is built at first use (:mod:`.build`: a child process with a time limit, a lock that dies with its owner);
when there is no compiler or the build fails or times out, :func:`available` is False (one warning) and
``StripeConv2d`` uses its pure-PyTorch paths. ``SWP_DISABLE_CPP=1`` (or :func:`set_enabled`) forces that.

Float32 on CPU only. Backward (for training through the kernel) is the dense convolution's backward with
the pruned stripes as zeros, gathered back to the kept stripes. Nothing derived from the weights is cached:
the kernel reads the stripe weights as they are at each call.
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
                    _state["loaded"] = True
                except Exception as error:  # no compiler, build error, time limit: fall back, say why once
                    _state["loaded"], _state["error"] = False, f"{type(error).__name__}: {error}"
                    warnings.warn(f"swp_plugin: compiled stripe kernel unavailable, using PyTorch paths "
                                  f"({_state['error'][:400]})", RuntimeWarning, stacklevel=3)
    return bool(_state["loaded"])


def _fake_forward(x, weight, rows, phase_info, ptr, entries, bias, residual, out_h, out_w, sh, sw, tile, act):
    """Shape of the op's output, for ``torch.compile`` / ``torch.export`` (fake tensors)."""
    return x.new_empty((x.shape[0], ptr.shape[0] - 1, out_h, out_w))


@dataclass
class StripePlan:
    """Index layout of one layer for the kernel, for a given top/left zero padding (structure only).

    ``perm``: stripe order of the kernel (grouped by stride phase), None when it is the stored order;
    ``phase_info`` ``(P, 6)``: phase row/col, first row in kernel order, count, min/max row shift; ``ptr``
    ``(O+1)`` and ``entries`` ``(S, 4)``: per output channel (CSR) its stripes' local row in the phase, row
    shift, column shift, phase.
    """

    perm: torch.Tensor | None
    phase_info: torch.Tensor
    ptr: torch.Tensor
    entries: torch.Tensor


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
    stripe_out, stripe_pos = stripe_out.cpu(), stripe_pos.cpu()
    kw = kernel_size[1]
    (sh, sw), (dh, dw) = stride, dilation
    dy = (stripe_pos // kw) * dh - pad_top
    dx = (stripe_pos % kw) * dw - pad_left
    a, b = dy % sh, dx % sw
    qy, qx = (dy - a) // sh, (dx - b) // sw
    phase_key = a * sw + b
    num = stripe_out.numel()
    perm = torch.argsort(phase_key, stable=True)
    keys = phase_key[perm]
    uniq, counts = torch.unique_consecutive(keys, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    phase_of, local = torch.empty(num, dtype=torch.long), torch.empty(num, dtype=torch.long)
    rows = []
    for p, (k, s, c) in enumerate(zip(uniq.tolist(), starts.tolist(), counts.tolist())):
        sel = perm[s : s + c]
        rows.append([k // sw, k % sw, s, c, int(qy[sel].min()), int(qy[sel].max())])
        phase_of[s : s + c] = p
        local[s : s + c] = torch.arange(c)
    phase_info = torch.tensor(rows, dtype=torch.long).view(-1, 6)
    outs = stripe_out[perm]
    entries = torch.stack([local, qy[perm], qx[perm], phase_of], 1)
    entries = entries[torch.argsort(outs, stable=True)].contiguous()
    ptr = torch.zeros(out_channels + 1, dtype=torch.long)
    ptr[1:] = torch.cumsum(torch.bincount(outs, minlength=out_channels), 0)
    identity = bool(torch.equal(perm, torch.arange(num)))
    return StripePlan(None if identity else perm, phase_info, ptr, entries)


def tile_pixels(num_stripes: int, in_channels: int) -> int:
    """Output pixels per tile: the tile's GEMM operands (``(S + C) x T`` floats) stay within ~1 MB."""
    return max(64, min(4096, (1 << 18) // max(1, num_stripes + in_channels)))


def kernel_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, plan: StripePlan,
                   out_hw: Tuple[int, int], stride: Tuple[int, int], residual: torch.Tensor | None = None,
                   act: str | None = None) -> torch.Tensor:
    """One call of the kernel (no autograd): ``x`` float32 CPU NCHW, ``weight`` ``(S, C)`` in stored order."""
    return torch.ops.swp_stripe.forward(
        x, weight.detach(), plan.perm, plan.phase_info, plan.ptr, plan.entries, None if bias is None else bias.detach(),
        residual, out_hw[0], out_hw[1], stride[0], stride[1], tile_pixels(weight.shape[0], weight.shape[1]),
        ACTIVATIONS[act])


class _StripeCpu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, plan, out_hw, stride, dilation, pad, dense_index, kernel_size, out_channels):
        ctx.save_for_backward(x, weight)
        ctx.meta = (bias is not None, stride, dilation, pad, dense_index, kernel_size, out_channels)
        return kernel_forward(x, weight, bias, plan, out_hw, stride)

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
) -> torch.Tensor:
    """Stripe convolution of ``x`` (float32 CPU NCHW, zero padding ``pad`` = (l, r, t, b) not applied yet;
    ``plan`` made for ``pad``'s top/left), differentiable. ``dense_index`` = ``stripe_out * kh * kw + stripe_pos``."""
    out_channels = plan.ptr.numel() - 1
    needs_grad = x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    if torch.is_grad_enabled() and needs_grad:
        return _StripeCpu.apply(x, weight, bias, plan, out_hw, stride, dilation, pad, dense_index, kernel_size,
                                out_channels)
    return kernel_forward(x, weight, bias, plan, out_hw, stride)
