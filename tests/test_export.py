"""A stripe-pruned model exports to ONNX (runs in onnxruntime, matches PyTorch) and traces with TorchScript."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from swp_plugin import StripeConv2d, StripePruner
from swp_plugin.models import resnet20

ort = pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def pruned():
    torch.manual_seed(0)
    model = resnet20(width=0.5)
    x = torch.randn(2, 3, 32, 32)
    StripePruner(model, x[:1], macs_reduction=0.5, ignored_layers=[model.fc]).step()
    assert any(isinstance(m, StripeConv2d) for m in model.modules())
    return model.eval(), x


def test_onnx_export_matches_pytorch(pruned, tmp_path):
    model, x = pruned
    path = tmp_path / "model.onnx"
    torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=18,
                      input_names=["x"], dynamic_axes={"x": {0: "batch"}})
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 3):
        inputs = torch.randn(batch, 3, 32, 32)
        y = session.run(None, {"x": inputs.numpy()})[0]
        with torch.no_grad():
            ref = model(inputs).numpy()
        assert np.abs(y - ref).max() / np.abs(ref).max() <= 1e-4


def test_jit_trace_matches(pruned):
    model, x = pruned
    traced = torch.jit.trace(model, x)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), model(x))


@pytest.mark.parametrize("backend", ["auto", "stripe", "dense", "cpp"])
def test_onnx_export_of_each_backend(backend, tmp_path):
    from swp_plugin.testing import random_stripe_model

    model = random_stripe_model(resnet20(width=0.25), keep=0.3).eval()
    for m in model.modules():
        if isinstance(m, StripeConv2d):
            m.backend = backend
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        model(x)  # 'auto' layers pick their backend; the export follows 'dense' picks, else 'stripe'
    path = tmp_path / "model.onnx"
    torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=18, input_names=["x"])
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    y = session.run(None, {"x": x.numpy()})[0]
    with torch.no_grad():
        ref = model(x).numpy()
    assert np.abs(y - ref).max() / np.abs(ref).max() <= 1e-4


def test_torch_compile_dynamo_traces_stripe_model(pruned):
    model, x = pruned
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_torch_compile_inductor_matches(pruned):
    model, x = pruned
    torch._dynamo.reset()
    compiled = torch.compile(model)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-4)
