"""The Triton stripe convolution (inference): availability, tile plan, the registered op ``swp_triton::stripe_conv2d``.

The program (:mod:`.triton_kernel`) is an implicit GEMM over the kept stripes: a program owns ``BLOCK_O`` output
channels x ``BLOCK_P`` output pixels and accumulates, per kernel position of its channels, the stripes' 1x1
product with the shifted input pixels (zero padding by range: masked loads). :func:`make_tile_plan` groups the
output channels into tiles whose channels share their kernel positions (stripe patterns), so that a tile runs
few positions and few of its stripe slots are zeros.

Where it runs: CUDA tensors on the compiled kernel; CPU tensors under Triton's interpreter (numpy, very slow:
for checking the kernel on any machine, as the tests do), only when ``TRITON_INTERPRET=1`` is set or after
:func:`set_interpret` (elsewhere CPU tensors take the PyTorch paths). The interpreter is used explicitly for CPU
tensors, so it does not need ``TRITON_INTERPRET`` to be set before Triton is imported, and the same process can run
the compiled kernel on CUDA tensors; the program uses only Triton builtins for that.

float16, bfloat16 and float32 (float32 products in IEEE precision, no TF32: the deployed model must match the
dense one to 1e-4); NCHW and channels_last inputs, the output in the input's memory format. No autograd:
``StripeConv2d`` runs its PyTorch ``'stripe'`` path where gradients are needed.

The op has a fake implementation, so a model calling it traces, scripts (``torch.jit.script``) and compiles
(``torch.compile(fullgraph=True)``). :func:`available` is False (with :func:`unavailable_reason`) where Triton is
not installed; ``SWP_DISABLE_TRITON=1`` (or :func:`set_enabled`) forces that.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import List, Tuple

import torch
import torch.nn.functional as F

#: input dtypes the kernel computes (float32 accumulation)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: output channels per tile that the plan may choose (``tl.dot`` needs at least 16)
BLOCK_OS = (16, 32, 64)
#: a larger tile is taken while its zero stripe slots cost at most this factor over the smallest tile's
TILE_SLACK = 1.25
ACTIVATIONS = {None: 0, "relu": 1}

_state = {"enabled": os.environ.get("SWP_DISABLE_TRITON", "") in ("", "0"), "module": None, "error": None,
          "interpret": os.environ.get("TRITON_INTERPRET", "") == "1"}


def set_enabled(enabled: bool) -> None:
    """Allow (default) or forbid the Triton kernel; forbidden, :func:`available` is False."""
    _state["enabled"] = bool(enabled)


def set_interpret(enabled: bool) -> None:
    """Run the kernel on CPU tensors under Triton's interpreter (default: only when ``TRITON_INTERPRET=1``)."""
    _state["interpret"] = bool(enabled)


def _kernels():
    """The kernel module (imports Triton once), or None with the reason in ``_state['error']``."""
    if _state["module"] is None and _state["error"] is None:
        try:
            from . import triton_kernel

            _state["module"] = triton_kernel
        except Exception as error:  # Triton missing or broken: the kernel is unavailable, say why
            _state["error"] = f"{type(error).__name__}: {error}"
    return _state["module"]


def unavailable_reason(device: torch.device | str | None = None) -> str | None:
    """Why the kernel cannot run on ``device`` (None if it can)."""
    if not _state["enabled"]:
        return "disabled (SWP_DISABLE_TRITON=1 or set_enabled(False))"
    if _kernels() is None:
        return f"Triton cannot be imported ({_state['error']})"
    kind = torch.device(device).type if device is not None else "cuda"
    if kind == "cuda" and not torch.cuda.is_available():
        return "no CUDA device"
    if kind == "cpu" and not _state["interpret"]:
        return "CPU tensors run the Triton kernel only under its interpreter (TRITON_INTERPRET=1 or set_interpret)"
    if kind not in ("cuda", "cpu"):
        return f"no Triton kernel for {kind} tensors"
    return None


