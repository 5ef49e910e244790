"""StripeConv2d against dense convolution with masked weights: forward, backward, conversions."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers.conv2d_same import Conv2dSame

from swp_plugin import StripeConv2d
from swp_plugin.layers.config import set_backend, use_backend
from swp_plugin.layers.kernels import cpu as cpu_kernel
from swp_plugin.layers.stripe_conv import BACKENDS

FORCED = ("stripe", "dense", "cpp")
needs_cpp = pytest.mark.skipif(not cpu_kernel.available(), reason=f"no compiled kernel: {cpu_kernel.build_error()}")

CASES = [
    # in, out, kernel, stride, padding, dilation, bias, padding_mode, size
    (8, 16, 3, 1, 1, 1, False, "zeros", (9, 9)),
    (8, 16, 3, 2, 1, 1, True, "zeros", (11, 10)),
    (5, 7, (3, 5), (2, 1), (1, 2), 1, True, "zeros", (13, 9)),
    (6, 6, 3, 1, 2, 2, False, "zeros", (10, 10)),
    (4, 9, 1, 1, 0, 1, True, "zeros", (7, 7)),
    (4, 9, 1, 2, 0, 1, False, "zeros", (7, 8)),
    (3, 8, 7, 2, 3, 1, False, "zeros", (17, 17)),
    (4, 5, 3, 1, "same", 1, True, "zeros", (8, 9)),
    (4, 5, 4, 1, "same", 1, False, "zeros", (8, 9)),
    (4, 5, 3, 1, "valid", 1, False, "zeros", (8, 9)),
    (4, 6, 3, 1, 1, 1, True, "reflect", (8, 8)),
    (4, 6, 3, 2, 1, 1, False, "replicate", (9, 8)),
    (4, 6, 3, 1, 1, 1, False, "circular", (8, 8)),
]


def _masked_conv(args, mask_p: float = 0.5) -> tuple[nn.Conv2d, torch.Tensor]:
    cin, cout, k, s, p, d, bias, mode, _ = args
    conv = nn.Conv2d(cin, cout, k, stride=s, padding=p, dilation=d, bias=bias, padding_mode=mode)
    kh, kw = conv.kernel_size
    mask = torch.rand(cout, kh, kw) > mask_p
    with torch.no_grad():
        conv.weight.mul_(mask[:, None])
    return conv, mask


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("args", CASES, ids=lambda a: "-".join(map(str, a[:8])))
def test_forward_and_backward_match_masked_dense(args, backend):
    conv, mask = _masked_conv(args)
    layer = StripeConv2d.from_dense(conv, mask, backend=backend)
    assert layer.num_stripes == int(mask.sum())
    x = torch.randn(2, args[0], *args[-1], requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    y_dense, y_stripe = conv(x), layer(x2)
    torch.testing.assert_close(y_stripe, y_dense, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y_dense)
    y_dense.backward(g)
    y_stripe.backward(g)
    torch.testing.assert_close(x2.grad, x.grad, rtol=1e-5, atol=1e-5)
    kh, kw = conv.kernel_size
    dense_grad = conv.weight.grad.permute(0, 2, 3, 1)[layer.stripe_out, layer.stripe_pos // kw, layer.stripe_pos % kw]
    torch.testing.assert_close(layer.weight.grad, dense_grad, rtol=1e-5, atol=1e-5)
    if conv.bias is not None:
        torch.testing.assert_close(layer.bias.grad, conv.bias.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("size", [(7, 7), (8, 8), (9, 12)])
def test_timm_dynamic_same_padding(size):
    conv = Conv2dSame(4, 6, 3, stride=2, bias=True)
    layer = StripeConv2d.from_dense(conv)
    assert layer.same_dynamic
    x = torch.randn(1, 4, *size)
    torch.testing.assert_close(layer(x), conv(x), rtol=1e-5, atol=1e-5)
    assert isinstance(layer.to_dense(), Conv2dSame)


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_one_empty_positions_and_filter_without_stripes(backend):
    conv = nn.Conv2d(6, 5, 3, padding=1, bias=True)
    mask = torch.zeros(5, 3, 3, dtype=torch.bool)
    mask[0, 1, 1] = mask[1, 0, 2] = mask[3, :, 0] = True  # filters 2 and 4 have no stripe, most positions empty
    with torch.no_grad():
        conv.weight.mul_(mask[:, None])
    layer = StripeConv2d.from_dense(conv, mask, backend=backend)
    x = torch.randn(1, 6, 5, 7)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), conv(x), rtol=1e-5, atol=1e-5)
        y = layer(x)
    torch.testing.assert_close(y[0, 2], conv.bias[2].expand(5, 7).detach())


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_stripes_at_all_outputs_bias(backend):
    conv = nn.Conv2d(3, 4, 3, padding=1)
    layer = StripeConv2d.from_dense(conv, torch.zeros(4, 3, 3, dtype=torch.bool), backend=backend)
    with torch.no_grad():
        y = layer(torch.randn(2, 3, 6, 6))
    torch.testing.assert_close(y, conv.bias.detach().view(1, 4, 1, 1).expand(2, 4, 6, 6))


def test_from_dense_keeps_nonzero_stripes_by_default_and_to_dense_round_trips():
    conv, mask = _masked_conv(CASES[1])
    layer = StripeConv2d.from_dense(conv)
    assert torch.equal(layer.stripe_mask(), conv.weight.ne(0).any(1))
    dense = layer.to_dense()
    torch.testing.assert_close(dense.weight, conv.weight)
    torch.testing.assert_close(dense.bias, conv.bias)
    x = torch.randn(2, 8, 11, 10)
    torch.testing.assert_close(dense(x), conv(x))


def test_stripes_sorted_by_position_then_channel():
    conv, _ = _masked_conv(CASES[0])
    layer = StripeConv2d.from_dense(conv)
    key = layer.stripe_pos * layer.out_channels + layer.stripe_out
    assert torch.all(key[1:] > key[:-1])


def test_remove_channels_matches_dense_slicing():
    conv, _ = _masked_conv(CASES[1])
    layer = StripeConv2d.from_dense(conv)
    layer.remove_out_channels([0, 5, 15])
    layer.remove_in_channels([2, 3])
    keep_out = [i for i in range(16) if i not in (0, 5, 15)]
    keep_in = [i for i in range(8) if i not in (2, 3)]
    ref = nn.Conv2d(6, 13, 3, stride=2, padding=1)
    with torch.no_grad():
        ref.weight.copy_(conv.weight[keep_out][:, keep_in])
        ref.bias.copy_(conv.bias[keep_out])
    x = torch.randn(2, 6, 11, 10)
    assert (layer.in_channels, layer.out_channels) == (6, 13)
    torch.testing.assert_close(layer(x), ref(x), rtol=1e-5, atol=1e-5)


def test_extra_repr_shows_strip_and_backend():
    conv, mask = _masked_conv(CASES[0])
    layer = StripeConv2d.from_dense(conv, mask)
    assert f"Strip(8, {int(mask.sum())})" in repr(layer) and "backend=auto)" in repr(layer)
    with torch.no_grad():
        layer(torch.randn(1, 8, 9, 9))
    assert f"backend=auto({layer.active_backend})" in repr(layer)
    layer.backend = "dense"
    assert "backend=dense)" in repr(layer)


def test_state_dict_round_trip_refreshes_positions():
    conv, mask = _masked_conv(CASES[0])
    src = StripeConv2d.from_dense(conv, mask)
    dst = StripeConv2d(8, 16, 3, padding=1, bias=False, num_stripes=src.num_stripes)
    dst.load_state_dict(src.state_dict())
    x = torch.randn(1, 8, 9, 9)
    torch.testing.assert_close(dst(x), src(x))


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="groups=1"):
        StripeConv2d.from_dense(nn.Conv2d(4, 4, 3, groups=4))
    with pytest.raises(ValueError, match="mask must have shape"):
        StripeConv2d.from_dense(nn.Conv2d(4, 4, 3), torch.ones(4, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="backend"):
        StripeConv2d(4, 4, 3, backend="cuda-magic")


def test_jit_trace_matches_eager():
    conv, mask = _masked_conv(CASES[1])
    layer = StripeConv2d.from_dense(conv, mask).eval()
    x = torch.randn(1, 8, 11, 10)
    traced = torch.jit.trace(layer, x)
    torch.testing.assert_close(traced(x), layer(x))


def test_matches_functional_conv_on_odd_sizes():
    conv = nn.Conv2d(3, 4, (2, 3), stride=(3, 2), padding=(0, 1), bias=False)
    layer = StripeConv2d.from_dense(conv)
    x = torch.randn(3, 3, 7, 5)
    torch.testing.assert_close(layer(x), F.conv2d(x, conv.weight, None, (3, 2), (0, 1)), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- backends: kernel tiling, fallback, auto
LARGE = [
    # in, out, kernel, stride, padding, dilation, bias, padding_mode, size, batch: several tiles / row blocks
    (24, 40, 3, 1, 1, 1, True, "zeros", (37, 41), 5),
    (16, 48, 3, 2, 1, 1, False, "zeros", (33, 30), 3),
    (16, 20, 3, 3, 2, 2, True, "zeros", (29, 31), 2),
    (8, 12, 5, 1, 2, 1, False, "zeros", (70, 66), 1),
    (64, 96, 3, 1, 1, 1, False, "zeros", (4, 4), 40),
    (64, 96, 3, 1, 1, 1, True, "zeros", (2, 3), 9),
    (12, 16, (1, 7), 1, (0, 3), 1, False, "zeros", (15, 19), 2),
    (12, 16, 3, 1, 0, 1, True, "zeros", (17, 16), 3),
    (8, 10, 3, 2, 1, 1, True, "reflect", (21, 20), 2),
    # channel planes of a multiple of 512 floats: the AVX2 build copies the input with a padded channel stride first
    (16, 24, 3, 1, 1, 1, True, "zeros", (32, 32), 1),
    (12, 20, 3, 1, 1, 1, False, "zeros", (16, 32), 3),
]


@pytest.mark.parametrize("backend", FORCED)
@pytest.mark.parametrize("args", LARGE, ids=lambda a: "-".join(map(str, a[:8])) + f"-n{a[-1]}")
@pytest.mark.parametrize("keep", [0.2, 0.6])
def test_backends_on_larger_shapes_in_inference(args, backend, keep):
    conv, mask = _masked_conv(args[:-1], 1 - keep)
    layer = StripeConv2d.from_dense(conv, mask, backend=backend).eval()
    x = torch.randn(args[-1], args[0], *args[-2])
    with torch.inference_mode():
        y = layer(x)
        torch.testing.assert_close(y, conv(x), rtol=1e-4, atol=1e-4)
    expected = backend if backend != "cpp" or cpu_kernel.available() else "stripe"
    assert layer.active_backend == expected


@needs_cpp
@pytest.mark.parametrize("threads", [1, 2])
def test_cpp_kernel_thread_counts_and_bias_free_single_tile(threads):
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for args in (CASES[0], CASES[2], LARGE[0][:-1], LARGE[4][:-1], LARGE[-2][:-1]):
            conv, mask = _masked_conv(args)
            layer = StripeConv2d.from_dense(conv, mask, backend="cpp")
            for batch in (1, 2, 7):
                x = torch.randn(batch, args[0], *args[-1])
                with torch.no_grad():
                    torch.testing.assert_close(layer(x), conv(x), rtol=1e-4, atol=1e-4)
    finally:
        torch.set_num_threads(previous)


@needs_cpp
@pytest.mark.parametrize("cin", [3, 12])  # the few-input-channel path and the panel path
def test_kernel_refuses_malformed_plans(cin):
    """The kernel checks its plan at every call: a malformed plan raises, it never reads or writes out of bounds
    (issue 21: an edited plan crashed the process)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(cin, 10, 3, stride=2, padding=1)
    mask = torch.rand(10, 3, 3) < 0.5
    with torch.no_grad():
        conv.weight.mul_(mask[:, None])
    layer = StripeConv2d.from_dense(conv, mask)
    plan = cpu_kernel.make_plan(layer.stripe_out, layer.stripe_pos, 10, (3, 3), (2, 2), (1, 1), 1, 1)
    packed = cpu_kernel.pack(layer.weight, plan)
    x = torch.randn(2, cin, 13, 11)

    def run(packed=packed, panels=plan.panels, phases=plan.phases, out_channels=10):
        return torch.ops.swp_stripe.forward(x, packed, panels, phases, conv.bias.detach(), None, out_channels, 7, 6, 2,
                                            2, 256, 0)

    with torch.no_grad():
        torch.testing.assert_close(run(), conv(x), rtol=1e-4, atol=1e-4)
    head = 4  # phase, qy, qx, rows; then the rows' output channels
    bad = []
    for col, value in ((0, -1), (0, 99), (3, 0), (3, cpu_kernel.PANEL_ROWS + 1), (head, -5), (head, 10),
                       (head, 10 ** 9), (1, 10 ** 12), (2, -(10 ** 12))):
        panels = plan.panels.clone()
        panels[0, col] = value
        bad.append({"panels": panels})
    unsorted = plan.panels.clone()
    row = int((unsorted[:, 3] >= 2).nonzero()[0])
    unsorted[row, head], unsorted[row, head + 1] = 9, 0
    bad.append({"panels": unsorted})
    phases = plan.phases.clone()
    phases[0, 0] = 2  # outside the stride
    bad += [{"phases": phases}, {"phases": torch.zeros(5, 2, dtype=torch.long)}, {"packed": packed[:, :-1]},
            {"packed": packed[1:]}, {"panels": plan.panels[:, :5]}, {"panels": plan.panels.int()},
            {"out_channels": 3}]
    for kwargs in bad:
        with pytest.raises(RuntimeError, match="swp_stripe|int64|plan"):
            run(**kwargs)
    # a shift far outside the image is in range for the kernel: it adds nothing
    far = plan.panels.clone()
    far[:, 1] = 10 ** 6
    with torch.no_grad():
        torch.testing.assert_close(run(panels=far), conv.bias[None, :, None, None].expand(2, 10, 7, 6))


