"""swp_plugin.testing.loader_fuzz: random mutations of saved plain, stripe-pruned and deployed models; each loads
a faithful model or raises a clear error naming the file. In a child process (a crash fails the test) under
glibc's heap checks, all cases in that one process (heap damage done by one case shows in a later one)."""

from __future__ import annotations

import os
import subprocess
import sys

HEAP_CHECKS = {"MALLOC_CHECK_": "3", "MALLOC_PERTURB_": "165"}


def test_loader_fuzz_refuses_or_loads_faithfully():
    env = {**os.environ, **HEAP_CHECKS, "PYTHONWARNINGS": "ignore"}
    result = subprocess.run([sys.executable, "-m", "swp_plugin.testing.loader_fuzz", "--cases", "300", "--seed", "0"],
                            capture_output=True, text=True, timeout=1200, env=env)
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-4000:]}\n{result.stderr[-3000:]}"
    summary = result.stdout.strip().splitlines()[-1]
    assert summary.startswith("ok: 300 cases, 0 failed"), summary
    refused, loaded = (int(summary.split(f" {word}")[0].rsplit(" ", 1)[-1]) for word in ("refused", "loaded"))
    assert refused > 100 and loaded > 20  # both outcomes exercised