def available(device: torch.device | str | None = None) -> bool:
    """True if the kernel can run on ``device`` (default ``'cuda'``; ``'cpu'``: under the interpreter, if enabled)."""
    return unavailable_reason(device) is None


def applies(x: torch.Tensor) -> bool:
    """True if the kernel computes this input fast: a 4-D CUDA tensor of a supported dtype (CPU tensors run only
    under the interpreter, so they never count as fast)."""
    return x.dim() == 4 and x.device.type == "cuda" and x.dtype in DTYPES and available("cuda")


# ---------------------------------------------------------------------------------------------------- tile plan
@dataclass
class TilePlan:
    """Structure of one layer for the kernel (no weights), for a given top/left zero padding.

    ``tile_ptr`` ``(T+1,)``: the entries of tile ``t`` are ``tile_ptr[t]:tile_ptr[t+1]``; ``entry_offsets``
    ``(E, 2)``: the input row/column offset ``(dy, dx)`` of each entry's kernel position; ``entry_rows``
    ``(E, BLOCK_O)``: the stripe (row of the ``(S, C_in)`` weights) of each tile channel at that position, -1 where
    it has none; ``tile_out`` ``(T, BLOCK_O)``: the tile's output channels, -1 for unused slots. All int32.
    ``efficiency``: kept stripes / stripe slots the kernel multiplies (1.0 when tiles share their patterns).
    """

    tile_ptr: torch.Tensor
    entry_offsets: torch.Tensor
    entry_rows: torch.Tensor
    tile_out: torch.Tensor
    block_o: int
    efficiency: float

    def to(self, device: torch.device) -> TilePlan:
        move = {k: getattr(self, k).to(device) for k in ("tile_ptr", "entry_offsets", "entry_rows", "tile_out")}
        return TilePlan(**move, block_o=self.block_o, efficiency=self.efficiency)


def _group_channels(patterns: List[int], block_o: int) -> List[List[int]]:
    """Greedy tiles of at most ``block_o`` channels: seeded with the most frequent remaining pattern, filled with the
    patterns that grow the tile's union of kernel positions least (patterns inside it first)."""
    remaining: dict = {}
    for channel, pattern in enumerate(patterns):
        remaining.setdefault(pattern, []).append(channel)
    tiles = []
    while remaining:
        union, members = 0, []
        while remaining and len(members) < block_o:
            if not members:
                pick = max(remaining, key=lambda m: (len(remaining[m]), m.bit_count()))
            else:
                pick = min(remaining, key=lambda m: ((union | m).bit_count() - union.bit_count(), -len(remaining[m])))
            channels = remaining[pick]
            take = channels[: block_o - len(members)]
            members += take
            union |= pick
            if len(take) == len(channels):
                del remaining[pick]
            else:
                remaining[pick] = channels[len(take):]
        tiles.append(members)
    return tiles


