"""Weight-standardised convs (timm StdConv2d / ScaledStdConv2d): unfolded into a parametrization, then
stripe-pruned exactly."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from timm.layers import ScaledStdConv2d, ScaledStdConv2dSame, StdConv2d, StdConv2dSame
from torch.nn.utils import parametrize

from swp_plugin import StripeConv2d, StripePruner, detach_skeletons
from swp_plugin.skeleton import WeightStandardization, unfold_standardization
from swp_plugin.testing import randomize_skeletons, rel_err

STD_CONVS = [
    lambda: StdConv2d(6, 8, 3, padding=1),
    lambda: StdConv2dSame(6, 8, 3, stride=2),  # dynamic 'SAME' padding
    lambda: StdConv2dSame(6, 8, 3),  # static 'SAME' padding
    lambda: ScaledStdConv2d(6, 8, 3, padding=1, gain_init=0.7),
    lambda: ScaledStdConv2dSame(6, 8, 5, stride=2),
]


class StdNet(nn.Module):
    """Normaliser-free style: standardised convs, no BatchNorm, a residual add."""

    def __init__(self, conv: nn.Module) -> None:
        super().__init__()
        self.stem = ScaledStdConv2d(3, 6, 3, padding=1)
        self.conv = conv
        self.conv2 = StdConv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        y = torch.relu(self.conv(torch.relu(self.stem(x))))
        y = y + self.conv2(y)
        return self.head(y.mean((2, 3)))


@pytest.mark.parametrize("make", STD_CONVS)
def test_unfold_keeps_function_and_parameters(make):
    conv = make()
    with torch.no_grad():
        if hasattr(conv, "gain"):
            conv.gain.uniform_(0.5, 1.5)
    model = nn.Sequential(conv)
    x = torch.randn(2, 6, 11, 13)
    expected = model(x)
    replaced = unfold_standardization(model)
    assert [c for _, c in replaced] == [type(conv).__name__]
    plain = model[0]
    assert isinstance(plain.parametrizations["weight"][0], WeightStandardization)
    assert plain.parametrizations["weight"].original is conv.weight  # the trained tensor itself
    assert torch.allclose(model(x), expected, atol=1e-6)
    if hasattr(conv, "gain"):  # the gain stays a trained parameter
        assert any(p is conv.gain for p in model.parameters())


@pytest.mark.parametrize("make", STD_CONVS)
def test_std_conv_stripe_pruned_exactly(make):
    model = StdNet(make())
    x = torch.randn(4, 3, 16, 16)
    pruner = StripePruner(model, x[:1], ignored_layers=[model.head])
    assert len(pruner.notes) == 3 and "WeightStandardization" in str(pruner.notes[0])
    randomize_skeletons(pruner, dead_stripes=0.5, dead_filters=0.25)
    model.eval()
    with torch.no_grad():
        before = model(x)
        pruner.step()
        after = model(x)
    assert rel_err(before, after) < 1e-4
    assert isinstance(model.conv, StripeConv2d) and model.conv.num_stripes < 8 * model.conv.kernel_size[0] ** 2
    assert not any(parametrize.is_parametrized(m) for m in model.modules())


def test_detach_without_merge_keeps_the_standardisation():
    model = StdNet(StdConv2d(6, 8, 3, padding=1))
    x = torch.randn(2, 3, 12, 12)
    expected = model(x)
    StripePruner(model, x[:1], ignored_layers=[model.head])
    detach_skeletons(model, merge=False)
    assert torch.allclose(model(x), expected, atol=1e-6)
    chain = model.conv.parametrizations["weight"]
    assert len(chain) == 1 and isinstance(chain[0], WeightStandardization)
