"""StripeConv2d under torch.jit.script and plain torch.fx: one function (layers/traceable.py), same function."""

from __future__ import annotations

import pytest
import torch
import torch.fx
import torch.nn as nn
from timm.layers.conv2d_same import Conv2dSame

from swp_plugin import StripeConv2d

CASES = [
    lambda: nn.Conv2d(5, 7, 3, padding=1, bias=True),
    lambda: nn.Conv2d(5, 7, 3, stride=2, padding=2, dilation=2, bias=False),
    lambda: nn.Conv2d(5, 7, (1, 3), padding="same"),
    lambda: nn.Conv2d(5, 7, 3, padding=1, padding_mode="reflect"),
    lambda: nn.Conv2d(5, 7, 1),
    lambda: Conv2dSame(5, 7, 3, stride=2),
]


@pytest.mark.parametrize("make", CASES)
def test_scripted_and_fx_traced_layer_equal_eager(make):
    torch.manual_seed(0)
    conv = make()
    layer = StripeConv2d.from_dense(conv, torch.rand(conv.out_channels, *conv.kernel_size) > 0.5)
    x = torch.randn(2, 5, 11, 9)
    y = layer(x)
    scripted = torch.jit.script(layer)
    traced = torch.fx.symbolic_trace(layer)
    assert [n.op for n in traced.graph.nodes].count("call_function") == 1  # the compute is one node
    for other in (scripted, traced):
        assert torch.allclose(other(x), y, atol=1e-5)
        assert other(x[:, :, :7, :8]).shape == layer(x[:, :, :7, :8]).shape  # dynamic 'SAME' follows the size


def test_scripted_layer_is_differentiable_and_saves(tmp_path):
    layer = StripeConv2d.from_dense(nn.Conv2d(4, 6, 3, padding=1), torch.rand(6, 3, 3) > 0.3)
    scripted = torch.jit.script(layer)
    x = torch.randn(1, 4, 6, 6)
    scripted(x).sum().backward()
    reference = layer.weight.grad.clone()
    layer.weight.grad = None
    layer(x).sum().backward()
    assert torch.allclose(reference, layer.weight.grad, atol=1e-5)
    torch.jit.save(scripted, tmp_path / "layer.pt")
    assert torch.allclose(torch.jit.load(tmp_path / "layer.pt")(x), layer(x), atol=1e-5)


def test_channels_last_input_and_no_stripe():
    layer = StripeConv2d.from_dense(nn.Conv2d(4, 6, 1), torch.zeros(6, 1, 1, dtype=torch.bool))
    x = torch.randn(2, 4, 5, 5).to(memory_format=torch.channels_last)
    assert torch.equal(torch.jit.script(layer)(x), layer(x))  # bias only
