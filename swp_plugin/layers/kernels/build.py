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
* a build counts only when its child process loaded the result; the parent then writes ``<build dir>/ok``, a
  record of the library's SHA-256 and the build inputs. A library is loaded only if it matches its record: a
  truncated, overwritten or empty ``.so`` (or a folder without a record) is deleted and rebuilt, or - where the
  folder is read-only - refused with one warning naming the folder to delete;
* a read-only cache holding a matching build is used as it is (no lock needed to read it);
* no compiler: one line says so (``c++: not found``); a failed build is remembered in ``<build dir>/failed``
  with the compiler's identity (path, size, time): later processes do not try again until the compiler changes.

Build variants (environment variables, read when the kernel is first loaded):

* ``SWP_SANITIZE=1``: ``-fsanitize=address,undefined -fno-omit-frame-pointer -g -O1`` and ``-DSWP_CHECKED``
  (range checks of the kernel's vector loads and stores, which AddressSanitizer does not see). Python must
  run with the ASan runtime preloaded: ``LD_PRELOAD=$(gcc -print-file-name=libasan.so)`` (``make sanitize``).
* ``SWP_KERNEL_ARCH``: ``native`` (default: ``-march=native``, the AVX-512 micro-kernels where the CPU has
  AVX-512F, else AVX2 + FMA), ``avx2`` (``-march=native -mno-avx512f``: the AVX2 micro-kernels on an AVX-512
  CPU, to test that path) or ``generic`` (no ``-march``: the portable loops).
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
#: the values of ``SWP_KERNEL_ARCH``
ARCHS = ("native", "avx2", "generic")
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
print("SWP_BUILD_LOADED")
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
    arch = os.environ.get("SWP_KERNEL_ARCH", "native")
    if arch not in ARCHS:
        raise ValueError(f"SWP_KERNEL_ARCH={arch!r}: expected one of {', '.join(ARCHS)}")
    cflags: List[str] = ["-fopenmp"]
    if arch != "generic" and platform.machine() in ("x86_64", "AMD64"):
        cflags += ["-march=native"] + (["-mno-avx512f"] if arch == "avx2" else [])
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
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RuntimeError(f"cannot create the kernel cache folder {path} ({err.strerror}): set "
                           "SWP_EXTENSIONS_DIR to a writable folder") from None
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


def compiler() -> Dict[str, object]:
    """The C++ compiler ``torch.utils.cpp_extension`` runs (``$CXX``, default ``c++``) and its identity (path,
    size, modification time; ``path`` None when it is not on ``PATH``)."""
    name = os.environ.get("CXX", "c++")
    found = shutil.which(name)
    if found is None:
        return {"name": name, "path": None}
    info = Path(found).resolve().stat()
    return {"name": name, "path": str(Path(found).resolve()), "size": info.st_size, "mtime": info.st_mtime_ns}


def build_inputs() -> Dict[str, object]:
    """What a build depends on: the source's hash, torch's version, the CPU, the flags (recorded in ``ok``)."""
    v = variant()
    return {"source": hashlib.sha256(SOURCE.read_bytes()).hexdigest(), "torch": torch.__version__,
            "cpu": hashlib.sha1(_cpu_tag().encode()).hexdigest()[:12], **v}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _record(path: Path) -> Dict | None:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _matches(folder: Path, library: Path) -> bool:
    """The library exists and matches the ``ok`` record of this build's inputs."""
    record = _record(folder / "ok")
    return (record is not None and record.get("inputs") == build_inputs() and library.is_file()
            and record.get("sha256") == _sha256(library))


def _compile(spec: Dict[str, object], timeout: float) -> None:
    """Run the build in a child process (its own process group, killed whole after ``timeout`` seconds)."""
    if compiler()["path"] is None:
        raise RuntimeError(f"no C++ compiler: {compiler()['name']}: not found (install g++, or set CXX)")
    child = subprocess.Popen([sys.executable, "-c", _CHILD, json.dumps(spec)], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        child.communicate()
        raise TimeoutError(f"the kernel build took longer than {timeout:g} s (SWP_KERNEL_TIMEOUT)") from None
    if child.returncode != 0 or "SWP_BUILD_LOADED" not in output:
        lines = output.strip().splitlines()
        errors = [line for line in lines if "error" in line.lower() or "not found" in line][:6] or lines[-12:]
        raise RuntimeError("kernel build failed: " + " | ".join(errors))


def _remember(folder: Path, error: Exception) -> None:
    try:
        (folder / "failed").write_text(json.dumps({"compiler": compiler(), "inputs": build_inputs(),
                                                   "error": f"{type(error).__name__}: {error}"}))
    except OSError:
        pass


def _remembered_failure(folder: Path) -> str | None:
    record = _record(folder / "failed")
    if record and record.get("compiler") == compiler() and record.get("inputs") == build_inputs():
        return str(record.get("error"))
    return None


def _build(folder: Path, library: Path, timeout: float) -> None:
    """Under the build lock: build unless a matching library is there (checked again: another process may have
    built it meanwhile)."""
    stale = folder / "lock"
    if stale.exists():  # we hold the flock, so torch's lock is left over from a killed build
        warnings.warn(f"swp_plugin: removed a stale kernel build lock ({stale}) left by an interrupted "
                      "build", RuntimeWarning, stacklevel=5)
        stale.unlink()
    if _matches(folder, library):
        return
    failure = _remembered_failure(folder)
    if failure is not None:
        raise RuntimeError(f"not retried until the compiler changes (a build failed before; delete {folder} to "
                           f"retry): {failure}")
    if library.exists() or (folder / "ok").exists():
        warnings.warn(f"swp_plugin: the cached kernel library {library} does not match its build record "
                      "(truncated or overwritten?); rebuilding it", RuntimeWarning, stacklevel=5)
    try:
        _clear(folder, keep="build.flock")
    except OSError as err:
        raise RuntimeError(f"the kernel cache {folder} holds no valid build and cannot be cleared ({err.strerror}): "
                           "delete that folder or point SWP_EXTENSIONS_DIR to a writable one") from None
    v = variant()
    spec = {"name": folder.name, "source": str(SOURCE), "cflags": v["cflags"], "ldflags": v["ldflags"],
            "dir": str(folder)}
    try:
        _compile(spec, timeout)
    except (RuntimeError, TimeoutError) as err:
        if not isinstance(err, TimeoutError):
            _remember(folder, err)
        raise
    (folder / "ok").write_text(json.dumps({"sha256": _sha256(library), "inputs": build_inputs()}))


def load() -> None:
    """Build (if needed) and load the kernel library into this process; raises on any failure. A library is
    loaded only after it matched its record (``ok``)."""
    folder, timeout = build_dir(), _timeout()
    library = folder / f"{folder.name}.so"
    if (folder / "lock").exists() or not _matches(folder, library):  # a good build needs no lock to be read
        try:
            handle = open(folder / "build.flock", "a")
        except OSError as err:  # a read-only cache without a matching build
            raise RuntimeError(f"the kernel cache {folder} holds no valid build (missing, truncated or overwritten "
                               f"library) and is not writable ({err.strerror}): delete that folder or point "
                               "SWP_EXTENSIONS_DIR to a writable one") from None
        with handle:
            if not _acquire(handle, timeout):
                raise TimeoutError(f"another process has held the kernel build lock for {timeout:g} s "
                                   f"(SWP_KERNEL_TIMEOUT); if no build is running, delete {folder}")
            try:
                _build(folder, library, timeout)
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
        if not _matches(folder, library):
            raise RuntimeError(f"the kernel library in {folder} does not match its build record after the build; "
                               "delete that folder")
    torch.ops.load_library(str(library))
    if not hasattr(torch.ops.swp_stripe, "forward"):
        raise RuntimeError(f"{library} loaded but registered no swp_stripe::forward")
