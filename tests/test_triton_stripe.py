"""The Triton stripe kernel (``swp_plugin.layers.kernels.triton_stripe``) against the masked dense convolution.

On CPU tensors the op runs its program under Triton's interpreter (no GPU needed; shapes kept tiny, the interpreter
is numpy). A seeded fuzz (shapes, strides, dilations, paddings, kept fractions, dtypes, layouts, bias / residual /
ReLU) runs briefly in the default suite and longer with ``-m slow``; the reference is the dense convolution of the
same (rounded) operands in float64. Tests that need a real GPU skip without CUDA.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from swp_plugin import StripeConv2d, deploy
from swp_plugin.deployment import pipeline
from swp_plugin.layers.deployed_triton import TritonStripeConv2d
from swp_plugin.layers.kernels import triton_stripe
from swp_plugin.layers.padding import static_padding
from swp_plugin.testing import calibrate_bn, rel_err

pytest.importorskip("triton")
needs_cuda = pytest.mark.skipif(not triton_stripe.available("cuda"),
                                reason=f"no GPU run: {triton_stripe.unavailable_reason('cuda')}")

@pytest.fixture(autouse=True)
def _interpret():
    """The kernel on CPU tensors under Triton's interpreter, for this module's tests only."""
    triton_stripe.set_interpret(True)
    yield
    triton_stripe.set_interpret(os.environ.get("TRITON_INTERPRET", "") == "1")


#: max|diff| / max|y| against the float64 reference of the same operands (only the output's rounding differs; the
#: interpreter truncates float32 -> bfloat16 where a GPU rounds to nearest: up to one bfloat16 ulp, 2^-7 relative)
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _case(rng: random.Random) -> dict:
    kh, kw = rng.choice([1, 2, 3, 3, 5]), rng.choice([1, 3, 3, 4])
    dilation = (rng.choice([1, 1, 2]), rng.choice([1, 2]))
    padding = rng.choice([0, 1, (2, 1), "same", "valid"])
    stride = (rng.choice([1, 1, 2, 3]), rng.choice([1, 2]))
    if padding == "same":
        stride = (1, 1)
    size = (rng.randint(dilation[0] * (kh - 1) + 1, 11), rng.randint(dilation[1] * (kw - 1) + 1, 11))
    return dict(cin=rng.randint(1, 20), cout=rng.randint(1, 40), kernel=(kh, kw), stride=stride, padding=padding,
                dilation=dilation, size=size, batch=rng.randint(1, 2), keep=rng.choice([0.0, 0.15, 0.5, 1.0]),
                dtype=rng.choice(DTYPES), channels_last=rng.random() < 0.5, bias=rng.random() < 0.7,
                residual=rng.random() < 0.4, relu=rng.random() < 0.5)


def _layer(c: dict, seed: int) -> StripeConv2d:
    torch.manual_seed(seed)
    conv = nn.Conv2d(c["cin"], c["cout"], c["kernel"], c["stride"], c["padding"], c["dilation"], bias=c["bias"])
    mask = torch.rand(c["cout"], *c["kernel"]) < c["keep"]
    return StripeConv2d.from_dense(conv, mask, backend="triton").to(c["dtype"]).eval()


def _run_case(c: dict, seed: int) -> None:
    layer = _layer(c, seed)
    x = torch.randn(c["batch"], c["cin"], *c["size"]).to(c["dtype"])
    if c["channels_last"]:
        x = x.to(memory_format=torch.channels_last)
    pad = static_padding(layer.padding, layer.kernel_size, layer.dilation)
    with torch.no_grad():
        ref = F.conv2d(F.pad(x.double(), pad), layer.dense_weight().double(),
                       None if layer.bias is None else layer.bias.double(), layer.stride, 0, layer.dilation)
    residual = torch.randn_like(ref).to(c["dtype"]) if c["residual"] else None
    plan = triton_stripe.make_tile_plan(layer.stripe_out, layer.stripe_pos, layer.out_channels, layer.kernel_size,
                                        layer.dilation, pad[2], pad[0])
    with torch.no_grad():
        y = triton_stripe.conv(x, layer.weight, layer.bias, plan, layer.out_channels, tuple(ref.shape[2:]),
                               layer.stride, residual, "relu" if c["relu"] else None)
        plain = layer(x)  # through StripeConv2d's backend hook
    assert layer.active_backend == "triton"
    want = ref + (residual.double() if residual is not None else 0)
    want = want.clamp_min(0) if c["relu"] else want
    assert y.dtype == c["dtype"] and y.shape == want.shape
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()  # unambiguous
    assert y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    scale = float(want.abs().max()) or 1.0
    assert float((y.double() - want).abs().max()) / scale <= TOLERANCE[c["dtype"]], c
    scale = float(ref.abs().max()) or 1.0
    assert float((plain.double() - ref).abs().max()) / scale <= TOLERANCE[c["dtype"]], c


@pytest.mark.parametrize("seed", range(10))
def test_fuzz_against_masked_dense(seed):
    _run_case(_case(random.Random(1000 + seed)), seed)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(10, 160))
def test_fuzz_against_masked_dense_long(seed):
    _run_case(_case(random.Random(1000 + seed)), seed)


def _check_plan(plan: triton_stripe.TilePlan, layer: StripeConv2d) -> None:
    """Every output channel in exactly one tile; every kept stripe read exactly once, at its own position."""
    kh, kw = layer.kernel_size
    outs = plan.tile_out[plan.tile_out >= 0]
    assert sorted(outs.tolist()) == list(range(layer.out_channels))
    seen = []
    ptr = plan.tile_ptr.tolist()
    for t in range(plan.tile_out.shape[0]):
        for e in range(ptr[t], ptr[t + 1]):
            dy, dx = plan.entry_offsets[e].tolist()
            for slot, row in enumerate(plan.entry_rows[e].tolist()):
                if row >= 0:
                    assert int(layer.stripe_out[row]) == int(plan.tile_out[t, slot])
                    pos = int(layer.stripe_pos[row])
                    assert (dy, dx) == ((pos // kw) * layer.dilation[0], (pos % kw) * layer.dilation[1])
                    seen.append(row)
    assert sorted(seen) == list(range(layer.num_stripes))


def test_tile_plan_groups_channels_that_share_their_pattern():
    conv = nn.Conv2d(4, 96, 3)
    mask = torch.zeros(96, 3, 3, dtype=torch.bool)
    mask[0::3, 1, 1] = True  # three patterns of 32 channels each, interleaved
    mask[1::3, 0, :] = True
    mask[2::3, :, 2] = True
    layer = StripeConv2d.from_dense(conv, mask)
    plan = triton_stripe.make_tile_plan(layer.stripe_out, layer.stripe_pos, 96, (3, 3), (1, 1), 0, 0)
    assert plan.efficiency == 1.0 and plan.block_o == 32 and plan.tile_out.shape[0] == 3
    _check_plan(plan, layer)
    for block_o in triton_stripe.BLOCK_OS:
        random_mask = torch.rand(96, 3, 3) < 0.3
        random_mask[5] = False  # a channel without stripes still gets its tile (bias, residual, ReLU)
        other = StripeConv2d.from_dense(conv, random_mask)
        _check_plan(triton_stripe.make_tile_plan(other.stripe_out, other.stripe_pos, 96, (3, 3), (1, 1), 0, 0,
                                                 block_o), other)
    with pytest.raises(ValueError, match="block_o"):
        triton_stripe.make_tile_plan(layer.stripe_out, layer.stripe_pos, 96, (3, 3), (1, 1), 0, 0, 8)


def test_layer_uses_the_kernel_only_where_it_applies():
    conv = nn.Conv2d(3, 5, 3, padding=1, padding_mode="reflect")
    layer = StripeConv2d.from_dense(conv, torch.rand(5, 3, 3) < 0.5, backend="triton")
    conv = layer.to_dense()
    x = torch.randn(1, 3, 6, 5)
    with torch.no_grad():
        y = layer(x)
    assert layer.active_backend == "triton"
    assert rel_err(conv(x), y) < 1e-5
    y = layer(x.requires_grad_(True))  # gradients needed: the differentiable PyTorch path
    assert layer.active_backend == "stripe" and y.requires_grad
    with torch.no_grad():
        layer.double()(x.double())
    assert layer.active_backend == "stripe"  # float64: not a kernel dtype
    layer.float()
    for switch in (triton_stripe.set_enabled, triton_stripe.set_interpret):
        switch(False)
        try:
            assert not triton_stripe.available("cpu")
            with torch.no_grad():
                assert rel_err(conv(x.detach()), layer(x.detach())) < 1e-5
            assert layer.active_backend == "stripe"
        finally:
            switch(True)


def test_auto_layer_that_chose_the_kernel_stays_differentiable():
    conv = nn.Conv2d(3, 5, 3, padding=1)
    layer = StripeConv2d.from_dense(conv, torch.rand(5, 3, 3) < 0.5)  # backend 'auto'
    conv = layer.to_dense()
    x = torch.randn(1, 3, 6, 5)
    layer.choices[(tuple(x.shape), x.dtype, x.device.type, torch.get_num_threads())] = "triton"  # as on a GPU
    with torch.no_grad():
        y = layer(x)
    assert layer.active_backend == "triton" and rel_err(conv(x), y) < 1e-5
    y = layer(x)
    assert layer.active_backend == "stripe" and y.requires_grad
    y.sum().backward()
    assert layer.weight.grad is not None


def test_op_refuses_bad_input_with_a_clear_error():
    layer = _layer(dict(cin=3, cout=4, kernel=(3, 3), stride=(1, 1), padding=1, dilation=(1, 1), bias=True,
                        keep=0.5, dtype=torch.float32), 0)
    plan = triton_stripe.make_tile_plan(layer.stripe_out, layer.stripe_pos, 4, (3, 3), (1, 1), 1, 1)
    x = torch.randn(1, 3, 5, 5)
    with pytest.raises(ValueError, match="share one of"):
        triton_stripe.conv(x.half(), layer.weight, layer.bias, plan, 4, (5, 5), (1, 1))
    with pytest.raises(ValueError, match="C_in=2"):
        triton_stripe.conv(x[:, :2], layer.weight, layer.bias, plan, 4, (5, 5), (1, 1))
    with pytest.raises(ValueError, match="residual"):
        triton_stripe.conv(x, layer.weight, layer.bias, plan, 4, (5, 5), (1, 1), residual=torch.randn(1, 4, 4, 4))
    triton_stripe.set_enabled(False)
    try:
        with pytest.raises(RuntimeError, match="disabled"):
            triton_stripe.conv(x, layer.weight, layer.bias, plan, 4, (5, 5), (1, 1))
    finally:
        triton_stripe.set_enabled(True)


def _deployed_layer(dtype=torch.float32, act="relu", residual=True) -> tuple[TritonStripeConv2d, nn.Conv2d]:
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 8, 3, stride=2, padding=1, dilation=1)
    mask = torch.rand(8, 3, 3) < 0.4
    with torch.no_grad():
        conv.weight.mul_(mask[:, None])
    layer = StripeConv2d.from_dense(conv, mask).to(dtype)
    return TritonStripeConv2d.from_stripe(layer, act=act, residual=residual).eval(), conv.to(dtype)


def test_op_opcheck_fake_and_schema():
    layer, _ = _deployed_layer()
    x = torch.randn(2, 6, 7, 7)
    args = (x, layer.weight, layer.tile_ptr, layer.entry_offsets, layer.entry_rows, layer.tile_out, layer.bias,
            torch.randn(2, 8, 4, 4), 8, 4, 4, 2, 2, 1)
    torch.library.opcheck(torch.ops.swp_triton.stripe_conv2d.default, args,
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("dtype", DTYPES)
def test_deployed_layer_scripts_compiles_and_keeps_channels_last(dtype):
    layer, conv = _deployed_layer(dtype)
    x = torch.randn(2, 6, 9, 8).to(dtype)
    residual = torch.randn(2, 8, 5, 4).to(dtype)
    want = torch.relu(conv.double()(x.double()) + residual.double())
    with torch.no_grad():
        y = layer(x, residual)
        assert rel_err(want, y.double()) <= TOLERANCE[dtype]
        y_cl = layer(x.to(memory_format=torch.channels_last), residual)
        assert y_cl.is_contiguous(memory_format=torch.channels_last) and not y_cl.is_contiguous()
        assert rel_err(y.double(), y_cl.double()) <= TOLERANCE[dtype]
        scripted = torch.jit.freeze(torch.jit.script(layer))
        assert rel_err(y.double(), scripted(x, residual).double()) == 0
        compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
        assert rel_err(y.double(), compiled(x, residual).double()) == 0
    assert "triton(block_o=" in repr(layer)


def test_damaged_plan_is_refused_at_load_and_never_read_out_of_bounds():
    layer, _ = _deployed_layer(act="none", residual=False)
    state = layer.state_dict()
    assert not any(k in state for k in ("tile_ptr", "entry_offsets", "entry_rows", "tile_out"))  # derived, not saved
    copy_of(layer).load_state_dict(state)
    for key, value in (("stripe_out", 10**6), ("stripe_pos", -5)):  # the indexes the plan is derived from
        bad = {**state, key: state[key].clone().fill_(value)}
        with pytest.raises(ValueError, match=key):
            copy_of(layer).load_state_dict(bad)
    x = torch.randn(1, 6, 7, 7)
    with torch.no_grad():
        y = torch.ops.swp_triton.stripe_conv2d(x, layer.weight, layer.tile_ptr, layer.entry_offsets,
                                               layer.entry_rows.clone().fill_(10**6), layer.tile_out, layer.bias,
                                               None, 8, 4, 4, 2, 2, 0)
    assert torch.equal(y, layer.bias.view(1, 8, 1, 1).expand_as(y))  # every stripe masked out: the bias alone


def copy_of(module: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(module)


def test_deployed_layer_counts_the_macs_of_its_stripes():
    from swp_plugin.layers.deployed import DeployedStripeConv2d
    from swp_plugin.measure.counting import count_ops_and_params

    layer, _ = _deployed_layer(act="none", residual=False)
    cpu_form = DeployedStripeConv2d.from_stripe(layer.to_stripe())
    x = torch.randn(1, 6, 7, 7)
    macs, params = count_ops_and_params(nn.Sequential(layer), x)
    assert macs > 0 and (macs, params) == count_ops_and_params(nn.Sequential(cpu_form), x)


def test_deployed_layer_falls_back_to_pytorch_where_the_kernel_cannot_run():
    layer, conv = _deployed_layer(act="none", residual=False)
    x = torch.randn(1, 6, 7, 7, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="cannot run here"), torch.no_grad():
        y = layer(x)
    assert rel_err(conv.double()(x), y) < 1e-6


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(4, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + y)


def test_deploy_with_the_triton_layer_folds_fuses_and_matches(monkeypatch):
    """deploy()'s CUDA branch exercised on CPU: the per-layer kernel is the Triton layer (interpreted here)."""
    from swp_plugin.testing import random_stripe_model

    model = random_stripe_model(_Block(), keep=0.4)
    x = torch.randn(2, 4, 6, 6)
    calibrate_bn(model, x)
    monkeypatch.setattr(pipeline, "_kernel_for", lambda x, stripe, ok: (TritonStripeConv2d, None))
    deployed = deploy(model.eval(), x, choices={"conv1": "kernel", "conv2": "kernel"})
    layers = [m for m in deployed.modules() if isinstance(m, TritonStripeConv2d)]
    assert len(layers) == 2 and len(deployed.deploy_report.fused) == 2
    assert {(m.act, m.residual) for m in layers} == {("relu", False), ("relu", True)}
    with torch.no_grad():
        assert rel_err(model(x), deployed(x)) < 1e-5
    timed = deploy(model.eval(), x)  # measured: the interpreter loses, dense is kept
    assert {c["impl"] for c in timed.deploy_report.choices} == {"dense"}
    assert all("kernel_ms" in c for c in timed.deploy_report.choices)


