"""The compiled CPU stripe kernel (``stripe_cpu.cpp``): build at first use, stripe plan, autograd wrapper.

The kernel computes, per cache-sized tile of the output and per stride phase, one BLAS GEMM of all the
phase's stripes with the (unshifted) input rows, then the shifted sum of each output channel's stripe rows
(output-side shift-add, see ``stripe_cpu.cpp``). It is built with ``torch.utils.cpp_extension.load`` into
``$SWP_EXTENSIONS_DIR`` (default ``~/.cache/swp_plugin/extensions``) the first time it is needed, which
takes about 10 s with g++; when there is no compiler or the build fails, :func:`available` is False and
``StripeConv2d`` uses its pure-PyTorch paths. ``SWP_DISABLE_CPP=1`` (or :func:`set_enabled`) forces that.

Float32 on CPU only. Backward (for training through the kernel) is the dense convolution's backward with
the pruned stripes as zeros, gathered back to the kept stripes.
"""

from __future__ import annotations

import hashlib
import os
import platform
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Tuple

import torch
import torch.nn.functional as F

_SOURCE = Path(__file__).with_name("stripe_cpu.cpp")
_lock = threading.Lock()
_state = {"loaded": None, "enabled": os.environ.get("SWP_DISABLE_CPP", "") in ("", "0"), "error": None}


def set_enabled(enabled: bool) -> None:
    """Allow (default) or forbid the compiled kernel; forbidden, ``available()`` is False."""
    _state["enabled"] = bool(enabled)


def build_error() -> str | None:
    """Why the last build/load failed (None if it did not fail or was not tried)."""
    return _state["error"]


def _cpu_tag() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        flags = ""
    return platform.machine() + flags


def _build() -> bool:
    import logging

    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # "No CUDA runtime" notice
    from torch.utils import cpp_extension

    source = _SOURCE.read_bytes()
    key = hashlib.sha1(source + torch.__version__.encode() + _cpu_tag().encode()).hexdigest()[:12]
    root = Path(os.environ.get("SWP_EXTENSIONS_DIR", Path.home() / ".cache" / "swp_plugin" / "extensions"))
    build_dir = root / f"swp_stripe_cpu_{key}"
    build_dir.mkdir(parents=True, exist_ok=True)
    flags = ["-O3", "-fopenmp"] + (["-march=native"] if platform.machine() in ("x86_64", "AMD64") else [])
    cpp_extension.load(
        name=f"swp_stripe_cpu_{key}",
        sources=[str(_SOURCE)],
        extra_cflags=flags,
        extra_ldflags=["-fopenmp"],
        build_directory=str(build_dir),
        is_python_module=False,
        verbose=False,
    )
    return hasattr(torch.ops.swp_stripe, "forward")


def available() -> bool:
    """True if the compiled kernel is enabled and loaded (builds it on the first call)."""
    if not _state["enabled"]:
        return False
    if _state["loaded"] is None:
        with _lock:
            if _state["loaded"] is None:
                try:
                    _state["loaded"] = _build()
                except Exception as error:  # no compiler, no BLAS symbol, ...: fall back, say why once
                    _state["loaded"], _state["error"] = False, f"{type(error).__name__}: {error}"
                    warnings.warn(f"swp_plugin: compiled stripe kernel unavailable, using PyTorch paths "
                                  f"({_state['error'][:300]})", RuntimeWarning, stacklevel=3)
    return bool(_state["loaded"])


@dataclass
class StripePlan:
    """Index layout of one layer for the kernel, for a given top/left zero padding.

    ``perm``: packed stripe order (stripes grouped by stride phase), None when it is the stored order;
    ``phase_info`` ``(P, 6)``: phase row/col, first packed row, count, min/max row shift; ``ptr`` ``(O+1)``
    and ``entries`` ``(S, 4)``: per output channel (CSR) its stripes' local row in the phase, row shift,
    column shift, phase.
    """

    perm: torch.Tensor | None
    phase_info: torch.Tensor
    ptr: torch.Tensor
    entries: torch.Tensor
    packed: tuple | None = None


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


def packed_weight(weight: torch.Tensor, plan: StripePlan) -> torch.Tensor:
    """``weight`` in the kernel's layout; cached in ``plan`` while it is the same tensor object at the same
    version (a parametrized weight is a new tensor at every access, so it is packed every time)."""
    version = None if weight.is_inference() else weight._version  # inference tensors have no version
    if plan.packed is not None and plan.packed[0] is weight and version is not None and plan.packed[1] == version:
        return plan.packed[2]
    w = weight if plan.perm is None else weight.index_select(0, plan.perm.to(weight.device))
    with torch.no_grad():
        packed = torch.ops.swp_stripe.pack(w.detach(), plan.phase_info)
    plan.packed = (weight, version, packed) if version is not None else None
    return packed


def _forward(x, weight, bias, plan: StripePlan, out_hw, stride) -> torch.Tensor:
    return torch.ops.swp_stripe.forward(
        x, packed_weight(weight, plan), plan.phase_info, plan.ptr, plan.entries,
        None if bias is None else bias.detach(), out_hw[0], out_hw[1], stride[0], stride[1],
        tile_pixels(weight.shape[0], weight.shape[1]),
    )


class _StripeCpu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, plan, out_hw, stride, dilation, pad, dense_index, kernel_size, out_channels):
        ctx.save_for_backward(x, weight)
        ctx.meta = (bias is not None, stride, dilation, pad, dense_index, kernel_size, out_channels)
        return _forward(x, weight, bias, plan, out_hw, stride)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        has_bias, stride, dilation, pad, dense_index, (kh, kw), out_channels = ctx.meta
        flat = weight.new_zeros(out_channels * kh * kw, weight.shape[1]).index_copy_(0, dense_index, weight)
        dense = flat.view(out_channels, kh, kw, -1).permute(0, 3, 1, 2).contiguous()
        xp = F.pad(x, pad) if any(pad) else x
        grad_x, grad_w, grad_b = torch.ops.aten.convolution_backward(
            grad.contiguous(), xp, dense, [out_channels] if has_bias else None, list(stride), [0, 0],
            list(dilation), False, [0, 0], 1, [ctx.needs_input_grad[0], ctx.needs_input_grad[1], has_bias],
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
    ``plan`` made for ``pad``'s top/left). ``dense_index`` = ``stripe_out * kh * kw + stripe_pos``."""
    out_channels = plan.ptr.numel() - 1
    needs_grad = x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    if torch.is_grad_enabled() and needs_grad:
        return _StripeCpu.apply(x, weight, bias, plan, out_hw, stride, dilation, pad, dense_index, kernel_size,
                                out_channels)
    return _forward(x, weight, bias, plan, out_hw, stride)