def test_cpp_falls_back_to_pytorch_when_the_kernel_is_disabled():
    conv, mask = _masked_conv(CASES[1])
    layer = StripeConv2d.from_dense(conv, mask, backend="cpp")
    x = torch.randn(2, 8, 11, 10)
    cpu_kernel.set_enabled(False)
    try:
        assert not cpu_kernel.available()
        with torch.no_grad():
            torch.testing.assert_close(layer(x), conv(x), rtol=1e-5, atol=1e-5)
        assert layer.active_backend == "stripe"
        layer.backend = "auto"
        with torch.no_grad():
            layer(x)
        assert set(layer.choices.values()) <= {"stripe", "dense"}
    finally:
        cpu_kernel.set_enabled(True)


@needs_cpp
def test_cpp_kernel_only_for_float32_cpu():
    conv, mask = _masked_conv(CASES[0])
    layer = StripeConv2d.from_dense(conv.double(), mask, backend="cpp")
    x = torch.randn(1, 8, 9, 9, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), conv(x))
    assert layer.active_backend == "stripe"


def test_auto_picks_once_per_shape_and_records_the_choice():
    conv, mask = _masked_conv(CASES[0])
    layer = StripeConv2d.from_dense(conv, mask)
    assert layer.backend == "auto"
    with torch.no_grad():
        for batch in (1, 3, 1):
            x = torch.randn(batch, 8, 9, 9)
            torch.testing.assert_close(layer(x), conv(x), rtol=1e-5, atol=1e-5)
    assert len(layer.choices) == 2
    assert set(layer.choices.values()) <= {"dense", "cpp", "stripe"}
    assert f"backend=auto({layer.active_backend})" in repr(layer)
    with use_backend("dense"), torch.no_grad():
        layer(torch.randn(2, 8, 9, 9))
    assert layer.active_backend == "dense" and len(layer.choices) == 2
    with pytest.raises(ValueError, match="backend"):
        set_backend(None, "bogus")
    set_backend(nn.Sequential(layer), "stripe")
    assert layer.backend == "stripe"


