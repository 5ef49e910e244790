"""benchmarks/latency.py and its parts: the channel-pruned rival matches the stripe model's MACs, per-layer rates,
the report's ratios and targets, and the smoke path of the whole benchmark (tiny sizes; no timed assertions)."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import torch

from swp_plugin.deployment import deploy
from swp_plugin.layers.kernels import cpu as cpu_kernel
from swp_plugin.models import resnet56
from swp_plugin.testing import calibrate_bn, random_stripe_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import latency  # noqa: E402
import latency_report  # noqa: E402
import latency_rivals  # noqa: E402

needs_cpp = pytest.mark.skipif(not cpu_kernel.available(), reason=f"no compiled kernel: {cpu_kernel.build_error()}")


@pytest.fixture(scope="module")
def nets():
    torch.manual_seed(0)
    dense = resnet56(width=0.5).eval()
    x = torch.randn(1, 3, 16, 16)
    calibrate_bn(dense, torch.randn(4, 3, 16, 16))
    return dense, random_stripe_model(copy.deepcopy(dense), 0.3).eval(), x  # it converts in place


def test_channel_pruned_rival_matches_the_stripe_models_macs(nets):
    dense, stripe, x = nets
    target = latency_rivals.macs(stripe, x)
    channel, ratio, got = latency_rivals.channel_pruned(dense, x, target, rtol=0.02)
    assert 0 < ratio < 0.95 and abs(got - target) <= 0.05 * target
    assert got == latency_rivals.macs(channel, x) < latency_rivals.macs(dense, x)
    assert channel(x).shape == dense(x).shape  # the classifier keeps its outputs


@needs_cpp
def test_layer_rates_cover_the_named_layers(nets):
    _, stripe, x = nets
    choices = {n: "kernel" for n, m in stripe.named_modules() if hasattr(m, "stripe_out")}
    deployed = deploy(stripe, x, choices=choices, verify=False)
    names = list(choices)[:3]
    rows = latency_rivals.layer_rates(deployed, x, names, threads=1, budget_s=0.05)
    assert [r["layer"] for r in rows] == names
    for r in rows:
        assert r["impl"] == "kernel" and 0 < r["kept_mmacs"] < r["dense_mmacs"]
        assert r["deployed_ms"] > 0 and r["ort_dense_ms"] > 0


def test_ratios_and_targets_of_a_row():
    row = {"net": "resnet56", "size": 32, "keep": 0.2, "batch": 1, "threads": 2, "ort_dense_ms": 1.0,
           "ort_channel_ms": 0.5, "deployed_ms": 0.4, "deployed_eager_ms": 0.8, "stripe_gmacs": 0.03,
           "dense_gmacs": 0.12}
    q = latency_report.ratios(row)
    assert q["vs_dense"] == pytest.approx(2.5) and q["vs_channel"] == pytest.approx(1.25)
    assert q["of_ideal"] == pytest.approx(0.25 / 0.4) and q["twin_gain"] == pytest.approx(2.0)
    lines = latency_report.target_rows([row], text=True)
    assert any("ResNet56 batch 1" in line and line.endswith("bar met") for line in lines)  # x2.5: bar 1.5, goal 3
    assert any("share of the ideal" in line and line.endswith("bar met") for line in lines)  # 62%
    assert any(line.endswith("not run") for line in lines)


@needs_cpp
@pytest.mark.slow
def test_benchmark_smoke_run_writes_json_and_doc_sections(tmp_path):
    md, readme, out = tmp_path / "performance.md", tmp_path / "README.md", tmp_path / "latency.json"
    md.write_text("# Performance\n\nhand-written\n")
    latency.main(["--nets", "resnet56", "--keep", "0.2", "--batches", "1", "--size", "16", "--budget", "0.05",
                  "--json", str(out), "--md", str(md), "--readme", str(readme)])
    rows = json.loads(out.read_text())["rows"]
    assert [(r["net"], r["keep"], r["batch"]) for r in rows] == [("resnet56", 0.2, 1)]
    assert {"ort_dense_ms", "ort_channel_ms", "deployed_ms", "deployed_eager_ms", "channel_gmacs"} <= set(rows[0])
    text = md.read_text()
    assert text.startswith("# Performance\n\nhand-written\n") and "<!-- latency:begin -->" in text
    assert "### Targets (issue 22; 2 threads)" in text and "<!-- latency:begin -->" in readme.read_text()
