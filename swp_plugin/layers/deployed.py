"""``DeployedStripeConv2d``: a stripe convolution frozen for inference on the compiled CPU kernel.

What a :class:`~swp_plugin.StripeConv2d` decides at each call is fixed once here: the kernel's plan (stripe order,
panels by kernel position) and the packed weights are non-persistent buffers derived by one method (:meth:`derive`)
from the weights and the checked stripe indexes, a BatchNorm that followed the conv is folded into the
weights and bias, and a ReLU and/or a residual add that followed it run in the kernel's epilogue:
``y = act(conv(x) + bias + residual)``. The forward is one call of the registered op ``swp_stripe::forward``, so
the layer scripts (``torch.jit.script``), traces and compiles with no Python between layers.

The layer owns its derived form: files hold the plain folded stripes and indexes only; the packed copy is derived
again after ``load_state_dict`` and whenever the weight's version changed (:meth:`refresh`, called by the eager
forward and by the deployed model's TorchScript twin). An in-place write through ``weight.data`` shows neither a
version nor new storage: call :meth:`derive` after one. Where
the kernel cannot run (not built on this machine, a non-float32 or non-CPU input) it computes the same function
with PyTorch ops, after one warning; ONNX export uses PyTorch ops too (``onnx_form``: ``'dense'`` or
``'stripe'``, see :mod:`swp_plugin.deployment.onnx`).
"""

from __future__ import annotations

import warnings
from typing import List, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import register_notrace_module
from torch._subclasses import FakeTensor

from .checks import check_stripes
from .functional import position_counts, selection_matrix, stripe_conv_pytorch
from .kernels import cpu as cpu_kernel
from .layout import scatter_dense
from .padding import static_padding
from .stripe_conv import StripeConv2d

ACTIVATIONS = ("none", "relu")
#: the kernel plan's buffers: derived from the stripe indexes, never part of the state dict
PLAN_BUFFERS = ("rows", "phase_info", "ptr", "entries")
_warned: List[bool] = [False]


