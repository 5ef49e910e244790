"""The stripe convolution as one TorchScript-compatible function: what a scripted or ``torch.fx``-traced
``StripeConv2d`` runs.

``StripeConv2d`` registers :func:`stripe_conv2d` with ``torch.fx.wrap``, so plain ``torch.fx.symbolic_trace``
(and every tracer built on it: torch.ao's FX quantization, torchvision's feature extractor) records a stripe
layer as one ``call_function`` node with its tensors as ``get_attr`` inputs, and ``torch.jit.script`` compiles
the same function. It computes the dense form (the stripes scattered into a dense kernel, one ``F.conv2d``):
the layer's function, differentiable; the per-shape backend choice of eager mode is Python state that a graph
does not carry (for speed use ``swp_plugin.deploy``).
"""

from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F


def _row_major(t: torch.Tensor) -> bool:
    """True if ``t`` has exactly row-major strides (see :mod:`.layout`: an ambiguous layout can crash PyTorch)."""
    expected = 1
    for d in range(t.dim() - 1, -1, -1):
        if t.stride(d) != expected:
            return False
        expected *= max(t.size(d), 1)
    return True


def _same_pad(size: int, kernel: int, stride: int, dilation: int) -> int:
    """TF-'SAME' total padding of one spatial dim (timm's ``get_same_padding``)."""
    return max((-(size // -stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)


def stripe_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],  # noqa: UP045 (TorchScript)
                  stripe_out: torch.Tensor, stripe_pos: torch.Tensor, out_channels: int, kernel_size: List[int],
                  stride: List[int], dilation: List[int], padding: List[int], same_dynamic: bool,
                  padding_mode: str) -> torch.Tensor:
    """Stripe convolution of ``x`` ``(N, C_in, H, W)`` with stripes ``weight`` ``(S, C_in)`` at
    ``(stripe_out, stripe_pos)`` ``(S,)``; ``padding`` is ``(left, right, top, bottom)`` (ignored with
    ``same_dynamic``: TF 'SAME' from the input size). Returns ``(N, out_channels, H_out, W_out)``."""
    kh, kw = kernel_size[0], kernel_size[1]
    pad = padding
    if same_dynamic:
        pad_h = _same_pad(x.size(-2), kh, stride[0], dilation[0])
        pad_w = _same_pad(x.size(-1), kw, stride[1], dilation[1])
        pad = [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2]
    if not _row_major(x):
        x = x.clone(memory_format=torch.contiguous_format)
    if pad[0] != 0 or pad[1] != 0 or pad[2] != 0 or pad[3] != 0:
        x = F.pad(x, pad, mode="constant" if padding_mode == "zeros" else padding_mode)
    flat = weight.new_zeros(out_channels * kh * kw, weight.size(1))
    flat = flat.index_copy(0, stripe_out * (kh * kw) + stripe_pos, weight)
    kernel = flat.view(out_channels, kh, kw, weight.size(1)).permute(0, 3, 1, 2)
    kernel = kernel.clone(memory_format=torch.contiguous_format)
    return F.conv2d(x, kernel, bias, stride, [0, 0], dilation)
