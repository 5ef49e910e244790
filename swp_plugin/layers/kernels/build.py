"""Building and loading the compiled stripe kernel (``stripe_cpu.cpp``) safely.

The extension is compiled at first use with ``torch.utils.cpp_extension`` into
``$SWP_EXTENSIONS_DIR/swp_stripe_cpu_<key>`` (default ``~/.cache/swp_plugin/extensions``; the key hashes the
source, torch's version, the CPU flags and the build variant), in a **child process with a time limit**, then
loaded with ``torch.ops.load_library``. So that no process ever hangs on it:

* builders hold an ``fcntl.flock`` on ``<build dir>/build.flock`` (released by the kernel when a process dies);
  a waiter gives up after ``SWP_KERNEL_TIMEOUT`` seconds (default 300) and uses the PyTorch paths, with one
  warning that says which folder to delete if no build is running;
* torch's own lock file (``<build dir>/lock``, left behind when a build is killed) is stale whenever we hold
  the flock: it is removed, with a warning;
* a build counts only when its child process loaded the result and wrote ``<build dir>/ok``; anything else in
  the folder is deleted and rebuilt.

Build variants (environment variables, read when the kernel is first loaded):

* ``SWP_SANITIZE=1``: ``-fsanitize=address,undefined -fno-omit-frame-pointer -g -O1`` and ``-DSWP_CHECKED``
  (range checks of the kernel's vector loads and stores, which AddressSanitizer does not see). Python must
  run with the ASan runtime preloaded: ``LD_PRELOAD=$(gcc -print-file-name=libasan.so)`` (``make sanitize``).
* ``SWP_KERNEL_ARCH=generic``: no ``-march=native`` (no AVX-512 micro-kernel: the portable BLAS path).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Dict, List

import torch

SOURCE = Path(__file__).with_name("stripe_cpu.cpp")
DEFAULT_TIMEOUT = 300.0

_CHILD = """
import json, logging, sys
logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
from torch.utils import cpp_extension
import torch
spec = json.loads(sys.argv[1])
cpp_extension.load(name=spec["name"], sources=[spec["source"]], extra_cflags=spec["cflags"],
                   extra_ldflags=spec["ldflags"], build_directory=spec["dir"], is_python_module=False, verbose=False)
assert hasattr(torch.ops.swp_stripe, "forward")
open(spec["ok"], "w").write("ok")
"""


def _cpu_tag() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        flags = ""
    return platform.machine() + flags


def variant() -> Dict[str, List[str]]:
    """Compiler flags of the build variant chosen by the environment (see the module docstring)."""
    sanitize = os.environ.get("SWP_SANITIZE", "") not in ("", "0")
    native = os.environ.get("SWP_KERNEL_ARCH", "native") != "generic" and platform.machine() in ("x86_64", "AMD64")
    cflags: List[str] = ["-fopenmp"] + (["-march=native"] if native else [])
    ldflags: List[str] = ["-fopenmp"]
    if sanitize:
        san = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer"]
        cflags += ["-O1", "-g", "-DSWP_CHECKED"] + san
        ldflags += san
    else:
        cflags += ["-O3"]
    return {"cflags": cflags, "ldflags": ldflags}


def build_dir() -> Path:
    """The folder of this variant's build (created)."""
    v = variant()
    key = hashlib.sha1(SOURCE.read_bytes() + torch.__version__.encode() + _cpu_tag().encode()
                       + " ".join(v["cflags"]).encode()).hexdigest()[:12]
    root = Path(os.environ.get("SWP_EXTENSIONS_DIR", Path.home() / ".cache" / "swp_plugin" / "extensions"))
    path = root / f"swp_stripe_cpu_{key}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _timeout() -> float:
    try:
        return float(os.environ.get("SWP_KERNEL_TIMEOUT", DEFAULT_TIMEOUT))
    except ValueError:
        return DEFAULT_TIMEOUT


def _acquire(handle, timeout: float) -> bool:
    """Exclusive flock on ``handle`` within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError as err:
            if err.errno not in (errno.EAGAIN, errno.EACCES):
                raise
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)


def _clear(folder: Path, keep: str) -> None:
    for entry in folder.iterdir():
        if entry.name == keep:
            continue
        shutil.rmtree(entry) if entry.is_dir() else entry.unlink()


def _compile(spec: Dict[str, object], timeout: float) -> None:
    """Run the build in a child process (its own process group, killed whole after ``timeout`` seconds)."""
    child = subprocess.Popen([sys.executable, "-c", _CHILD, json.dumps(spec)], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        child.communicate()
        raise TimeoutError(f"the kernel build took longer than {timeout:g} s (SWP_KERNEL_TIMEOUT)") from None
    if child.returncode != 0 or not Path(str(spec["ok"])).exists():
        lines = output.strip().splitlines()
        errors = [line for line in lines if "error" in line.lower()][:6] or lines[-12:]
        raise RuntimeError("kernel build failed: " + " | ".join(errors))


def load() -> None:
    """Build (if needed) and load the kernel library into this process; raises on any failure."""
    folder, timeout = build_dir(), _timeout()
    name = folder.name
    library, ok = folder / f"{name}.so", folder / "ok"
    with open(folder / "build.flock", "a") as handle:
        if not _acquire(handle, timeout):
            raise TimeoutError(f"another process has held the kernel build lock for {timeout:g} s "
                               f"(SWP_KERNEL_TIMEOUT); if no build is running, delete {folder}")
        try:
            stale = folder / "lock"
            if stale.exists():  # we hold the flock, so torch's lock is left over from a killed build
                warnings.warn(f"swp_plugin: removed a stale kernel build lock ({stale}) left by an interrupted "
                              "build", RuntimeWarning, stacklevel=4)
                stale.unlink()
            if not (ok.exists() and library.exists()):
                _clear(folder, keep="build.flock")
                v = variant()
                spec = {"name": name, "source": str(SOURCE), "cflags": v["cflags"], "ldflags": v["ldflags"],
                        "dir": str(folder), "ok": str(ok)}
                _compile(spec, timeout)
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
    torch.ops.load_library(str(library))
    if not hasattr(torch.ops.swp_stripe, "forward"):
        raise RuntimeError(f"{library} loaded but registered no swp_stripe::forward")
