"""``TritonStripeConv2d``: a deployed stripe convolution on the Triton kernel (what ``deploy()`` picks on CUDA).

The GPU counterpart of :class:`~swp_plugin.layers.deployed.DeployedStripeConv2d` (a subclass: BatchNorm folding,
epilogue fusion, ONNX forms, MAC counting and ``to_stripe`` are the same). It keeps the model's dtype (float16,
bfloat16 or float32) and the input's memory format (NCHW or channels_last: the output comes in the input's
format), derives the kernel's tile plan from its checked stripe indexes (non-persistent buffers: a plan is never
read from a file) (:func:`~swp_plugin.layers.kernels.triton_stripe.make_tile_plan`:
output channels grouped by stripe pattern) and its forward is one call of the registered op
``swp_triton::stripe_conv2d`` (``act(conv(x) + bias + residual)``), so the deployed model scripts, traces and
compiles like the CPU one. Where the op cannot run (no Triton, another dtype) it computes the same function with
PyTorch ops after one warning; on CPU tensors the op runs under Triton's interpreter (slow: for checks).
"""

from __future__ import annotations

import warnings
from typing import List

import torch
import torch.nn as nn
from timm.layers import register_notrace_module

from .checks import check_stripes
from .deployed import DeployedStripeConv2d
from .functional import position_counts
from .kernels import triton_stripe
from .stripe_conv import StripeConv2d

_warned: List[bool] = [False]


@register_notrace_module
class TritonStripeConv2d(DeployedStripeConv2d):
    """Inference-only stripe convolution on the Triton kernel, with a fused epilogue.

    Shapes as :class:`DeployedStripeConv2d`. Parameters (``requires_grad=False``, in the stripe layer's dtype):
    ``weight`` ``(S, C_in)``, ``bias`` ``(out,)``; buffers: ``stripe_out``, ``stripe_pos`` and, derived from them by
    :meth:`derive` (not saved), the tile plan ``tile_ptr``, ``entry_offsets``, ``entry_rows``, ``tile_out`` (int32).
    """

    def __init__(self, layer: StripeConv2d, bias: torch.Tensor | None = None, act: str = "none",
                 residual: bool = False) -> None:
        super().__init__(layer, bias=bias, act=act, residual=residual)  # checks the stripes, calls derive()
        dtype, device = layer.weight.dtype, layer.weight.device
        self.weight = nn.Parameter(self.weight.data.to(device=device, dtype=dtype), requires_grad=False)
        self.bias = nn.Parameter(self.bias.data.to(device=device, dtype=dtype), requires_grad=False)

    def derive(self) -> None:
        """The tile plan from the (checked) stripe indexes and the hyperparameters; runs at construction and after
        every ``load_state_dict``. The kernel reads ``weight`` itself: nothing derived from the weights."""
        check_stripes(self.stripe_out, self.stripe_pos, self.weight.shape[0], self.out_channels, self.kernel_size)
        top, left = (self.pad[2], self.pad[0]) if self.kernel_pads else (0, 0)
        plan = triton_stripe.make_tile_plan(self.stripe_out, self.stripe_pos, self.out_channels, self.kernel_size,
                                            self.dilation, top, left)
        self.block_o, self.efficiency = plan.block_o, plan.efficiency
        for name in ("tile_ptr", "entry_offsets", "entry_rows", "tile_out"):
            self._set_derived(name, getattr(plan, name).to(self.stripe_out.device))
        self.counts = position_counts(self.stripe_pos, self.kernel_size)
        self._export_constant = None

    @torch.jit.unused
    def refresh(self) -> None:
        """Nothing to refresh: the plan depends on the stripe indexes only, the kernel reads the weights."""

    @classmethod
    def from_stripe(cls, layer: StripeConv2d, act: str = "none", residual: bool = False) -> TritonStripeConv2d:
        """The deployed form of ``layer`` (its current weights and bias, dtype and device)."""
        return cls(layer, act=act, residual=residual)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if not torch.jit.is_scripting():
            if self._pytorch_only(x):
                return self._pytorch_forward(x, residual)
        x, left, right, top, bottom = self._padded(x)
        (kh, kw), (sh, sw), (dh, dw) = self.kernel_size, self.stride, self.dilation
        out_h = (x.shape[2] + top + bottom - dh * (kh - 1) - 1) // sh + 1
        out_w = (x.shape[3] + left + right - dw * (kw - 1) - 1) // sw + 1
        return torch.ops.swp_triton.stripe_conv2d(x, self.weight, self.tile_ptr, self.entry_offsets, self.entry_rows,
                                                  self.tile_out, self.bias, residual, self.out_channels, out_h, out_w,
                                                  sh, sw, self.act_code)

    @torch.jit.unused
    def _pytorch_only(self, x: torch.Tensor) -> bool:
        if torch.onnx.is_in_onnx_export():
            return True
        reason = triton_stripe.unavailable_reason(x.device)
        if reason is None and x.dim() == 4 and x.dtype == self.weight.dtype and x.device == self.weight.device:
            return False
        if not _warned[0]:
            _warned[0] = True
            warnings.warn("TritonStripeConv2d: the Triton kernel cannot run here "
                          f"({reason or f'{x.dtype} input on {x.device}, weights {self.weight.dtype}'}); computing "
                          "the same function with PyTorch ops (slower)", RuntimeWarning, stacklevel=3)
        return True

    def extra_repr(self) -> str:
        return super().extra_repr() + f", triton(block_o={self.block_o}, efficiency={self.efficiency:.2f})"
