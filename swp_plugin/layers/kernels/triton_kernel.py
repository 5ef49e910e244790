"""The Triton program of the stripe convolution (imported only where Triton is installed; see :mod:`.triton_stripe`).

One program computes a tile of ``BLOCK_O`` output channels x ``BLOCK_P`` output pixels (pixels flattened over
``(N, H_out, W_out)``). The tile's channels share a set of kernel positions (its *entries*, grouped by stripe
pattern in :func:`.triton_stripe.make_tile_plan`); per entry, the ``BLOCK_O x C_in`` stripes at that position
(gathered rows of the ``(S, C_in)`` stripe weights, zero where a channel of the tile lacks the stripe) multiply the
input pixels shifted by the entry's offset (``ih = oh * stride_h + dy``, ``iw = ow * stride_w + dx``: dilation and
the top/left zero padding are folded into ``dy``, ``dx``; zero padding is the load mask), accumulated in float32
in the output tile (an implicit GEMM over the kept stripes: no im2col, no ``K*K*N`` buffer). Epilogue:
``act(acc + bias + residual)`` stored in the output's dtype. Any strides (NCHW or channels_last) for the input,
the residual and the output.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction


def _stripe_conv_kernel(
    x_ptr, w_ptr, tile_ptr, entry_off_ptr, entry_rows_ptr, tile_out_ptr, bias_ptr, res_ptr, y_ptr,
    C, H, W, HO, WO, P, SH, SW, S, OC, E,
    sxn, sxc, sxh, sxw,
    syn, syc, syh, syw,
    srn, src, srh, srw,
    HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, RELU: tl.constexpr, FP32: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_O: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_p = tl.program_id(0)
    tile = tl.program_id(1)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = offs_p < P
    hw = HO * WO
    n = offs_p // hw
    rem = offs_p % hw
    oh = rem // WO
    ow = rem % WO
    x_img = n.to(tl.int64) * sxn
    offs_o = tl.arange(0, BLOCK_O)
    offs_c = tl.arange(0, BLOCK_C)
    acc = tl.full((BLOCK_O, BLOCK_P), 0.0, tl.float32)  # builtins only (no @jit helpers such as tl.zeros): the
    # same function runs compiled and interpreted in one process
    # every index read from the plan is clipped or masked to its range (S stripes, OC channels, E entries): a damaged
    # plan gives a wrong output, never an access out of bounds
    start = tl.minimum(tl.maximum(tl.load(tile_ptr + tile), 0), E)
    end = tl.minimum(tl.maximum(tl.load(tile_ptr + tile + 1), start), E)
    for e in range(start, end):
        dy = tl.load(entry_off_ptr + 2 * e)
        dx = tl.load(entry_off_ptr + 2 * e + 1)
        ih = oh * SH + dy
        iw = ow * SW + dx
        pix_ok = p_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        pix = x_img + ih.to(tl.int64) * sxh + iw.to(tl.int64) * sxw
        rows = tl.load(entry_rows_ptr + e * BLOCK_O + offs_o)
        row_ok = (rows >= 0) & (rows < S)
        w_row = rows.to(tl.int64) * C
        for c0 in range(0, C, BLOCK_C):
            cc = c0 + offs_c
            c_ok = cc < C
            w = tl.load(w_ptr + w_row[:, None] + cc[None, :], mask=row_ok[:, None] & c_ok[None, :], other=0.0)
            xt = tl.load(x_ptr + cc.to(tl.int64)[:, None] * sxc + pix[None, :], mask=c_ok[:, None] & pix_ok[None, :],
                         other=0.0)
            if UPCAST:  # the interpreter multiplies bfloat16 as integers: float32 there
                w = w.to(tl.float32)
                xt = xt.to(tl.float32)
            if FP32:
                acc = tl.dot(w, xt, acc, input_precision="ieee")
            else:
                acc = tl.dot(w, xt, acc)
    out_c = tl.load(tile_out_ptr + tile * BLOCK_O + offs_o)
    o_ok = (out_c >= 0) & (out_c < OC)
    if HAS_BIAS:
        b = tl.load(bias_ptr + out_c, mask=o_ok, other=0.0).to(tl.float32)
        acc = acc + b[:, None]
    mask = o_ok[:, None] & p_ok[None, :]
    n64 = n.to(tl.int64)
    c64 = out_c.to(tl.int64)
    if HAS_RES:
        r_off = (n64 * srn)[None, :] + (c64 * src)[:, None] + (oh.to(tl.int64) * srh + ow.to(tl.int64) * srw)[None, :]
        acc = acc + tl.load(res_ptr + r_off, mask=mask, other=0.0).to(tl.float32)
    if RELU:
        acc = tl.maximum(acc, 0.0)
    y_off = (n64 * syn)[None, :] + (c64 * syc)[:, None] + (oh.to(tl.int64) * syh + ow.to(tl.int64) * syw)[None, :]
    tl.store(y_ptr + y_off, acc.to(y_ptr.dtype.element_ty), mask=mask)


#: compiled for GPUs (the interpreter too when ``TRITON_INTERPRET=1`` was set before Triton was imported)
compiled = triton.jit(_stripe_conv_kernel)
#: Triton's interpreter (numpy on the host): the kernel on CPU tensors, for checking it on any machine
interpreted = InterpretedFunction(_stripe_conv_kernel)
