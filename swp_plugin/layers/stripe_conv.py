"""``StripeConv2d``: a convolution that stores and computes only the kept stripes of its filters.

A stripe is the 1x1 slice ``W[o, :, i, j]`` of filter ``o`` at kernel position ``(i, j)``. A stripe layer
keeps ``S`` of the ``out * kh * kw`` stripes of a dense ``nn.Conv2d``:

* ``weight``: ``(S, C_in)``, the kept stripes, sorted by kernel position, then by output channel;
* ``stripe_out``: ``(S,)`` int64, the output channel of each stripe;
* ``stripe_pos``: ``(S,)`` int64, its kernel position ``i * kw + j``;
* ``bias``: ``(out,)`` or ``None``.

Backends (same function, exact up to float rounding; all differentiable):

* ``'cpp'``: the compiled CPU kernel (:mod:`swp_plugin.layers.kernels.cpu`, float32), MACs
  ``S * C_in * H_out * W_out``.
* ``'triton'``: the Triton kernel on CUDA (float16/bfloat16/float32, :mod:`.kernels.triton_stripe`), forward only
  (with gradients, or while exporting, the layer runs ``'stripe'``).
* ``'stripe'``: pure PyTorch, exportable (:func:`.functional.stripe_conv_pytorch`).
* ``'dense'``: the stripes scattered into a dense kernel (cached in inference) and ``F.conv2d``.
* ``'auto'`` (default): per input shape (and thread count), a one-time micro-benchmark of ``'dense'``
  against the stripe kernel (``'cpp'``, ``'triton'`` on CUDA, else ``'stripe'``) picks the faster one, dense
  unless the stripe kernel wins by 5%; cached in the module (:attr:`StripeConv2d.choices`), shown in
  ``repr``. :mod:`.config` forces a backend on ``'auto'`` layers (``SWP_STRIPE_BACKEND``, ``set_backend``,
  ``use_backend``).
  While tracing (``torch.jit.trace``), exporting or compiling, ``'auto'`` uses the cached choice if it is
  ``'dense'``, else ``'stripe'``, and ``'cpp'`` / ``'triton'`` use ``'stripe'``.

``torch.jit.script`` and plain ``torch.fx`` see the layer's compute as one function (:mod:`.traceable`).
"""

from __future__ import annotations

from typing import Dict, List, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import register_notrace_module
from timm.layers.conv2d_same import Conv2dSame
from torch.nn.modules.utils import _pair

from ..utils import fastest, synchronized
from .config import BACKENDS, default_backend
from .functional import position_counts, selection_matrix, stripe_conv_pytorch
from .kernels import cpu as cpu_kernel
from .kernels import triton_stripe
from .layout import same_tensor, scatter_dense, standard_layout
from .padding import PaddingSpec, dynamic_same_padding, is_dynamic_same, static_padding
from .traceable import TraceableStripeLayer

#: at most this many input shapes remembered per layer by ``backend='auto'`` (oldest forgotten first)
MAX_CHOICES = 16


def _refresh_after_load(module: StripeConv2d, incompatible_keys) -> None:
    module._refresh()