@register_notrace_module
class DeployedStripeConv2d(nn.Module):
    """Inference-only stripe convolution on the compiled kernel, with a fused epilogue.

    Build it with :meth:`from_stripe` (usually through :func:`swp_plugin.deploy`).

    Shapes: ``x`` ``(N, C_in, H, W)``, ``residual`` ``(N, out, H_out, W_out)`` or ``None`` ->
    ``(N, out, H_out, W_out)``. Parameters (``requires_grad=False``): ``weight`` ``(S, C_in)`` (stripes sorted by
    kernel position, then output channel, as in ``StripeConv2d``), ``bias`` ``(out,)``; buffers: ``stripe_out``,
    ``stripe_pos`` (checked before anything uses them) and, derived from them and the weights by :meth:`derive`
    (not saved: a plan is never read from a file), the kernel plan ``panels``, ``phases`` and the packed weights
    ``packed`` ``(panels, C_in, 6)``. Inference only: a forward that would need gradients raises.
    """

    def __init__(self, layer: StripeConv2d, bias: torch.Tensor | None = None, act: str = "none",
                 residual: bool = False) -> None:
        super().__init__()
        if act not in ACTIVATIONS:
            raise ValueError(f"act must be one of {ACTIVATIONS}, got {act!r}")
        self.in_channels, self.out_channels = layer.in_channels, layer.out_channels
        self.kernel_size, self.stride, self.dilation = layer.kernel_size, layer.stride, layer.dilation
        self.padding_mode, self.same_dynamic = layer.padding_mode, layer.same_dynamic
        self.act, self.residual = act, residual
        self.act_code = ACTIVATIONS.index(act)
        # zero static padding is the kernel's range clip; other padding is applied with F.pad first
        pad = (0, 0, 0, 0) if layer.same_dynamic else static_padding(layer.padding, layer.kernel_size,
                                                                       layer.dilation)
        self.kernel_pads = layer.padding_mode == "zeros" and not layer.same_dynamic
        self.pad: Tuple[int, int, int, int] = pad
        # H_out = (H + extent[0]) // stride[0] for the input the kernel gets: its own pads, less the window's reach,
        # plus one stride (scripted, two integer operations per size)
        kept = pad if self.kernel_pads else (0, 0, 0, 0)
        (kh, kw), (sh, sw), (dh, dw) = layer.kernel_size, layer.stride, layer.dilation
        self.extent: Tuple[int, int] = (kept[2] + kept[3] - dh * (kh - 1) - 1 + sh,
                                        kept[0] + kept[1] - dw * (kw - 1) - 1 + sw)
        weight = layer.weight.detach().float().contiguous()
        self.weight = nn.Parameter(weight.clone(), requires_grad=False)
        bias = layer.bias if bias is None else bias
        self.bias = nn.Parameter((torch.zeros(self.out_channels) if bias is None else bias.detach().float()).clone(),
                                 requires_grad=False)
        self.register_buffer("stripe_out", layer.stripe_out.clone())
        self.register_buffer("stripe_pos", layer.stripe_pos.clone())
        self.onnx_form = "dense"
        self._export_constant: torch.Tensor | None = None
        self.derive()

    def derive(self) -> None:
        """Derive everything the kernel reads from ``weight``, ``stripe_out``, ``stripe_pos`` and the
        hyperparameters: the plan (``panels``, ``phases``) and the packed weights ``packed`` (non-persistent
        buffers: files hold the plain stripe weights and indexes). Runs at construction and after every
        ``load_state_dict``; the eager forward re-derives when ``weight`` was written in place (its version
        changed). After a write through ``weight.data`` (which no version shows), call it yourself."""
        check_stripes(self.stripe_out, self.stripe_pos, self.weight.shape[0], self.out_channels, self.kernel_size)
        top, left = (self.pad[2], self.pad[0]) if self.kernel_pads else (0, 0)
        plan = cpu_kernel.make_plan(self.stripe_out, self.stripe_pos, self.out_channels, self.kernel_size,
                                    self.stride, self.dilation, top, left)
        for name, value in (("panels", plan.panels), ("phases", plan.phases),
                            ("packed", cpu_kernel.pack(self.weight, plan))):
            self._set_derived(name, value)
        self.tile = cpu_kernel.tile_pixels(self.in_channels, self.out_channels)
        self.counts = position_counts(self.stripe_pos, self.kernel_size)
        self._export_constant = None
        self.derived_from = weight_stamp(self.weight)

    def _set_derived(self, name: str, value: torch.Tensor) -> None:
        """A derived, non-persistent buffer: written in place where it fits (whoever holds it, e.g. the deployed
        model's TorchScript twin, sees the new values), registered anew otherwise."""
        old = self._buffers.get(name)
        if old is not None and (old.shape, old.dtype, old.device) == (value.shape, value.dtype, value.device):
            with torch.no_grad():
                old.copy_(value)
        else:
            self.register_buffer(name, value, persistent=False)

    @torch.jit.unused
    def refresh(self) -> None:
        """Derive again if ``weight`` changed since the last :meth:`derive` (written in place: its version; given
        new data, e.g. by ``.to()`` round trips or ``weight.data = ...``: its storage) or the packed copy was
        converted; cheap otherwise. The eager forward and the deployed model's TorchScript twin call it."""
        stale = weight_stamp(self._parameters["weight"]) != self.derived_from
        if stale or self._buffers["packed"].dtype != torch.float32:
            self.derive()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        """Load weights and stripe indexes (checked against this layer's hyperparameters before anything uses
        them), then derive the plan again; plan tensors in the state (files of swp_plugin <= 0.1) are ignored."""
        rows = state_dict.get(prefix + "weight")
        num_stripes = rows.shape[0] if isinstance(rows, torch.Tensor) and rows.dim() == 2 else self.num_stripes
        out, pos = state_dict.get(prefix + "stripe_out"), state_dict.get(prefix + "stripe_pos")
        if out is not None and pos is not None:
            try:
                check_stripes(out, pos, num_stripes, self.out_channels, self.kernel_size)
            except ValueError as err:
                raise ValueError(f"['{prefix}stripe_out'/'{prefix}stripe_pos']: {err}") from None
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        unexpected_keys[:] = [k for k in unexpected_keys if k not in {prefix + n for n in PLAN_BUFFERS}]
        if not error_msgs:
            self.derive()

    @classmethod
    def from_stripe(cls, layer: StripeConv2d, act: str = "none", residual: bool = False) -> DeployedStripeConv2d:
        """The deployed form of ``layer`` (its current weights and bias)."""
        return cls(layer, act=act, residual=residual)

    # ------------------------------------------------------------------ forward
    def _padded(self, x: torch.Tensor) -> Tuple[torch.Tensor, int, int, int, int]:
        """``x`` padded as far as the kernel does not pad itself, and the zero padding left to the kernel."""
        left, right, top, bottom = self.pad
        if self.same_dynamic:
            pad_h = _same_pad(int(x.shape[2]), self.kernel_size[0], self.stride[0], self.dilation[0])
            pad_w = _same_pad(int(x.shape[3]), self.kernel_size[1], self.stride[1], self.dilation[1])
            if pad_h + pad_w > 0:
                x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
            return x, 0, 0, 0, 0
        if not self.kernel_pads and left + right + top + bottom > 0:
            mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
            return F.pad(x, [left, right, top, bottom], mode=mode), 0, 0, 0, 0
        return x, left, right, top, bottom

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        # (what scripted code runs is kept short: every op a frozen TorchScript graph runs costs, and at batch 1 on
        # ResNet56 there are 57 layers; the kernel makes x and residual contiguous itself)
        if not torch.jit.is_scripting():
            if residual is not None and residual.dtype != x.dtype:  # autocast: the other branch ran in bf16/fp16
                residual = residual.to(x.dtype)
            self._refuse_training(x)
            if self._pytorch_only(x):
                return self._pytorch_forward(x, residual)
        x = self._padded(x)[0]
        sh, sw = self.stride
        out_h = (x.size(2) + self.extent[0]) // sh
        out_w = (x.size(3) + self.extent[1]) // sw
        return torch.ops.swp_stripe.forward(x, self.packed, self.panels, self.phases, self.bias, residual,
                                            self.out_channels, out_h, out_w, sh, sw, self.tile, self.act_code)

    @torch.jit.unused
    def _refuse_training(self, x: torch.Tensor) -> None:
        """Inference only: the kernel has no backward, so a gradient asked for would silently be missing."""
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad or self.bias.requires_grad):
            what = "its input" if x.requires_grad else "its weights (requires_grad turned on)"
            raise RuntimeError("DeployedStripeConv2d is inference-only (no gradients through the compiled kernel), "
                               f"but {what} require grad: train the model before deploy() (a deployed layer's "
                               "to_stripe() is the trainable StripeConv2d), or run it under torch.no_grad()")

    @torch.jit.unused
    def _pytorch_only(self, x: torch.Tensor) -> bool:
        if torch.onnx.is_in_onnx_export():
            return True
        if x.device.type == "cpu" and x.dtype == torch.float32 and cpu_kernel.available():
            # (a compiled graph, and shape propagation on fake tensors, read the buffers as they are)
            if not torch.compiler.is_compiling() and not isinstance(x, FakeTensor):
                self.refresh()  # written in place, or converted: pack again
            return False
        if not _warned[0]:
            _warned[0] = True
            warnings.warn("DeployedStripeConv2d: the compiled kernel cannot run here "
                          f"({cpu_kernel.build_error() or f'{x.dtype} on {x.device.type}'}); computing the same "
                          "function with PyTorch ops (slower)", RuntimeWarning, stacklevel=3)
        return True

    @torch.jit.unused
    def prepare_export(self, form: str) -> None:
        """Choose the ONNX form (``'dense'`` or ``'stripe'``) and build its constant (the dense kernel, or the
        stripe-to-channel selection) now, outside the trace, so that the exported graph holds it as an initializer
        instead of the scatter that builds it."""
        if form not in ("dense", "stripe"):
            raise ValueError(f"onnx form must be 'dense' or 'stripe', got {form!r}")
        self.onnx_form = form
        with torch.no_grad():
            self._export_constant = self._constant(self.weight.dtype)

    @torch.jit.unused
    def _constant(self, dtype: torch.dtype) -> torch.Tensor:
        if self.onnx_form == "stripe" and self.weight.shape[0] > 0:
            return selection_matrix(self.stripe_out, self.out_channels, dtype)
        kh, kw = self.kernel_size
        return scatter_dense(self.weight.to(dtype), self.stripe_out * kh * kw + self.stripe_pos, self.out_channels,
                             kh, kw)

    @torch.jit.unused
    def _pytorch_forward(self, x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        """The same function in PyTorch ops: ``onnx_form`` ``'dense'`` (one conv with the pruned stripes as zeros)
        or ``'stripe'`` (:func:`~swp_plugin.layers.functional.stripe_conv_pytorch`)."""
        x, left, right, top, bottom = self._padded(x)
        symmetric = left == right and top == bottom  # then the conv pads (one ONNX Conv, no Pad op)
        if left + right + top + bottom > 0 and not (symmetric and self.onnx_form == "dense"):
            x, left, top = F.pad(x, [left, right, top, bottom]), 0, 0
        constant = self._export_constant if torch.onnx.is_in_onnx_export() else None
        if constant is None or constant.dtype != x.dtype:
            constant = self._constant(x.dtype)
        bias = self.bias.to(x.dtype)
        if self.onnx_form == "stripe" and self.weight.shape[0] > 0:
            y = stripe_conv_pytorch(x, self.weight.to(x.dtype), constant, bias, self.counts, self.kernel_size,
                                    self.stride, self.dilation)
        else:
            y = F.conv2d(x, constant, bias, self.stride, (top, left), self.dilation)
        if residual is not None:
            y = y + residual
        return torch.relu(y) if self.act == "relu" else y

    # ------------------------------------------------------------------ inspection
    @property
    def num_stripes(self) -> int:
        return self.weight.shape[0]

    @num_stripes.setter
    def num_stripes(self, value: int) -> None:  # tp.load_state_dict sets every attribute it saved: check only
        if value != self.weight.shape[0]:
            raise ValueError(f"num_stripes is the number of rows of weight ({self.weight.shape[0]}), got {value}")

    def to_stripe(self) -> StripeConv2d:
        """The equivalent ``StripeConv2d`` (without the epilogue: act and residual are not part of it)."""
        layer = StripeConv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, 0, self.dilation,
                             True, self.padding_mode, self.num_stripes, self.same_dynamic)
        layer.padding = _padding_spec(self.pad)
        with torch.no_grad():
            layer.weight.copy_(self.weight)
            layer.bias.copy_(self.bias)
        layer.stripe_out, layer.stripe_pos = self.stripe_out.clone(), self.stripe_pos.clone()
        layer._refresh()
        return layer

    def extra_repr(self) -> str:
        epilogue = "+".join(["bias"] + (["residual"] if self.residual else []) + ([self.act] if self.act != "none"
                                                                                  else []))
        return (f"Strip({self.in_channels}, {self.num_stripes}), out_channels={self.out_channels}, "
                f"kernel_size={self.kernel_size}, stride={self.stride}, pad={self.pad}"
                f"{', padding=same_dynamic' if self.same_dynamic else ''}, epilogue={epilogue}")


def weight_stamp(weight: torch.Tensor) -> Tuple[int, int]:
    """What tells a weight's values changed since they were packed: its version (in-place writes) and its storage
    (new data). Writes through ``weight.data`` in place show neither: call :meth:`DeployedStripeConv2d.derive`."""
    return weight._version, weight.data_ptr()


def _same_pad(size: int, kernel: int, stride: int, dilation: int) -> int:
    """TensorFlow 'SAME' total padding of one dimension (timm's ``get_same_padding``), scriptable."""
    return max((-(size // -stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)


def _padding_spec(pad: Tuple[int, int, int, int]):
    left, right, top, bottom = pad
    if left == right and top == bottom:
        return (top, left)
    return "same"  # the only asymmetric static padding nn.Conv2d has
