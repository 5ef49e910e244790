"""MACs/params of stripe-pruned models (paper convention: stripe weights + stripe indexes)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch_pruning as tp
from timm.layers.conv2d_same import Conv2dSame

import swp_plugin
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


def _phases():
    """A CIFAR resnet20 fresh, with skeletons (half the stripes dead), pruned, deployed: (phase, model, input)."""
    from swp_plugin.models import resnet20
    from swp_plugin.testing import calibrate_bn, randomize_skeletons, regularized_step

    model = resnet20(num_classes=10, width=0.5)
    x = torch.randn(4, 3, 32, 32)
    yield "fresh", model, x
    pruner = swp_plugin.StripePruner(model, x[:1], ignored_layers=[model.fc])
    yield "attached", model, x
    randomize_skeletons(pruner, dead_stripes=0.5, dead_filters=0.2)
    regularized_step(model, pruner, x)
    calibrate_bn(model, x)
    yield "trained", model, x
    pruner.step()
    yield "pruned", model, x
    yield "deployed", swp_plugin.deploy(model.eval(), x[:1]), x


def test_torch_pruning_counter_sees_stripes_at_every_phase():
    figures = {}
    for phase, model, x in _phases():
        theirs = tuple(tp.utils.count_ops_and_params(model, x[:1]))
        assert theirs == count_ops_and_params(model, x[:1], include_indexes=False), phase
        figures[phase] = theirs[0]
    assert figures["fresh"] == figures["attached"]  # every stripe alive
    assert figures["trained"] < 0.6 * figures["fresh"]  # half the stripes dead: counted as step() converts them
    assert figures["pruned"] <= figures["trained"]  # the channel cleanup removes the next layers' inputs too


def test_skeleton_conv_counts_its_live_stripes_and_grouped_convs_stay_dense():
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1, bias=False), nn.Conv2d(8, 8, 3, padding=1, groups=8))
    x = torch.randn(1, 4, 6, 6)
    dense = tp.utils.count_ops_and_params(model, x)[0]
    pruner = swp_plugin.StripePruner(model, x)
    with torch.no_grad():
        pruner.skeleton("0").alive[:, 0, :] = False  # 8 x 3 of the 72 stripes of the first conv dead
    macs = tp.utils.count_ops_and_params(model, x)[0]
    assert dense - macs == 8 * 3 * 4 * 36  # the depthwise conv is counted dense (it stays dense at step())


def test_print_tool_lines_up_with_skeletons_attached():
    from swp_plugin.models import resnet20

    model = resnet20(num_classes=10, width=0.5)
    x = torch.randn(2, 3, 32, 32)
    tp.utils.print_tool.before_pruning(model)
    swp_plugin.StripePruner(model, x[:1], ignored_layers=[model.fc])
    assert len(str(model).splitlines()) == len(tp.utils.print_tool._before_pruning.splitlines())
    diff = tp.utils.print_tool.after_pruning(model, do_print=False)
    changed = [line for line in diff.splitlines() if " => " in line]
    assert changed and all("FilterSkeleton" in line or "ChannelMask" in line for line in changed)
    assert all(line.split(" => ")[0].split("(")[1] in line.split(" => ")[1] for line in changed)  # same layer