def test_backend_environment_variable_is_read_once_at_import():
    code = ("import os, swp_plugin.layers.config as c; first = c.default_backend(); "
            "os.environ['SWP_STRIPE_BACKEND'] = 'stripe'; print(first, c.default_backend())")
    env = {**os.environ, "SWP_STRIPE_BACKEND": "dense"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.stdout.split() == ["dense", "dense"], out.stderr[-2000:]
    env["SWP_STRIPE_BACKEND"] = "bogus"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode != 0 and "SWP_STRIPE_BACKEND must be one of" in out.stderr


def test_stripe_conv_is_a_torch_fx_leaf_for_timm_tracing():
    """Registered with timm's register_notrace_module: timm's FX feature extraction keeps it as one call."""
    from timm.layers import create_feature_extractor, get_graph_node_names

    conv, mask = _masked_conv(CASES[0])
    model = nn.Sequential(StripeConv2d.from_dense(conv, mask), nn.ReLU())
    _, nodes = get_graph_node_names(model)
    assert nodes[1:] == ["0", "1"]  # the input, then one node per module
    extractor = create_feature_extractor(model, return_nodes=["0"])
    x = torch.randn(2, 8, 9, 9)
    with torch.no_grad():
        torch.testing.assert_close(extractor(x)["0"], model[0](x))


@pytest.mark.parametrize("backend", FORCED)
def test_inference_caches_follow_in_place_weight_updates(backend):
    conv, mask = _masked_conv(CASES[1])
    layer = StripeConv2d.from_dense(conv, mask, backend=backend)
    x = torch.randn(2, 8, 11, 10)
    with torch.no_grad():
        layer(x)
        layer.weight.mul_(2)
        conv.weight.mul_(2)
        torch.testing.assert_close(layer(x), conv(x), rtol=1e-5, atol=1e-5)
        layer.select_stripes(torch.arange(layer.num_stripes) % 2 == 0)
        torch.testing.assert_close(layer(x), layer.to_dense()(x), rtol=1e-5, atol=1e-5)


def test_backend_is_validated_on_assignment():
    layer = StripeConv2d(4, 4, 3)
    with pytest.raises(ValueError, match="backend"):
        layer.backend = "fast"


@pytest.mark.parametrize("backend", FORCED)
def test_parametrized_weight_is_never_served_from_a_stale_cache(backend):
    """A parametrized weight is a new tensor at every access (its memory may be reused): no cache hit."""
    from torch.nn.utils import parametrize

    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.s = 1.0

        def forward(self, w):
            return w * self.s

    conv, mask = _masked_conv(CASES[0])
    layer = StripeConv2d.from_dense(conv, mask, backend=backend)
    scale = Scale()
    parametrize.register_parametrization(layer, "weight", scale)
    x = torch.randn(2, 8, 9, 9)
    for mode in (torch.no_grad, torch.inference_mode):
        for s in (1.0, 3.0, -2.0):
            scale.s = s
            with mode():
                torch.testing.assert_close(layer(x), conv(x) * s, rtol=1e-4, atol=1e-4)
