"""swp_plugin.deployment.onnx: the exported deployed model runs in onnxruntime with the same outputs, each stripe
layer in the form onnxruntime runs faster, never slower than the all-dense export."""

from __future__ import annotations

import pytest
import torch

import swp_plugin.deployment.onnx as onnx_export
from swp_plugin import deploy
from swp_plugin.layers.deployed import DeployedStripeConv2d
from swp_plugin.layers.kernels import cpu as cpu_kernel
from swp_plugin.models import resnet20
from swp_plugin.testing import calibrate_bn, random_stripe_model

pytest.importorskip("onnxruntime")
needs_cpp = pytest.mark.skipif(not cpu_kernel.available(), reason=f"no compiled kernel: {cpu_kernel.build_error()}")


@pytest.fixture(scope="module")
def deployed():
    torch.manual_seed(0)
    model = random_stripe_model(resnet20(width=0.25).eval(), 0.2)
    calibrate_bn(model, torch.randn(4, 3, 32, 32))
    x = torch.randn(2, 3, 32, 32)
    return deploy(model, x), x


@needs_cpp
def test_export_matches_and_is_not_slower_than_dense(deployed, tmp_path):
    model, x = deployed
    report = onnx_export.export_onnx(model, x, tmp_path / "m.onnx", threads=2, rounds=5)
    assert report["max_rel_err"] < 1e-5
    assert report["written"] in ("chosen", "dense") and (tmp_path / "m.onnx").stat().st_size > 0
    assert len(report["layers"]) == sum(isinstance(m, DeployedStripeConv2d) for m in model.modules())
    if report["written"] == "chosen":
        assert report["chosen_ms"] < report["dense_ms"]


@needs_cpp
@pytest.mark.parametrize("winner", ["stripe", "dense"])
def test_each_form_exports_exactly(deployed, tmp_path, monkeypatch, winner):
    """Whatever the timings say, both forms (and their mix with fused epilogues) are exact in onnxruntime."""
    model, x = deployed

    def rigged(runs, rounds, warmup=1, **kwargs):
        if set(runs) == {"dense", "stripe"}:
            return {k: 0.0 if k == winner else 1.0 for k in runs}
        return {k: 0.0 if k == "chosen" else 1.0 for k in runs}  # the whole model: keep the per-layer choice

    monkeypatch.setattr(onnx_export, "side_by_side", rigged)
    report = onnx_export.export_onnx(model, x, tmp_path / "m.onnx", threads=1, rounds=1)
    assert report["max_rel_err"] < 1e-5
    assert {layer["form"] for layer in report["layers"]} == {winner}
