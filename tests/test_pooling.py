"""SeparableMaxPool2d (swp_plugin/layers/pooling.py): the same function as F.max_pool2d to the bit (NaN and -inf
included, eager and scripted), refused where it has no separable form, swapped in by deploy() (also after a
load), one MaxPool node in ONNX."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import swp_plugin
from swp_plugin.layers.pooling import SeparableMaxPool2d
from swp_plugin.testing import calibrate_bn, random_stripe_model

CASES = [(3, 2, 1), (2, 2, 0), (3, 1, 1), ((3, 2), (1, 2), (1, 0)), (5, 3, 2), (1, 1, 0), (4, None, 2)]


@pytest.mark.parametrize("kernel,stride,padding", CASES)
def test_same_function_as_max_pool2d_to_the_bit(kernel, stride, padding):
    torch.manual_seed(0)
    pool = SeparableMaxPool2d(kernel, stride, padding)
    scripted = torch.jit.script(pool)
    for shape in [(2, 4, 13, 11), (1, 3, 5, 5), (1, 1, 8, 9), (3, 2, 16, 16)]:
        x = torch.randn(*shape)
        x[0, 0, 1, 1], x[-1, -1, -1, 0] = float("nan"), float("-inf")
        ref = F.max_pool2d(x, kernel, stride, padding)
        for f in (pool, scripted):
            y = f(x)
            assert y.shape == ref.shape and y.is_contiguous()
            assert torch.equal(y.isnan(), ref.isnan()) and torch.equal(y.nan_to_num(), ref.nan_to_num())


def test_from_pool_refuses_what_it_cannot_compute():
    assert SeparableMaxPool2d.from_pool(nn.MaxPool2d(3, 2, 1)) is not None
    for pool in (nn.MaxPool2d(3, 2, 1, dilation=2), nn.MaxPool2d(3, 2, 1, ceil_mode=True),
                 nn.MaxPool2d(3, 2, 1, return_indices=True), nn.AvgPool2d(3), nn.AdaptiveMaxPool2d(1)):
        assert SeparableMaxPool2d.from_pool(pool) is None
    with pytest.raises(ValueError, match="padding at most half"):
        SeparableMaxPool2d(3, 2, 2)
    with pytest.raises(RuntimeError):  # smaller than the window: max pooling's own error
        SeparableMaxPool2d(5, 1, 0)(torch.randn(1, 1, 3, 3))


@torch.no_grad()
def test_deploy_swaps_the_stem_pool_and_a_load_rebuilds_it(tmp_path):
    torch.manual_seed(0)
    model = random_stripe_model(timm.create_model("resnet10t", num_classes=5), 0.4)  # stem pool: 'maxpool'
    x = torch.randn(2, 3, 64, 64)
    calibrate_bn(model, x)
    deployed = swp_plugin.deploy(model.eval(), x)
    assert deployed.deploy_report.pools == ["maxpool"]
    assert isinstance(deployed.get_submodule("maxpool"), SeparableMaxPool2d)
    assert not any(type(m) is nn.MaxPool2d for m in deployed.modules())
    y = deployed(x)
    assert (y - model(x)).abs().max() <= 1e-4 * model(x).abs().max()
    path = tmp_path / "deployed.pt"
    swp_plugin.save(deployed, path)
    loaded = swp_plugin.load(path, timm.create_model("resnet10t", num_classes=5))  # a fresh, unpruned instance
    assert isinstance(loaded.get_submodule("maxpool"), SeparableMaxPool2d)
    assert torch.allclose(loaded(x), y, rtol=0, atol=1e-6)


def test_onnx_export_writes_one_max_pool_node(tmp_path):
    onnx = pytest.importorskip("onnx")
    path = tmp_path / "pool.onnx"
    torch.onnx.export(nn.Sequential(SeparableMaxPool2d(3, 2, 1)).eval(), (torch.randn(1, 2, 9, 9),), str(path),
                      dynamo=False)
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert ops == ["MaxPool"]
