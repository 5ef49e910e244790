"""swp_plugin.layers.kernels.build: loading the compiled kernel never hangs a process.

A build killed midway (Ctrl-C, OOM kill, CI time-out) leaves torch's ``lock`` file behind; another process
holding the build lock must not block anyone for longer than ``SWP_KERNEL_TIMEOUT``. Each case runs in fresh
processes (the kernel loads once per process) against a copy of this machine's build in a temporary folder.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from swp_plugin.layers.kernels import build, cpu

needs_cpp = pytest.mark.skipif(not cpu.available(), reason=f"no compiled kernel: {cpu.build_error()}")

PROBE = "from swp_plugin.layers.kernels import cpu; print('available', cpu.available())"


def _copy_build(tmp_path: Path) -> Path:
    source = build.build_dir()
    target = tmp_path / "extensions" / source.name
    shutil.copytree(source, target)
    return target


def _probe(tmp_path: Path, timeout: float = 120, **env) -> subprocess.CompletedProcess:
    environment = {**os.environ, "SWP_EXTENSIONS_DIR": str(tmp_path / "extensions"), **env}
    return subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=timeout,
                          env=environment)


@needs_cpp
def test_a_stale_lock_from_a_killed_build_is_removed(tmp_path):
    folder = _copy_build(tmp_path)
    (folder / "lock").touch()  # what a killed `cpp_extension.load` leaves
    result = _probe(tmp_path)
    assert "available True" in result.stdout, result.stderr
    assert "stale kernel build lock" in result.stderr
    assert not (folder / "lock").exists()


@needs_cpp
def test_a_held_build_lock_times_out_to_the_pytorch_paths(tmp_path):
    folder = _copy_build(tmp_path)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a'); fcntl.flock(f, fcntl.LOCK_EX); "
         "print('held', flush=True); time.sleep(60)", str(folder / "build.flock")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        start = time.monotonic()
        result = _probe(tmp_path, timeout=60, SWP_KERNEL_TIMEOUT="1")
        assert time.monotonic() - start < 30
        assert "available False" in result.stdout, result.stderr
        assert "build lock" in result.stderr and str(folder) in result.stderr  # says what to delete
    finally:
        holder.kill()
        holder.wait()
    assert "available True" in _probe(tmp_path).stdout  # the lock died with its owner


@pytest.mark.slow
def test_an_unfinished_build_is_rebuilt(tmp_path):
    """A folder without the ``ok`` marker (a build killed before it loaded) is cleared and built again."""
    folder = _copy_build(tmp_path)
    (folder / "ok").unlink()
    library = next(folder.glob("*.so"))
    library.write_bytes(b"truncated")
    result = _probe(tmp_path, timeout=600)
    assert "available True" in result.stdout, result.stderr
    assert (folder / "ok").exists() and library.stat().st_size > 1000
