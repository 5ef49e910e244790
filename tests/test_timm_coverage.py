"""CI-sized slice of the coverage sweep (swp_plugin.testing.sweep, run by benchmarks/timm_coverage.py): the same
per-model SWP pipeline, in-process, on fast timm CNNs and torchvision models (dict outputs of segmentation models, a
conv classifier without BatchNorm); and the report of the benchmark.

Random sparse skeleton (dead stripes and dead filters), one regularized step, BatchNorm calibration, ``step()``;
the outputs must not change (``max|diff|/max|y| <= 1e-4``) and the pruned model must fine-tune a step.
The full sweep (79 models, each in a subprocess with a time limit): ``python benchmarks/timm_coverage.py``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from swp_plugin.testing import sweep, torchvision_models

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "timm_coverage.py"
_spec = importlib.util.spec_from_file_location("timm_coverage", _PATH)
coverage = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(coverage)

# Each well under 5 s on 2 idle cores at 64x64 (densenet121 about 6 s): residual, depthwise/SE, dense concat,
# DLA aggregation, RepVGG branches, ghost modules, RegNet groups, OSA concat, TF 'SAME' padding, LayerNorm.
MODELS = [
    "resnet18",
    "mobilenetv3_small_050",
    "densenet121",
    "dla34",
    "repvgg_a0",
    "ghostnet_050",
    "regnetx_002",
    "ese_vovnet19b_dw",
    "tf_efficientnet_b0",
    "convnext_atto",
]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One torch thread: on a busy 2-core machine, OpenMP threads of concurrent processes oversubscribe the cores
    and a run can get tens of times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name", MODELS)
def test_coverage_pipeline_exact(name):
    rec = sweep.run_swp(name, size=64)
    assert rec["status"] != "error", f"{rec['stage']}: {rec['error_type']}: {rec['error']}\n{rec['traceback']}"
    assert rec["skeletons"] > 0
    assert rec["rel_err"] <= sweep.TOLERANCE
    assert rec["status"] == "exact"
    assert rec["backward_ok"] and rec["grads_finite"] and rec["finetuned_finite"]
    assert rec["macs_after"] < rec["macs_before"]


# torchvision (--source torchvision): segmentation with dict outputs, squeezenet (conv classifier, no BatchNorm),
# googlenet without its train-mode auxiliary classifiers.
TORCHVISION = ["lraspp_mobilenet_v3_large", "squeezenet1_1", "googlenet@noaux"]


@pytest.mark.parametrize("name", TORCHVISION)
def test_coverage_pipeline_exact_torchvision(name):
    rec = sweep.run_swp(name, size=64, source="torchvision")
    assert rec["status"] != "error", f"{rec['stage']}: {rec['error_type']}: {rec['error']}\n{rec['traceback']}"
    assert rec["rel_err"] <= sweep.TOLERANCE and rec["status"] == "exact"
    assert rec["backward_ok"] and rec["grads_finite"] and rec["finetuned_finite"]
    assert rec["macs_after"] < rec["macs_before"] and rec["channels_removed"]
    assert 0 < rec["macs_share_kxk"] <= rec["macs_share_g1"] <= 1


def test_output_layers_and_loss_of_a_segmentation_model():
    model, x = sweep.make_model("lraspp_mobilenet_v3_large", 64, "torchvision")
    assert set(sweep.output_layers(model, "torchvision")) == {model.classifier.low_classifier,
                                                               model.classifier.high_classifier}
    with torch.no_grad():
        y = model(x)
    assert isinstance(y, dict) and [tuple(t.shape) for t in y.values()] == [(4, 10, 64, 64)]
    loss = sweep.model_loss(y, 4)
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert torchvision_models.is_model("googlenet@noaux") and not torchvision_models.is_model("resnet18d")


def test_failed_record_keeps_its_stage():
    rec = {"status": "running", "stage": None}
    stage = sweep.Stages(rec, None)
    stage("create")
    stage("finetune")
    rec["status"] = "error"
    assert stage.close()["stage"] == "finetune" and set(rec["stage_s"]) == {"create", "finetune"}
    done = {"status": "running", "stage": None}
    stage = sweep.Stages(done, None)
    stage("create")
    stage(None)
    assert stage.close()["stage"] is None


def test_command_names_no_lock_file():
    command = coverage._command(["benchmarks/timm_coverage.py", "--source", "torchvision", "--lock", "/x/cpu.lock"])
    assert command == "python benchmarks/timm_coverage.py --source torchvision"


def test_report_renders():
    ok = {"status": "exact", "rel_err": 1e-7, "macs_before": 2e6, "macs_after": 1e6, "params_before": 10,
          "params_after": 5, "channels_removed": True, "t_step": 0.1}
    err = {"status": "error", "stage": "step", "error_type": "RuntimeError", "error": "boom | `x`"}
    records = [
        {"model": "a", "family": "f", "size": 96, "swp": ok, "tp": {"status": "ok", "macs_after": 1e6}},
        {"model": "b", "family": "f", "size": 96, "swp": err, "tp": {"status": "timeout", "stage": "step",
                                                                     "error_type": "Timeout", "error": "late"}},
    ]
    meta = {"command": "python benchmarks/timm_coverage.py", "date": "today", "machine": "m", "versions": {},
            "timeout": 300, "tp_timeout": 120}
    md = coverage.render_md(records, meta)
    assert "SWP: 1/2 exact (1 with channel cleanup); torch-pruning BasePruner: 1/2" in md
    assert "`b` (step): boom \\| 'x'" in md
    assert md.count("\n| ") == 4  # header, separator, two rows
