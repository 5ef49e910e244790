"""Max pooling without PyTorch's slow CPU loop: ``SeparableMaxPool2d`` and ``NativeMaxPool2d`` (same function).

PyTorch's CPU max pooling of a contiguous NCHW tensor runs a scalar loop per window (and computes the argmax
indices too): on timm resnet18's stem pool (64 x 112 x 112, 3x3 stride 2), 3.4 ms at batch 1 on 2 threads,
a fifth of the deployed model's time. Taken apart into the maximum of ``kh`` strided row slices, then of ``kw``
strided column slices, it is a handful of vectorised elementwise maxima (0.5 ms there); :class:`NativeMaxPool2d`
runs the same two passes in one call of the compiled kernel's op ``swp_stripe::max_pool2d`` (a row buffer per
output row; float32 CPU, else the separable form). The maximum is exact in any order, so the result is the same
to the bit (NaN propagates as in ``F.max_pool2d``; the padding is ``-inf``, as max pooling's implicit padding
is). :func:`swp_plugin.deploy` swaps every ``nn.MaxPool2d`` it can (:func:`fast_max_pool`: the native form
where the compiled kernel is loaded); ONNX export writes one ``MaxPool`` node as before.
"""

from __future__ import annotations

from typing import Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import register_notrace_module
from torch.nn.modules.utils import _pair

from .kernels import cpu as cpu_kernel


def separable_max_pool(x: torch.Tensor, kernel_size: Tuple[int, int], stride: Tuple[int, int],
                       padding: Tuple[int, int]) -> torch.Tensor:
    """``F.max_pool2d(x, kernel_size, stride, padding)`` as row maxima then column maxima (scriptable)."""
    (kh, kw), (sh, sw), (ph, pw) = kernel_size, stride, padding
    if ph + pw > 0:
        x = F.pad(x, [pw, pw, ph, ph], value=float("-inf"))
    out_h = (x.shape[2] - kh) // sh + 1
    out_w = (x.shape[3] - kw) // sw + 1
    if out_h < 1 or out_w < 1:  # smaller than the window: max pooling's own error
        return F.max_pool2d(x, kernel_size, stride, 0)
    rows = x[:, :, 0 : (out_h - 1) * sh + 1 : sh]
    for i in range(1, kh):
        rows = torch.maximum(rows, x[:, :, i : i + (out_h - 1) * sh + 1 : sh])
    y = rows[:, :, :, 0 : (out_w - 1) * sw + 1 : sw]
    for j in range(1, kw):
        y = torch.maximum(y, rows[:, :, :, j : j + (out_w - 1) * sw + 1 : sw])
    return y.contiguous()


class SeparableMaxPool2d(nn.Module):
    """Max pooling (dilation 1, floor mode, no indices) as row maxima then column maxima.

    Shapes: ``x`` ``(N, C, H, W)`` floating point -> ``(N, C, (H + 2 ph - kh) // sh + 1, (W + 2 pw - kw) // sw + 1)``.
    """

    def __init__(self, kernel_size, stride=None, padding=0) -> None:
        super().__init__()
        self.kernel_size: Tuple[int, int] = _pair(kernel_size)
        self.stride: Tuple[int, int] = _pair(stride if stride is not None else kernel_size)
        self.padding: Tuple[int, int] = _pair(padding)
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        if min(kh, kw, sh, sw) < 1 or min(ph, pw) < 0 or 2 * ph > kh or 2 * pw > kw:
            raise ValueError(f"SeparableMaxPool2d: kernel {self.kernel_size}, stride {self.stride}, padding "
                             f"{self.padding}: kernel and stride must be >= 1, padding at most half the kernel")

    @classmethod
    def from_pool(cls, pool: nn.Module) -> SeparableMaxPool2d | None:
        """The separable form of ``pool`` (an ``nn.MaxPool2d``), or None where it has none (dilation,
        ``ceil_mode``, ``return_indices``, another class)."""
        if type(pool) is not nn.MaxPool2d or pool.return_indices or pool.ceil_mode or _pair(pool.dilation) != (1, 1):
            return None
        try:
            return cls(pool.kernel_size, pool.stride, pool.padding)
        except ValueError:
            return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            if torch.onnx.is_in_onnx_export():  # one MaxPool node
                return F.max_pool2d(x, self.kernel_size, self.stride, self.padding)
        return separable_max_pool(x, self.kernel_size, self.stride, self.padding)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"


@register_notrace_module
class NativeMaxPool2d(SeparableMaxPool2d):
    """:class:`SeparableMaxPool2d` on the compiled kernel's op (float32 CPU inputs; the separable form else).
    Build it only where the kernel is loaded (:func:`fast_max_pool`): TorchScript resolves the op when it
    compiles the forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            if torch.onnx.is_in_onnx_export():  # one MaxPool node
                return F.max_pool2d(x, self.kernel_size, self.stride, self.padding)
        if x.device.type != "cpu" or x.dtype != torch.float32 or x.dim() != 4:
            return separable_max_pool(x, self.kernel_size, self.stride, self.padding)
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        return torch.ops.swp_stripe.max_pool2d(x, kh, kw, sh, sw, ph, pw)


def fast_max_pool(pool: nn.Module) -> SeparableMaxPool2d | None:
    """The fast form of ``pool`` (an ``nn.MaxPool2d``): native where the compiled kernel is loaded, separable
    otherwise; None where it has none (see :meth:`SeparableMaxPool2d.from_pool`)."""
    fast = SeparableMaxPool2d.from_pool(pool)
    if fast is None or not cpu_kernel.available():
        return fast
    return NativeMaxPool2d(fast.kernel_size, fast.stride, fast.padding)