def test_deploy_on_cpu_never_picks_the_triton_layer():
    from swp_plugin.testing import random_stripe_model

    model = random_stripe_model(_Block(), keep=0.4)
    x = torch.randn(1, 4, 6, 6)
    calibrate_bn(model, x)
    deployed = deploy(model.eval(), x)
    assert not any(isinstance(m, TritonStripeConv2d) for m in deployed.modules())


def test_same_result_with_triton_interpret_set_before_import():
    """``TRITON_INTERPRET=1`` (set before Triton is imported) makes ``triton.jit`` interpret too: same output."""
    code = (
        "import torch, torch.nn as nn\n"
        "from swp_plugin import StripeConv2d\n"
        "from swp_plugin.layers.kernels import triton_kernel\n"
        "from triton.runtime.interpreter import InterpretedFunction\n"
        "assert isinstance(triton_kernel.compiled, InterpretedFunction)\n"
        "torch.manual_seed(0)\n"
        "conv = nn.Conv2d(3, 6, 3, padding=1)\n"
        "layer = StripeConv2d.from_dense(conv, torch.rand(6, 3, 3) < 0.5, backend='triton')\n"
        "x = torch.randn(1, 3, 5, 5)\n"
        "with torch.no_grad():\n"
        "    y, ref = layer(x), layer.to_dense()(x)\n"
        "assert layer.active_backend == 'triton'\n"
        "print(float((y - ref).abs().max() / ref.abs().max()))\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert float(out.stdout.strip().splitlines()[-1]) < 1e-5


# ---------------------------------------------------------------------------------------------------- real GPU
@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_gpu_kernel_matches_dense(dtype, channels_last):
    rng = random.Random(7)
    for seed in range(20):
        c = _case(rng)
        layer = _layer(c, seed).to(dtype).cuda()
        x = torch.randn(c["batch"], c["cin"], *c["size"], device="cuda").to(dtype)
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        with torch.no_grad():
            y = layer(x)
            ref = layer.to_dense().double()(x.double())
        assert layer.active_backend == "triton"
        assert rel_err(ref, y.double()) <= TOLERANCE[dtype], c


@needs_cuda
def test_gpu_deploy_chooses_per_layer_and_compiles():
    from swp_plugin.testing import random_stripe_model

    model = random_stripe_model(_Block(), keep=0.2).cuda()
    x = torch.randn(8, 4, 16, 16, device="cuda")
    calibrate_bn(model, x)
    deployed = deploy(model.eval(), x)
    assert all("kernel_ms" in c and "dense_ms" in c for c in deployed.deploy_report.choices)
    with torch.no_grad():
        assert rel_err(model(x), deployed(x)) < 1e-4
        compiled = torch.compile(deployed, fullgraph=True)
        assert rel_err(deployed(x), compiled(x)) < 1e-4
