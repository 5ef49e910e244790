"""swp_plugin.testing.fuzz: random StripeConv2d layers against the masked dense convolution, in one process
under glibc's heap checks (``MALLOC_CHECK_=3``, ``MALLOC_PERTURB_``), so that heap damage aborts the run.

Seed 1 of the default run draws layers that corrupted the heap before the fix of the channels-last convolution
backward (1x1 kernel, stride (2, 1)): the test fails on that code.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

HEAP_CHECKS = {"MALLOC_CHECK_": "3", "MALLOC_PERTURB_": "165"}


def _run(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, **HEAP_CHECKS, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "swp_plugin.testing.fuzz", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_fuzz_every_backend_forward_and_gradients():
    result = _run("--cases", "300", "--seed", "1")
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-4000:]}\n{result.stderr[-3000:]}"
    summary = result.stdout.strip().splitlines()[-1]
    assert summary.startswith("ok: 300 cases, 0 failed")
    if shutil.which("g++"):  # the compiled kernel must have been among the backends
        assert "cpp kernel loaded" in summary, summary


TRIGGER = """
import torch, torch.nn as nn
from swp_plugin import StripeConv2d
torch.set_num_threads(2)
conv = nn.Conv2d(12, 18, 1, stride=(2, 1), padding=(0, 2), dilation=(2, 2), padding_mode="circular")
mask = torch.rand(18, 1, 1) < 0.7
x = torch.randn(3, 12, 34, 5)
for backend in ("cpp", "dense", "stripe", "auto"):
    layer = StripeConv2d.from_dense(conv, mask, backend=backend)
    for _ in range(100):
        layer(x.clone().requires_grad_()).sum().backward()
    for _ in range(20):  # a channels-last input, the other way into the faulty path
        layer(x.contiguous(memory_format=torch.channels_last).requires_grad_()).sum().backward()
print("ok")
"""


def test_the_reported_trigger_runs_clean_under_heap_checks():
    env = {**os.environ, **HEAP_CHECKS}
    result = subprocess.run([sys.executable, "-c", TRIGGER], capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("seed", [2, 3, 4])
def test_fuzz_thousands_of_cases(seed):
    result = _run("--cases", "1500", "--seed", str(seed), timeout=3600)
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-4000:]}\n{result.stderr[-3000:]}"
