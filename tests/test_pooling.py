"""SeparableMaxPool2d and NativeMaxPool2d (swp_plugin/layers/pooling.py, the kernel's op swp_stripe::max_pool2d):
the same function as F.max_pool2d to the bit (NaN and -inf included, eager and scripted, random geometries),
refused where there is no such form, swapped in by deploy() (also after a load), one MaxPool node in ONNX."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import swp_plugin
from swp_plugin.layers.kernels import cpu as cpu_kernel
from swp_plugin.layers.pooling import NativeMaxPool2d, SeparableMaxPool2d, fast_max_pool
from swp_plugin.testing import calibrate_bn, random_stripe_model

needs_cpp = pytest.mark.skipif(not cpu_kernel.available(), reason=f"no compiled kernel: {cpu_kernel.build_error()}")

CASES = [(3, 2, 1), (2, 2, 0), (3, 1, 1), ((3, 2), (1, 2), (1, 0)), (5, 3, 2), (1, 1, 0), (4, None, 2)]


def _assert_same(y: torch.Tensor, ref: torch.Tensor) -> None:
    assert y.shape == ref.shape and y.is_contiguous() and y.dtype == ref.dtype
    assert torch.equal(y.isnan(), ref.isnan()) and torch.equal(y.nan_to_num(), ref.nan_to_num())


def _classes():
    return [SeparableMaxPool2d] + ([NativeMaxPool2d] if cpu_kernel.available() else [])


@pytest.mark.parametrize("kernel,stride,padding", CASES)
def test_same_function_as_max_pool2d_to_the_bit(kernel, stride, padding):
    torch.manual_seed(0)
    for cls in _classes():
        pool = cls(kernel, stride, padding)
        scripted = torch.jit.script(pool)
        for shape in [(2, 4, 13, 11), (1, 3, 5, 5), (1, 1, 8, 9), (3, 2, 16, 16)]:
            x = torch.randn(*shape)
            x[0, 0, 1, 1], x[-1, -1, -1, 0] = float("nan"), float("-inf")
            ref = F.max_pool2d(x, kernel, stride, padding)
            for f in (pool, scripted):
                _assert_same(f(x), ref)
            _assert_same(pool(x.double()), F.max_pool2d(x.double(), kernel, stride, padding))  # not the op's dtype
            _assert_same(pool(x.transpose(2, 3)), F.max_pool2d(x.transpose(2, 3), kernel, stride, padding))


@needs_cpp
def test_native_op_against_max_pool2d_on_random_geometries():
    """200 random cases (kernel 1-7, stride 1-4, padding up to half the kernel, sizes down to the window, rows wide
    enough for the vectorised stride-2 column pass, NaN and inf sprinkled): the op equals F.max_pool2d to the bit
    (run under ASan by `make sanitize`)."""
    gen = torch.Generator().manual_seed(3)

    def draw(high: int) -> int:
        return int(torch.randint(1, high + 1, (1,), generator=gen))

    for _ in range(200):
        kh, kw, sh, sw = draw(7), draw(7), draw(4), draw(4)
        ph, pw = draw(kh // 2 + 1) - 1, draw(kw // 2 + 1) - 1
        h, w = max(1, kh - 2 * ph) + draw(12) - 1, max(1, kw - 2 * pw) + draw(40) - 1  # (wide: 8 outputs at once)
        x = torch.randn(draw(2), draw(5), h, w, generator=gen)
        x.view(-1)[torch.randint(0, x.numel(), (3,), generator=gen)] = torch.tensor([float("nan"), float("inf"),
                                                                                     float("-inf")])
        _assert_same(torch.ops.swp_stripe.max_pool2d(x, kh, kw, sh, sw, ph, pw),
                     F.max_pool2d(x, (kh, kw), (sh, sw), (ph, pw)))
    with pytest.raises(RuntimeError, match="padding in"):
        torch.ops.swp_stripe.max_pool2d(torch.randn(1, 1, 8, 8), 3, 3, 1, 1, 2, 0)
    with pytest.raises(RuntimeError, match="smaller than the window"):
        torch.ops.swp_stripe.max_pool2d(torch.randn(1, 1, 2, 8), 5, 3, 1, 1, 1, 0)
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.swp_stripe.max_pool2d(torch.randn(1, 1, 8, 8).double(), 3, 3, 1, 1, 1, 1)


def test_from_pool_refuses_what_it_cannot_compute():
    assert SeparableMaxPool2d.from_pool(nn.MaxPool2d(3, 2, 1)) is not None
    assert type(fast_max_pool(nn.MaxPool2d(3, 2, 1))) is (NativeMaxPool2d if cpu_kernel.available()
                                                           else SeparableMaxPool2d)
    assert fast_max_pool(nn.MaxPool2d(3, 2, 1, ceil_mode=True)) is None
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
    assert type(deployed.get_submodule("maxpool")) is type(fast_max_pool(nn.MaxPool2d(3, 2, 1)))
    assert not any(type(m) is nn.MaxPool2d for m in deployed.modules())
    y = deployed(x)
    assert (y - model(x)).abs().max() <= 1e-4 * model(x).abs().max()
    assert torch.equal(torch.compile(deployed, backend="eager", fullgraph=True)(x), y)
    path = tmp_path / "deployed.pt"
    swp_plugin.save(deployed, path)
    loaded = swp_plugin.load(path, timm.create_model("resnet10t", num_classes=5))  # a fresh, unpruned instance
    assert isinstance(loaded.get_submodule("maxpool"), SeparableMaxPool2d)
    assert torch.allclose(loaded(x), y, rtol=0, atol=1e-6)


def test_onnx_export_writes_one_max_pool_node(tmp_path):
    onnx = pytest.importorskip("onnx")
    path = tmp_path / "pool.onnx"
    for cls in _classes():
        torch.onnx.export(nn.Sequential(cls(3, 2, 1)).eval(), (torch.randn(1, 2, 9, 9),), str(path), dynamo=False)
        assert [n.op_type for n in onnx.load(str(path)).graph.node] == ["MaxPool"]