@register_notrace_module  # a leaf for torch.fx (its forward has per-call decisions), like timm's Conv2dSame
class StripeConv2d(TraceableStripeLayer, nn.Module):
    """2-D convolution over kept stripes (stripe-wise pruned ``nn.Conv2d``, groups == 1).

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, bias, padding_mode: as
            ``nn.Conv2d`` (``padding`` may be ``'same'`` / ``'valid'``).
        num_stripes: number of kept stripes ``S``.
        same_dynamic: pad like timm's ``Conv2dSame`` (TF 'SAME', depends on the input size).
        backend: ``'auto'`` (default), ``'cpp'``, ``'triton'``, ``'stripe'``, ``'dense'`` (module docstring);
            may be reassigned at any time (``layer.backend = 'dense'``).

    Shapes: input ``(N, C_in, H, W)`` -> output ``(N, out, H_out, W_out)`` as the dense convolution.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding: PaddingSpec | int = 0,
        dilation=1,
        bias: bool = True,
        padding_mode: str = "zeros",
        num_stripes: int = 0,
        same_dynamic: bool = False,
        backend: str = "auto",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride)
        self.padding = padding if isinstance(padding, str) else _pair(padding)
        self.dilation = _pair(dilation)
        self.padding_mode = padding_mode
        self.same_dynamic = same_dynamic
        self.choices: Dict[tuple, str] = {}
        self.backend = backend
        self.weight = nn.Parameter(torch.zeros(num_stripes, in_channels, **factory))
        self.bias = nn.Parameter(torch.zeros(out_channels, **factory)) if bias else None
        self.register_buffer("stripe_out", torch.zeros(num_stripes, dtype=torch.long, device=device))
        self.register_buffer("stripe_pos", torch.zeros(num_stripes, dtype=torch.long, device=device))
        self.register_load_state_dict_post_hook(_refresh_after_load)
        self._refresh()

    # ------------------------------------------------------------------ construction / conversion
    @classmethod
    def from_dense(
        cls, conv: nn.Conv2d, mask: torch.Tensor | None = None, backend: str = "auto"
    ) -> StripeConv2d:
        """Build from a dense conv, keeping the stripes where ``mask`` (``(out, kh, kw)`` bool) is True.

        Without ``mask`` the stripes that have a nonzero weight are kept (exact by construction).
        """
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"from_dense expects an nn.Conv2d, got {type(conv).__name__}")
        if conv.groups != 1:
            raise ValueError(
                f"StripeConv2d supports groups=1 only; this conv has groups={conv.groups}. "
                "Grouped and depthwise convs stay dense (their dead stripes are zeroed)."
            )
        weight = conv.weight.detach()
        out, _, kh, kw = weight.shape
        if mask is None:
            mask = weight.ne(0).any(dim=1)
        if mask.shape != (out, kh, kw):
            raise ValueError(f"mask must have shape {(out, kh, kw)} (out, kh, kw), got {tuple(mask.shape)}")
        layer = cls(
            conv.in_channels,
            out,
            conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            bias=conv.bias is not None,
            padding_mode=conv.padding_mode,
            num_stripes=0,
            same_dynamic=is_dynamic_same(conv),
            backend=backend,
            device=weight.device,
            dtype=weight.dtype,
        )
        o, i, j = mask.to(weight.device).nonzero(as_tuple=True)
        pos = i * kw + j
        order = torch.argsort(pos * out + o)
        o, i, j, pos = o[order], i[order], j[order], pos[order]
        layer.weight = nn.Parameter(weight[o, :, i, j].clone())
        layer.stripe_out = o
        layer.stripe_pos = pos
        if conv.bias is not None:
            layer.bias.data.copy_(conv.bias.detach())
        layer._refresh()
        return layer

    def to_dense(self) -> nn.Conv2d:
        """The equivalent dense conv (pruned stripes as zeros): ``nn.Conv2d`` or timm ``Conv2dSame``."""
        cls = Conv2dSame if self.same_dynamic else nn.Conv2d
        padding = 0 if self.same_dynamic else self.padding
        conv = cls(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            stride=self.stride,
            padding=padding,
            dilation=self.dilation,
            bias=self.bias is not None,
            **({} if self.same_dynamic else {"padding_mode": self.padding_mode}),
            device=self.weight.device,
            dtype=self.weight.dtype,
        )
        with torch.no_grad():
            conv.weight.copy_(self.dense_weight())
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        return conv

    # ------------------------------------------------------------------ backend
    @property
    def backend(self) -> str:
        """Requested backend: ``'auto'``, ``'cpp'``, ``'triton'``, ``'stripe'`` or ``'dense'``."""
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        if value not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {value!r}")
        self._backend = value
        self.choices.clear()

    # ------------------------------------------------------------------ structure
    def stripe_mask(self) -> torch.Tensor:
        """Kept stripes as a dense bool mask of shape ``(out, kh, kw)``."""
        kh, kw = self.kernel_size
        mask = torch.zeros(self.out_channels * kh * kw, dtype=torch.bool, device=self.weight.device)
        mask[self.stripe_out * kh * kw + self.stripe_pos] = True
        return mask.view(self.out_channels, kh, kw)

    def dense_weight(self) -> torch.Tensor:
        """Dense kernel ``(out, C_in, kh, kw)``, row-major, with pruned stripes as zeros (differentiable)."""
        kh, kw = self.kernel_size
        return scatter_dense(self.weight, self.stripe_out * kh * kw + self.stripe_pos, self.out_channels, kh, kw)

    def per_filter(self, values: torch.Tensor, reduce: str = "sum") -> torch.Tensor:
        """Reduce per-stripe ``values`` ``(S,)`` to one value per output channel ``(out,)``: ``'sum'``,
        ``'amax'`` (0 for a filter without stripes) or ``'any'`` (bool) over the filter's stripes."""
        if reduce == "any":
            return self.per_filter(values.float(), "sum") > 0
        out = values.new_zeros(self.out_channels)
        return out.scatter_reduce(0, self.stripe_out.to(values.device), values, reduce, include_self=True)

    def select_stripes(self, keep: torch.Tensor) -> None:
        """Keep only the stripes where ``keep`` (``(S,)`` bool) is True. Order stays sorted."""
        keep = keep.to(self.weight.device)
        grad = self.weight.grad[keep] if self.weight.grad is not None else None
        self._set_weight(self.weight.data[keep], grad)
        self.stripe_out = self.stripe_out[keep]
        self.stripe_pos = self.stripe_pos[keep]
        self._refresh()

    def remove_out_channels(self, idxs) -> None:
        """Remove output channels ``idxs`` with their stripes and bias entries."""
        dead = torch.zeros(self.out_channels, dtype=torch.bool, device=self.weight.device)
        dead[torch.as_tensor(list(idxs), dtype=torch.long, device=dead.device)] = True
        new_index = torch.cumsum(~dead, 0) - 1
        keep = ~dead[self.stripe_out]
        grad = self.weight.grad[keep] if self.weight.grad is not None else None
        self._set_weight(self.weight.data[keep], grad)
        self.stripe_out = new_index[self.stripe_out[keep]]
        self.stripe_pos = self.stripe_pos[keep]
        if self.bias is not None:
            bias_grad = self.bias.grad[~dead] if self.bias.grad is not None else None
            self.bias = nn.Parameter(self.bias.data[~dead])
            self.bias.grad = bias_grad
        self.out_channels = int((~dead).sum())
        self._refresh()

    def remove_in_channels(self, idxs) -> None:
        """Remove input channels ``idxs`` (columns of every stripe)."""
        keep = torch.ones(self.in_channels, dtype=torch.bool, device=self.weight.device)
        keep[torch.as_tensor(list(idxs), dtype=torch.long, device=keep.device)] = False
        grad = self.weight.grad[:, keep] if self.weight.grad is not None else None
        self._set_weight(self.weight.data[:, keep], grad)
        self.in_channels = int(keep.sum())

    def _set_weight(self, data: torch.Tensor, grad: torch.Tensor | None) -> None:
        self.weight = nn.Parameter(data.contiguous())
        if grad is not None:
            self.weight.grad = grad.contiguous()

    def _refresh(self) -> None:
        """Recompute the per-position stripe counts (Python ints: the forward loop is static); forget the
        kernel plans, the cached dense kernel and the backend choices (they depend on the structure)."""
        self._position_counts = position_counts(self.stripe_pos, self.kernel_size)
        self._static_pad: List[int] = [0, 0, 0, 0] if self.same_dynamic else list(
            static_padding(self.padding, self.kernel_size, self.dilation))
        self._plans: Dict[tuple, cpu_kernel.StripePlan] = {}
        self._dense_cache: Tuple[torch.Tensor, torch.Tensor] | None = None
        self._selection_cache: tuple | None = None
        self.choices.clear()

    def __getstate__(self) -> dict:
        """Pickle without what this process measured or built (backend choices, plans, caches): a model saved
        with ``torch.save(model)`` decides again where it is loaded (the kernel may not be loaded there)."""
        state = self.__dict__.copy()
        state.update(choices={}, _plans={}, _dense_cache=None, _selection_cache=None)
        state.pop("_last_backend", None)
        return state

    # ------------------------------------------------------------------ forward
    def _padding_ltrb(self, x: torch.Tensor) -> Tuple[int, int, int, int]:
        if self.same_dynamic:
            return dynamic_same_padding(tuple(x.shape[-2:]), self.kernel_size, self.stride, self.dilation)
        return static_padding(self.padding, self.kernel_size, self.dilation)

    def _python_forward(self, x: torch.Tensor) -> torch.Tensor:  # forward in eager mode (see TraceableStripeLayer)
        x = standard_layout(x)  # see layout.py: an ambiguous or channels-last input can crash PyTorch's conv
        pad = self._padding_ltrb(x)
        backend = self._resolve_backend(x, pad)
        self._last_backend = backend
        return self._forward_with(x, pad, backend)

    def _forward_with(self, x: torch.Tensor, pad: Tuple[int, int, int, int], backend: str) -> torch.Tensor:
        if backend == "stripe" and not any(self._position_counts):  # Python ints: quiet while tracing
            backend = "dense"  # no stripe at all: a zero kernel (same function, and gradients of zeros)
        if backend in ("cpp", "triton"):
            return self._cpp_forward(x, pad) if backend == "cpp" else triton_stripe.forward(self, x, pad, self._plans)
        if any(pad):
            mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
            x = F.pad(x, pad, mode=mode)
        if backend == "dense":
            return F.conv2d(x, self._dense_kernel(), self.bias, self.stride, 0, self.dilation)
        return self._stripe_forward(x)

    def _cpp_applies(self, x: torch.Tensor) -> bool:
        return x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 4 and cpu_kernel.available()

    def _resolve_backend(self, x: torch.Tensor, pad: Tuple[int, int, int, int]) -> str:
        exporting = (torch.jit.is_tracing() or torch.jit.is_scripting() or torch.onnx.is_in_onnx_export()
                     or torch.compiler.is_compiling())
        requested = self._backend
        if requested == "auto":
            requested = default_backend()
        if requested in ("cpp", "triton"):
            applies = self._cpp_applies(x) if requested == "cpp" else triton_stripe.runs(self, x)
            return "stripe" if exporting or not applies else requested
        if requested != "auto":
            return requested
        key = (tuple(x.shape), x.dtype, x.device.type, torch.get_num_threads())
        choice = self.choices.get(key)
        if exporting or (choice == "triton" and not triton_stripe.runs(self, x)):  # no autograd in triton
            return "dense" if choice == "dense" else "stripe"
        if choice is None or (choice == "cpp" and not self._cpp_applies(x)):  # (choices copied from elsewhere)
            choice = self._tune(x, pad)
            if len(self.choices) >= MAX_CHOICES:
                self.choices.pop(next(iter(self.choices)))
            self.choices[key] = choice
        return choice

    def _tune(self, x: torch.Tensor, pad: Tuple[int, int, int, int]) -> str:
        """Micro-benchmark ``'dense'`` against the stripe kernel on ``x`` (no grad); return the faster."""
        candidate = "cpp" if self._cpp_applies(x) else "triton" if triton_stripe.runs(self, x, ("cuda",)) else "stripe"
        runs = {name: (lambda name=name: self._forward_with(x, pad, name)) for name in ("dense", candidate)}
        with torch.no_grad():
            times = fastest(synchronized(runs, x.device))
        return candidate if times[candidate] < 0.95 * times["dense"] else "dense"

    def _dense_kernel(self) -> torch.Tensor:
        """Dense kernel; in inference cached, and reused only while the weight still equals the snapshot taken
        with it (compared at every call: writes through ``.data``, ``.to()``, ``load_state_dict`` or an
        optimizer step all show)."""
        weight = self.weight
        if (torch.is_grad_enabled() and weight.requires_grad) or weight.is_inference():
            return self.dense_weight()
        cache = self._dense_cache
        if cache is None or not same_tensor(cache[0], weight):
            with torch.inference_mode(False), torch.no_grad():  # normal tensors, usable outside inference mode
                cache = self._dense_cache = (weight.detach().clone(), self.dense_weight())
        return cache[1]

    def _cpp_forward(self, x: torch.Tensor, pad: Tuple[int, int, int, int]) -> torch.Tensor:
        if self.padding_mode != "zeros" and any(pad):
            x = F.pad(x, pad, mode=self.padding_mode)
            pad = (0, 0, 0, 0)
        left, right, top, bottom = pad
        (kh, kw), (sh, sw), (dh, dw) = self.kernel_size, self.stride, self.dilation
        out_h = (x.shape[2] + top + bottom - dh * (kh - 1) - 1) // sh + 1
        out_w = (x.shape[3] + left + right - dw * (kw - 1) - 1) // sw + 1
        plan = self._plans.get((top, left))
        if plan is None:
            plan = cpu_kernel.make_plan(self.stripe_out, self.stripe_pos, self.out_channels, self.kernel_size,
                                        self.stride, self.dilation, top, left)
            self._plans[(top, left)] = plan
        dense_index = self.stripe_out * (kh * kw) + self.stripe_pos
        return cpu_kernel.stripe_conv_cpu(x.contiguous(), self.weight, self.bias, plan, (out_h, out_w), self.stride,
                                          self.dilation, pad, dense_index, self.kernel_size, self.out_channels)

    def _stripe_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pure PyTorch on the padded input (:func:`.functional.stripe_conv_pytorch`)."""
        weight = self.weight  # read once: it may be parametrized (a Filter Skeleton in a second round)
        return stripe_conv_pytorch(x, weight, self._selection(weight), self.bias, self._position_counts,
                                   self.kernel_size, self.stride, self.dilation)

    def _selection(self, weight: torch.Tensor) -> torch.Tensor:
        """The ``(out, S, 1, 1)`` stripe-to-channel selection (structure only: cached per device/dtype, as a
        normal tensor also when first built in inference mode; built in the graph while tracing, so that every
        trace is the same)."""
        key = (weight.device, weight.dtype)
        cached = self._selection_cache
        if torch.jit.is_tracing():
            return selection_matrix(self.stripe_out, self.out_channels, weight.dtype)
        if cached is None or cached[0] != key:
            with torch.inference_mode(False), torch.no_grad():
                cached = self._selection_cache = (key, selection_matrix(self.stripe_out, self.out_channels,
                                                                        weight.dtype))
        return cached[1]

    def extra_repr(self) -> str:
        s = (
            f"Strip({self.in_channels}, {self.num_stripes}), out_channels={self.out_channels}, "
            f"kernel_size={self.kernel_size}, stride={self.stride}"
        )
        if self.same_dynamic:
            s += ", padding=same_dynamic"
        elif self.padding not in ((0, 0), "valid"):
            s += f", padding={self.padding}"
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode}"
        if self.bias is None:
            s += ", bias=False"
        active = getattr(self, "_last_backend", None)
        return s + f", backend={self._backend}" + (f"({active})" if self._backend == "auto" and active else "")
