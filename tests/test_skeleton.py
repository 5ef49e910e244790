"""Filter Skeleton parametrizations: which convs get one, what they compute, how they come off."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from timm.layers import StdConv2d
from timm.layers.conv2d_same import Conv2dSame
from torch.nn.utils import parametrize

from swp_plugin import FilterSkeleton, StripeConv2d, attach_skeletons, detach_skeletons
from swp_plugin.skeleton import ineligibility_reason


class WeightSquaringConv(nn.Conv2d):
    """A custom conv whose forward is not linear in its weight."""

    def forward(self, x):
        return self._conv_forward(x, self.weight * self.weight.abs(), self.bias)


class PaddingConv(nn.Conv2d):
    """A custom conv that only pads differently: linear in its weight, so it is eligible."""

    def forward(self, x):
        return self._conv_forward(nn.functional.pad(x, (1, 0, 1, 0)), self.weight, self.bias)


def _net():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),  # 0: plain 3x3
        nn.Conv2d(8, 8, 1),  # 1: 1x1 -> per-filter gate
        nn.Conv2d(8, 8, 3, padding=1, groups=8),  # 2: depthwise
        Conv2dSame(8, 8, 3, stride=2),  # 3: timm same padding
        StdConv2d(8, 8, 3, padding=1),  # 4: weight standardisation -> unfolded into a parametrization, eligible
        WeightSquaringConv(8, 8, 3, padding=1),  # 5: nonlinear in weight -> excluded by probe
        PaddingConv(8, 8, 3),  # 6: custom but linear -> eligible
        nn.Conv2d(8, 4, (1, 3), padding=(0, 1)),  # 7: non-square kernel
    )


def test_eligibility_and_shapes():
    net = _net()
    skeletons, skipped = attach_skeletons(net, ignored=[net[7]])
    assert set(skeletons) == {"0", "1", "2", "3", "4", "6"}
    assert skeletons["0"].skeleton.shape == (8, 3, 3)
    assert skeletons["1"].skeleton.shape == (8, 1, 1)
    assert type(net[4]).__bases__[0] is nn.Conv2d  # the StdConv2d became a plain conv + parametrizations
    assert "not linear" in skipped["5"] and skipped["7"] == "in ignored_layers"
    names = {n for n, _ in net.named_parameters()}
    assert "0.parametrizations.weight.0.skeleton" in names  # FS are model parameters


def test_skeleton_multiplies_stripes_and_alive_mask_holds():
    conv = nn.Conv2d(4, 6, 3, padding=1)
    original = conv.weight.detach().clone()
    (fs,) = attach_skeletons(conv)[0].values()
    with torch.no_grad():
        fs.skeleton.copy_(torch.rand(6, 3, 3))
        fs.alive[0, 1, 1] = False
    expected = original * (fs.skeleton * fs.alive)[:, None]
    torch.testing.assert_close(conv.weight, expected)
    assert torch.all(conv.weight[0, :, 1, 1] == 0)


def test_detach_merge_and_discard():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3))
    original = net[0].weight.detach().clone()
    skeletons, _ = attach_skeletons(net)
    with torch.no_grad():
        skeletons["0"].skeleton.fill_(0.5)
    x = torch.randn(1, 3, 8, 8)
    y = net(x)
    assert detach_skeletons(net, merge=True) == 2
    assert not parametrize.is_parametrized(net[0])
    torch.testing.assert_close(net(x), y)
    torch.testing.assert_close(net[0].weight, original * 0.5)

    attach_skeletons(net)
    with torch.no_grad():
        net[0].parametrizations.weight[0].skeleton.zero_()
    detach_skeletons(net, merge=False)
    torch.testing.assert_close(net[0].weight, original * 0.5)  # the FS is dropped, weights unchanged


def test_stripe_conv_gets_one_value_per_stripe():
    layer = StripeConv2d.from_dense(nn.Conv2d(4, 5, 3, padding=1))
    (fs,) = attach_skeletons(layer)[0].values()
    assert isinstance(fs, FilterSkeleton) and fs.skeleton.shape == (layer.num_stripes,)
    x = torch.randn(1, 4, 6, 6)
    with torch.no_grad():
        fs.skeleton.zero_()
    torch.testing.assert_close(layer(x), layer.bias.detach().view(1, -1, 1, 1).expand(1, 5, 6, 6))


@pytest.mark.parametrize("module", [nn.Linear(3, 3), nn.BatchNorm2d(3)])
def test_non_convs_are_not_eligible(module):
    assert ineligibility_reason(module) == "not a 2-D convolution"


def test_conv_like_layers_that_are_not_conv2d_are_reported():
    from timm.layers import CondConv2d

    net = nn.Sequential(nn.Conv2d(3, 8, 3), CondConv2d(8, 8, 3, num_experts=2), nn.ConvTranspose2d(8, 4, 2))
    skeletons, skipped = attach_skeletons(net)
    assert set(skeletons) == {"0"}
    assert "CondConv2d is not an nn.Conv2d" in skipped["1"] and "ConvTranspose2d" in skipped["2"]
