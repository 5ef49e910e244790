"""MACs/params of stripe-pruned models (paper convention: stripe weights + stripe indexes)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch_pruning as tp
from timm.layers.conv2d_same import Conv2dSame

from swp_plugin import StripeConv2d, count_ops_and_params


def test_stripe_conv_macs_and_params():
    conv = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False)
    mask = torch.rand(16, 3, 3) > 0.6
    layer = StripeConv2d.from_dense(conv, mask)
    x = torch.randn(1, 8, 10, 10)
    macs, params = count_ops_and_params(layer, x)
    kept = int(mask.sum())
    assert macs == kept * 8 * 5 * 5
    assert params == kept * 8 + 16 * 9
    assert count_ops_and_params(layer, x, include_indexes=False)[1] == kept * 8


def test_dense_model_matches_torch_pruning_and_subclasses_are_counted():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1))
    x = torch.randn(1, 3, 8, 8)
    assert count_ops_and_params(model, x) == tuple(tp.utils.count_ops_and_params(model, x))
    same = Conv2dSame(3, 8, 3, stride=2)  # torch-pruning's counter looks types up exactly: 0 MACs there
    assert count_ops_and_params(same, x)[0] == 8 * 3 * 9 * 4 * 4 + 8 * 4 * 4