def make_tile_plan(stripe_out: torch.Tensor, stripe_pos: torch.Tensor, out_channels: int,
                   kernel_size: Tuple[int, int], dilation: Tuple[int, int], pad_top: int, pad_left: int,
                   block_o: int | None = None) -> TilePlan:
    """Plan for stripes ``(stripe_out, stripe_pos)`` (``StripeConv2d``'s buffers). ``block_o``: channels per tile
    (default: the largest of :data:`BLOCK_OS` whose zero slots cost at most :data:`TILE_SLACK` over the best)."""
    kh, kw = kernel_size
    positions = kh * kw
    slot = torch.full((out_channels, positions), -1, dtype=torch.long)
    slot[stripe_out.cpu(), stripe_pos.cpu()] = torch.arange(stripe_out.numel())
    kept = (slot >= 0).tolist()
    patterns = [sum(1 << k for k, on in enumerate(row) if on) for row in kept]
    if block_o is None:
        candidates = [b for b in BLOCK_OS if b == BLOCK_OS[0] or b // 2 < out_channels]
        grouped = {b: _group_channels(patterns, b) for b in candidates}
        cost = {b: b * sum(_union(patterns, t).bit_count() for t in tiles) for b, tiles in grouped.items()}
        best = min(cost.values())
        block_o = max(b for b in candidates if cost[b] <= TILE_SLACK * best)
        tiles = grouped[block_o]
    else:
        if block_o not in BLOCK_OS:
            raise ValueError(f"block_o must be one of {BLOCK_OS}, got {block_o}")
        tiles = _group_channels(patterns, block_o)
    (dh, dw) = dilation
    ptr, offsets, rows, outs = [0], [], [], []
    for members in tiles:
        union = _union(patterns, members)
        for k in range(positions):
            if union >> k & 1:
                offsets.append([(k // kw) * dh - pad_top, (k % kw) * dw - pad_left])
                rows.append([int(slot[c, k]) for c in members] + [-1] * (block_o - len(members)))
        ptr.append(len(offsets))
        outs.append(members + [-1] * (block_o - len(members)))
    slots = block_o * len(offsets)
    return TilePlan(
        tile_ptr=torch.tensor(ptr, dtype=torch.int32),
        entry_offsets=torch.tensor(offsets, dtype=torch.int32).view(-1, 2),
        entry_rows=torch.tensor(rows, dtype=torch.int32).view(-1, block_o),
        tile_out=torch.tensor(outs, dtype=torch.int32).view(-1, block_o),
        block_o=block_o,
        efficiency=stripe_out.numel() / slots if slots else 1.0,
    )


def check_plan(tile_ptr: torch.Tensor, entry_offsets: torch.Tensor, entry_rows: torch.Tensor, tile_out: torch.Tensor,
               num_stripes: int, out_channels: int) -> str | None:
    """What is wrong with a tile plan (e.g. loaded from a file) for ``num_stripes`` stripes and ``out_channels``
    channels, None if nothing: shapes, ranges, every channel in one tile, every stripe read once. (The kernel
    masks every index it reads anyway: a bad plan cannot make it access memory out of bounds.)"""
    if entry_rows.dim() != 2 or entry_rows.shape[1] not in BLOCK_OS or tile_out.dim() != 2 \
            or tile_out.shape[1] != entry_rows.shape[1] or tile_ptr.shape != (tile_out.shape[0] + 1,) \
            or entry_offsets.shape != (entry_rows.shape[0], 2):
        return "shapes do not fit together"
    ptr = tile_ptr.long().cpu()
    if int(ptr[0]) != 0 or int(ptr[-1]) != entry_rows.shape[0] or bool((ptr[1:] < ptr[:-1]).any()):
        return "tile_ptr is not a non-decreasing 0..E index"
    outs, rows = tile_out.long().cpu(), entry_rows.long().cpu()
    if sorted(outs[outs >= 0].tolist()) != list(range(out_channels)) or bool((outs < -1).any()):
        return f"tile_out does not hold each of the {out_channels} output channels exactly once"
    if sorted(rows[rows >= 0].tolist()) != list(range(num_stripes)) or bool((rows < -1).any()):
        return f"entry_rows does not read each of the {num_stripes} stripes exactly once"
    return None


def _union(patterns: List[int], members: List[int]) -> int:
    union = 0
    for c in members:
        union |= patterns[c]
    return union


# ---------------------------------------------------------------------------------------------------- the op
def _output(x: torch.Tensor, out_channels: int, out_h: int, out_w: int) -> torch.Tensor:
    """The output tensor, in the input's memory format (channels_last when the input is unambiguously so)."""
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty((x.shape[0], out_channels, out_h, out_w), dtype=x.dtype, device=x.device, memory_format=fmt)


def _check(x, weight, tile_ptr, entry_offsets, entry_rows, tile_out, bias, residual, out_channels, out_h, out_w,
           stride_h, stride_w) -> None:
    def fail(what: str) -> None:
        raise ValueError(f"swp_triton::stripe_conv2d: {what}")

    if x.dim() != 4:
        fail(f"the input must be 4-D (N, C, H, W), got shape {tuple(x.shape)}")
    if x.dtype not in DTYPES or weight.dtype != x.dtype:
        fail(f"input and weights must share one of {DTYPES}, got {x.dtype} and {weight.dtype}")
    if weight.dim() != 2 or weight.shape[1] != x.shape[1]:
        fail(f"weights must be (S, C_in={x.shape[1]}), got {tuple(weight.shape)}")
    for name, t in (("tile_ptr", tile_ptr), ("entry_offsets", entry_offsets), ("entry_rows", entry_rows),
                    ("tile_out", tile_out)):
        if t.dtype != torch.int32 or t.device != x.device or not t.is_contiguous():
            fail(f"{name} must be contiguous int32 on {x.device}, got {t.dtype} on {t.device}")
    if entry_rows.dim() != 2 or entry_rows.shape[1] not in BLOCK_OS or tile_out.shape[1:] != entry_rows.shape[1:]:
        fail(f"entry_rows / tile_out must be (E, B) / (T, B) with B in {BLOCK_OS}")
    if tile_ptr.numel() != tile_out.shape[0] + 1 or entry_offsets.shape != (entry_rows.shape[0], 2):
        fail("tile_ptr must be (T+1,) and entry_offsets (E, 2) for the tiles and entries given")
    if min(out_h, out_w, stride_h, stride_w) < 1 or out_channels < 1:
        fail(f"bad output size / stride ({out_channels}, {out_h}, {out_w}) / ({stride_h}, {stride_w})")
    for name, t, shape in (("bias", bias, (out_channels,)), ("residual", residual,
                                                             (x.shape[0], out_channels, out_h, out_w))):
        if t is not None and (tuple(t.shape) != shape or t.device != x.device or not t.is_floating_point()):
            fail(f"{name} must be a float tensor of shape {shape} on {x.device}, got {tuple(t.shape)} on {t.device}")
    if weight.numel() and not weight.is_contiguous():
        fail("weights must be contiguous")


@torch.library.custom_op("swp_triton::stripe_conv2d", mutates_args=(), device_types=("cuda", "cpu"))
def stripe_conv2d(x: torch.Tensor, weight: torch.Tensor, tile_ptr: torch.Tensor, entry_offsets: torch.Tensor,
                  entry_rows: torch.Tensor, tile_out: torch.Tensor, bias: torch.Tensor | None,
                  residual: torch.Tensor | None, out_channels: int, out_h: int, out_w: int, stride_h: int,
                  stride_w: int, act: int) -> torch.Tensor:
    """``act(stripe_conv(x) + bias + residual)``, ``(N, out_channels, out_h, out_w)`` in ``x``'s memory format
    (see the module docstring; ``act``: 0 none, 1 ReLU). Built by :func:`conv` / the deployed layer."""
    _check(x, weight, tile_ptr, entry_offsets, entry_rows, tile_out, bias, residual, out_channels, out_h, out_w,
           stride_h, stride_w)
    reason = unavailable_reason(x.device)
    if reason is not None:
        raise RuntimeError(f"swp_triton::stripe_conv2d cannot run on {x.device}: {reason}")
    kernels = _kernels()
    y = _output(x, out_channels, out_h, out_w)
    n, c, h, w = x.shape
    pixels = n * out_h * out_w
    if pixels == 0:
        return y
    block_o = entry_rows.shape[1]
    on_gpu = x.device.type == "cuda"
    if on_gpu:
        block_p = 128 if pixels >= 16384 else 64
        block_c = max(16, min(64 if x.dtype != torch.float32 else 32, triton_next_pow2(c)))
    else:  # the interpreter pays per program and per operation, not per element: few, large blocks
        block_p = max(16, min(1024, triton_next_pow2(pixels)))
        block_c = max(16, min(512, triton_next_pow2(c)))
    res = residual if residual is not None else y
    grid = ((pixels + block_p - 1) // block_p, tile_out.shape[0])
    kernel = kernels.compiled if on_gpu else kernels.interpreted
    with torch.cuda.device(x.device) if on_gpu else contextlib.nullcontext():
        kernel[grid](
            x, weight if weight.numel() else x, tile_ptr, entry_offsets, entry_rows, tile_out,
            bias if bias is not None else y, res, y,
            c, h, w, out_h, out_w, pixels, stride_h, stride_w, weight.shape[0], out_channels, entry_rows.shape[0],
            *x.stride(), *y.stride(), *res.stride(),
            HAS_BIAS=bias is not None, HAS_RES=residual is not None, RELU=act == 1, FP32=x.dtype == torch.float32,
            UPCAST=not on_gpu and x.dtype == torch.bfloat16,
            BLOCK_O=block_o, BLOCK_P=block_p, BLOCK_C=block_c, num_warps=4,
        )
    return y


@stripe_conv2d.register_fake
def _fake(x, weight, tile_ptr, entry_offsets, entry_rows, tile_out, bias, residual, out_channels, out_h, out_w,
          stride_h, stride_w, act):
    return _output(x, out_channels, out_h, out_w)


def triton_next_pow2(v: int) -> int:
    """Smallest power of two >= ``v`` (``triton.next_power_of_2`` without importing Triton)."""
    return 1 << max(0, int(v) - 1).bit_length()


def runs(layer, x: torch.Tensor, device_types: Tuple[str, ...] = ("cuda", "cpu")) -> bool:
    """True if a ``StripeConv2d`` ``layer`` computes ``x`` with this kernel: a 4-D input of a kernel dtype equal to
    the weights', on one of ``device_types`` where the kernel is available, no gradient needed (no autograd)."""
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in layer.parameters()))
    return (x.device.type in device_types and x.dim() == 4 and x.dtype in DTYPES and layer.weight.dtype == x.dtype
            and not needs_grad and available(x.device))


def forward(layer, x: torch.Tensor, pad: Tuple[int, int, int, int], plans: dict) -> torch.Tensor:
    """``StripeConv2d`` ``layer`` on ``x`` with padding ``pad`` = (l, r, t, b) not applied yet (zero padding by
    range, other modes applied first); ``plans``: the layer's structure cache (tile plans per padding and device)."""
    if layer.padding_mode != "zeros" and any(pad):
        x, pad = F.pad(x, pad, mode=layer.padding_mode), (0, 0, 0, 0)
    left, right, top, bottom = pad
    (kh, kw), (sh, sw), (dh, dw) = layer.kernel_size, layer.stride, layer.dilation
    out_hw = ((x.shape[2] + top + bottom - dh * (kh - 1) - 1) // sh + 1,
              (x.shape[3] + left + right - dw * (kw - 1) - 1) // sw + 1)
    key = ("triton", top, left, x.device)
    plan = plans.get(key)
    if plan is None:
        plan = plans[key] = make_tile_plan(layer.stripe_out, layer.stripe_pos, layer.out_channels, layer.kernel_size,
                                           layer.dilation, top, left).to(x.device)
    return conv(x, layer.weight, layer.bias, plan, layer.out_channels, out_hw, layer.stride)


def conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, plan: TilePlan, out_channels: int,
         out_hw: Tuple[int, int], stride: Tuple[int, int], residual: torch.Tensor | None = None,
         act: str | None = None) -> torch.Tensor:
    """One call of the op (no autograd): ``x`` ``(N, C_in, H, W)`` not padded (``plan`` made for its zero padding),
    ``weight`` ``(S, C_in)``, ``plan`` on ``x``'s device; ``bias`` and ``residual`` in any float dtype."""
    return torch.ops.swp_triton.stripe_conv2d(
        x, weight.detach().contiguous(), plan.tile_ptr, plan.entry_offsets, plan.entry_rows, plan.tile_out,
        None if bias is None else bias.detach(), residual, out_channels, out_hw[0], out_hw[1], stride[0], stride[1],
        ACTIVATIONS[act])
