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
