"""What tools outside eager PyTorch meet of a ``StripeConv2d`` (:class:`TraceableStripeLayer`): the stripe
convolution as one TorchScript-compatible function, what a scripted or ``torch.fx``-traced layer runs, and
attributes that torch-pruning's ``tp.load_state_dict`` assigns.

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
import torch.fx
import torch.nn.functional as F

from .config import BACKENDS


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


torch.fx.wrap("stripe_conv2d")  # plain torch.fx records the call as one call_function node


class TraceableStripeLayer:
    """Mixin of ``StripeConv2d``: ``forward`` runs :func:`stripe_conv2d` under ``torch.jit.script`` and plain
    ``torch.fx`` (a ``Proxy`` input), the layer's ``_python_forward`` (backends, choices, caches) otherwise; the
    eager-mode Python state is hidden from TorchScript. ``active_backend`` / ``num_stripes`` accept assignment
    (``tp.load_state_dict`` sets every public attribute it saved), ``num_stripes`` only its true value."""

    __jit_ignored_attributes__ = ["choices", "_plans", "_dense_cache", "_selection_cache", "_last_backend"]
    __jit_unused_properties__ = ["backend", "active_backend", "num_stripes"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return self._graph_forward(x)
        return self._eager_or_traced(x)

    @torch.jit.unused
    def _eager_or_traced(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(x, torch.fx.Proxy):  # plain torch.fx traces into the layer (timm's tracers keep it a leaf)
            return self._graph_forward(x)
        return self._python_forward(x)

    def _graph_forward(self, x: torch.Tensor) -> torch.Tensor:
        return stripe_conv2d(x, self.weight, self.bias, self.stripe_out, self.stripe_pos, self.out_channels,
                             self.kernel_size, self.stride, self.dilation, self._static_pad, self.same_dynamic,
                             self.padding_mode)

    @property
    def active_backend(self) -> str:
        """The backend the last forward used (the requested one before any forward)."""
        return getattr(self, "_last_backend", None) or self._backend

    @active_backend.setter
    def active_backend(self, value: str) -> None:
        if value not in BACKENDS:
            raise ValueError(f"active_backend must be one of {BACKENDS}, got {value!r}")
        self._last_backend = value

    @property
    def num_stripes(self) -> int:
        """Number of kept stripes ``S`` (rows of ``weight``; assigning it only checks that it matches)."""
        return self.weight.shape[0]

    @num_stripes.setter
    def num_stripes(self, value: int) -> None:
        if value != self.weight.shape[0]:
            raise ValueError(f"num_stripes is the number of rows of weight ({self.weight.shape[0]}), got {value}: "
                             "change the stripes with select_stripes() or StripeConv2d.from_dense()")
