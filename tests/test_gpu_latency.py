"""benchmarks/gpu_latency.py: its doc section, the hand-over from latency.py, and (slow) the CPU dry run end to end."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from swp_plugin.layers.kernels import triton_stripe

_DIR = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(_DIR))  # gpu_latency imports doc_section as the scripts do
_spec = importlib.util.spec_from_file_location("gpu_latency", _DIR / "gpu_latency.py")
gpu_latency = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_latency)


def test_wants_cuda_reads_only_the_device_option():
    assert gpu_latency.wants_cuda(["--device", "cuda", "--nets", "vgg16"])
    assert gpu_latency.wants_cuda(["--quick", "--device=cuda:1"])
    assert not gpu_latency.wants_cuda(["--quick"]) and not gpu_latency.wants_cuda(["--device", "cpu"])


def test_doc_section_says_when_nothing_was_measured_and_renders_rows(tmp_path):
    assert "Not measured on a GPU yet" in gpu_latency.doc_section({"machine": {"gpu": None}, "rows": []})
    row = {"net": "vgg16", "dtype": "bfloat16", "batch": 64, "dense_ms": 2.0, "compiled_ms": 1.5,
           "deployed_0.2_ms": 1.0, "speedup_0.2_vs_dense": 2.0, "kernels_0.2": {"kernel_layers": 12, "convs": 13}}
    text = gpu_latency.doc_section({"machine": {"gpu": "GPU-X", "torch": "t", "triton": "3", "cudnn": 9},
                                    "rows": [row]})
    assert "GPU-X" in text and "| vgg16 | bfloat16 | 64 | 2.000 | 1.500 | 1.000 (x2.00, 12/13) |" in text


def test_without_a_gpu_the_run_is_refused_with_the_way_out():
    if triton_stripe.available("cuda"):
        pytest.skip("a GPU is here")
    with pytest.raises(SystemExit):
        gpu_latency.main(["--nets", "vgg16"])


@pytest.mark.slow
def test_dry_run_end_to_end_on_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    try:
        results = gpu_latency.main(["--dry-run", "--nets", "vgg16", "--keep", "0.2", "--no-compile",
                                    "--json", str(out)])
    finally:
        triton_stripe.set_interpret(False)
    assert json.loads(out.read_text()) == json.loads(json.dumps(results))
    rows = results["rows"]
    assert [r["batch"] for r in rows] == [1, 2]
    for r in rows:
        assert r["deployed_err_0.2"] < 1e-4 and r["dense_ms"] > 0 and r["deployed_0.2_ms"] > 0
        assert r["kernels_0.2"]["kernel_layers"] == r["swapped_0.2"]
