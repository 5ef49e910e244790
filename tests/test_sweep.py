"""swp_plugin.testing.sweep: many timm models pruned and fine-tuned a step, one after another in one process,
under glibc's heap checks (the memory-safety sweep; slow)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from swp_plugin.testing.sweep import MODELS, SWEEP


def test_the_sweep_lists_forty_known_models():
    assert len(SWEEP) == 40 and set(SWEEP) <= set(MODELS)


def test_one_model_in_process():
    from swp_plugin.testing.sweep import run_swp

    rec = run_swp("resnet10t", size=48)
    assert rec["status"] == "exact", rec.get("error")
    assert rec["grads_finite"] and rec["finetuned_finite"] and rec["macs_after"] < rec["macs_before"]
    assert set(rec["stage_s"]) >= {"create", "pruner", "step", "finetune"}


@pytest.mark.slow
def test_forty_models_twice_in_one_process():
    env = {**os.environ, "MALLOC_CHECK_": "3", "MALLOC_PERTURB_": "165", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run([sys.executable, "-m", "swp_plugin.testing.sweep", "--repeat", "2"], capture_output=True,
                            text=True, timeout=5400, env=env)
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-4000:]}\n{result.stderr[-3000:]}"
