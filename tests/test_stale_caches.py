"""No output of a stripe-pruned model is ever computed from a stale copy of its weights.

``StripeConv2d`` keeps, between inference calls, a dense kernel (backend 'dense') and structure-only helpers
(kernel plans, the stripe-to-channel selection, the per-shape backend choice). Every way a user writes to the
weights must show in the next output: in-place writes through ``.data`` (old EMA / clipping / quantization code),
``.to(dtype)``, ``.to(device)``, ``load_state_dict`` and an optimizer step. The reference is the same model
rebuilt fresh from its state after the write.
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch

from swp_plugin import StripeConv2d, StripePruner
from swp_plugin.layers.stripe_conv import BACKENDS
from swp_plugin.testing import calibrate_bn, randomize_skeletons, rel_err


@pytest.fixture(scope="module")
def pruned():
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=10)
    x = torch.randn(2, 3, 48, 48)
    pruner = StripePruner(model, x[:1], ignored_layers=[model.get_classifier()])
    randomize_skeletons(pruner, dead_stripes=0.5)
    pruner.step()
    calibrate_bn(model, x)
    return model.eval(), x


def _backend(model, backend):
    model = copy.deepcopy(model)
    for m in model.modules():
        if isinstance(m, StripeConv2d):
            m.backend = backend
    return model


def _fresh(model):
    """A copy with no cache at all: every StripeConv2d rebuilt from its state."""
    fresh = copy.deepcopy(model)
    for name, m in list(fresh.named_modules()):
        if isinstance(m, StripeConv2d):
            new = StripeConv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation,
                               m.bias is not None, m.padding_mode, m.num_stripes, m.same_dynamic, m.backend,
                               device=m.weight.device, dtype=m.weight.dtype)
            new.load_state_dict(m.state_dict())
            parent, _, child = name.rpartition(".")
            setattr(fresh.get_submodule(parent) if parent else fresh, child, new)
    return fresh


def _check(model, x, modes=(torch.no_grad, torch.inference_mode)):
    for mode in modes:
        with mode():
            got, want = model(x), _fresh(model)(x)
        assert rel_err(want.double(), got.double()) < 1e-5, mode.__name__


@pytest.mark.parametrize("backend", BACKENDS)
def test_writes_through_data_show_in_the_next_output(pruned, backend):
    model, x = pruned
    model = _backend(model, backend)
    with torch.inference_mode():
        before = model(x)  # fills every cache
    for m in model.modules():
        if isinstance(m, StripeConv2d):
            m.weight.data.mul_(2.0)  # no version-counter bump
            m.weight.data[0] += 1.0
    _check(model, x)
    with torch.inference_mode():
        assert rel_err(before, model(x)) > 1e-2


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_to_dtype_after_inference(pruned, backend, dtype):
    model, x = pruned
    model = _backend(model, backend)
    with torch.inference_mode():
        model(x)
    model = model.to(dtype)
    xd = x.to(dtype)
    with torch.no_grad():
        y = model(xd)
    assert y.dtype == dtype
    _check(model, xd, modes=(torch.no_grad,))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device (CPU-only machine: unmeasured)")
@pytest.mark.parametrize("backend", BACKENDS)
def test_to_device_after_inference(pruned, backend):
    model, x = pruned
    model = _backend(model, backend)
    with torch.inference_mode():
        model(x)
    model = model.cuda()
    _check(model, x.cuda())


@pytest.mark.parametrize("backend", BACKENDS)
def test_load_state_dict_after_inference(pruned, backend):
    model, x = pruned
    model = _backend(model, backend)
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1.5)
    with torch.inference_mode():
        model(x)
    model.load_state_dict(other.state_dict())
    _check(model, x)
    with torch.no_grad():
        assert rel_err(other(x), model(x)) < 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_optimizer_step_between_two_inference_calls(pruned, backend):
    model, x = pruned
    model = _backend(model, backend)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    with torch.inference_mode():
        before = model(x)
    model.train()
    model(x).square().mean().backward()
    optimizer.step()
    model.eval()
    _check(model, x)
    with torch.inference_mode():
        assert rel_err(before, model(x)) > 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_with_caches_deep_copies_and_trains(pruned, backend):
    """Caches built in inference mode or under no_grad are plain leaf tensors: the model still deep-copies and its
    next training step works."""
    model, x = pruned
    model = _backend(model, backend)
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            model(x)
        copy.deepcopy(model)
        model.train()
        model(x).sum().backward()
        model.eval()
