"""swp_plugin.layers.kernels.build: loading the compiled kernel never hangs, never crashes a process.

A build killed midway (Ctrl-C, OOM kill, CI time-out) leaves torch's ``lock`` file behind; another process
holding the build lock must not block anyone for longer than ``SWP_KERNEL_TIMEOUT``. A damaged library (truncated,
overwritten, empty) is found by its hash before it is loaded (it used to kill every process with SIGBUS/SIGTRAP);
a read-only cache with a good build is used; a missing compiler is said in one line and remembered. Each case runs
in fresh processes (the kernel loads once per process) against a copy of this machine's build in a temporary
folder (its own ``SWP_EXTENSIONS_DIR``).
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
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
    environment = {k: v for k, v in environment.items() if v is not None}
    return subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=timeout,
                          env=environment)


def _no_compiler(tmp_path: Path) -> dict:
    """Environment of a process with no C++ compiler on ``PATH`` (an empty folder)."""
    empty = tmp_path / "empty-bin"
    empty.mkdir(exist_ok=True)
    return {"PATH": str(empty), "CXX": None}


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
    """A process that needs to build waits at most SWP_KERNEL_TIMEOUT for the lock; a good build is read without
    it."""
    folder = _copy_build(tmp_path)
    record = (folder / "ok").read_bytes()
    (folder / "ok").unlink()  # this build must be redone: the probe needs the lock
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a'); fcntl.flock(f, fcntl.LOCK_EX); "
         "print('held', flush=True); time.sleep(60)", str(folder / "build.flock")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        result = _probe(tmp_path, timeout=60, SWP_KERNEL_TIMEOUT="1")  # a hang would be a TimeoutExpired
        assert "available False" in result.stdout, result.stderr
        assert "build lock" in result.stderr and str(folder) in result.stderr  # says what to delete
        (folder / "ok").write_bytes(record)
        assert "available True" in _probe(tmp_path, timeout=60, SWP_KERNEL_TIMEOUT="1").stdout  # no lock needed
    finally:
        holder.kill()
        holder.wait()
    (folder / "lock").touch()
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


def _damage(library: Path, how: str) -> None:
    data = library.read_bytes()
    if how == "truncated-1000":
        library.write_bytes(data[:1000])
    elif how == "truncated-half":
        library.write_bytes(data[: len(data) // 2])
    elif how == "overwritten":  # same size, code bytes changed (SIGTRAP before)
        middle = len(data) // 2
        library.write_bytes(data[:middle] + b"\xcc" * 4096 + data[middle + 4096:])
    else:
        library.write_bytes(b"")


@needs_cpp
@pytest.mark.parametrize("how", ["truncated-1000", "truncated-half", "overwritten", "zero-byte"])
def test_a_damaged_library_is_never_loaded(tmp_path, how):
    """The ``ok`` marker intact, the ``.so`` damaged: found by its hash before ``load_library`` (no SIGBUS); with no
    compiler to rebuild it, one warning says so and the process runs on the PyTorch paths."""
    folder = _copy_build(tmp_path)
    _damage(next(folder.glob("*.so")), how)
    result = _probe(tmp_path, **_no_compiler(tmp_path))
    assert result.returncode == 0, f"exit {result.returncode}: {result.stderr[-2000:]}"
    assert "available False" in result.stdout
    assert "does not match its build record" in result.stderr and str(folder) in result.stderr
    assert "c++: not found" in result.stderr


@pytest.mark.slow
@needs_cpp
@pytest.mark.parametrize("how", ["truncated-half", "overwritten", "zero-byte"])
def test_a_damaged_library_is_rebuilt(tmp_path, how):
    folder = _copy_build(tmp_path)
    library = next(folder.glob("*.so"))
    _damage(library, how)
    result = _probe(tmp_path, timeout=600)
    assert "available True" in result.stdout, result.stderr
    assert "rebuilding it" in result.stderr
    assert library.stat().st_size > 1000 and build._matches(folder, library)


def _read_only(folder: Path) -> None:
    """Make ``folder`` and what it holds read-only, also for root (which writes into any folder it may not): the
    immutable attribute there (skipped where the file system has none)."""
    if os.geteuid() == 0:
        done = shutil.which("chattr") and subprocess.run(["chattr", "-R", "+i", str(folder)],
                                                          capture_output=True).returncode == 0
        if not done:
            pytest.skip("running as root without chattr +i here: cannot make a folder read-only")
    else:
        for path in [*folder.iterdir(), folder]:
            path.chmod(path.stat().st_mode & ~0o222)


def _writable_again(folder: Path) -> None:
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-R", "-i", str(folder)], capture_output=True)
    else:
        subprocess.run(["chmod", "-R", "u+w", str(folder)], check=True)


@needs_cpp
def test_a_read_only_cache_with_a_good_build_is_used(tmp_path):
    folder = _copy_build(tmp_path)
    _read_only(folder)
    try:
        result = _probe(tmp_path)
        assert "available True" in result.stdout, result.stderr
        assert "Permission" not in result.stderr and "not permitted" not in result.stderr
    finally:
        _writable_again(folder)


@needs_cpp
def test_a_read_only_cache_with_a_damaged_build_is_refused_with_the_folder_named(tmp_path):
    folder = _copy_build(tmp_path)
    _damage(next(folder.glob("*.so")), "truncated-half")
    _read_only(folder)
    try:
        result = _probe(tmp_path)
        assert result.returncode == 0 and "available False" in result.stdout, result.stderr
        assert "holds no valid build" in result.stderr and str(folder) in result.stderr
        assert result.stderr.count("compiled stripe kernel unavailable") == 1
    finally:
        _writable_again(folder)


def test_no_compiler_is_said_in_one_line_and_remembered(tmp_path):
    """Without a compiler the warning says ``c++: not found`` (it used to filter that line out) and the failure is
    remembered: later processes do not try again until the compiler changes."""
    first = _probe(tmp_path, **_no_compiler(tmp_path))
    assert "available False" in first.stdout
    warning = [line for line in first.stderr.splitlines() if "compiled stripe kernel unavailable" in line]
    assert len(warning) == 1 and "c++: not found" in warning[0]
    assert (build_folder(tmp_path) / "failed").exists()
    second = _probe(tmp_path, **_no_compiler(tmp_path))
    assert "available False" in second.stdout and "not retried until the compiler changes" in second.stderr


def test_a_failed_build_is_not_retried_until_the_compiler_changes(tmp_path):
    """A compiler that fails (here a script that logs its calls and exits 1) is run once; a changed compiler (a new
    modification time) is tried again."""
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir()
    fake = bin_dir / "c++"
    fake.write_text(f"#!/bin/sh\necho called >> {log}\necho 'fake: error: broken compiler' >&2\nexit 1\n")
    fake.chmod(0o755)
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.path.dirname(shutil.which('sh'))}", "CXX": None}
    first = _probe(tmp_path, **env)
    assert "available False" in first.stdout, first.stderr
    calls = log.read_text().count("called") if log.exists() else 0
    second = _probe(tmp_path, **env)
    assert "available False" in second.stdout and "not retried" in second.stderr
    assert (log.read_text().count("called") if log.exists() else 0) == calls
    os.utime(fake, ns=(fake.stat().st_atime_ns, fake.stat().st_mtime_ns + 10**9))
    third = _probe(tmp_path, **env)
    assert "available False" in third.stdout and "not retried" not in third.stderr


def build_folder(tmp_path: Path) -> Path:
    return tmp_path / "extensions" / build.build_dir().name


@pytest.mark.parametrize("arch, flags", [("native", ["-march=native"]), ("avx2", ["-march=native", "-mno-avx512f"]),
                                         ("generic", [])])
def test_each_kernel_arch_has_its_flags_and_its_own_build_folder(monkeypatch, arch, flags):
    monkeypatch.setenv("SWP_KERNEL_ARCH", arch)
    cflags = build.variant()["cflags"]
    if platform.machine() in ("x86_64", "AMD64"):
        assert [f for f in cflags if f.startswith(("-march", "-mno-"))] == flags
    folders = {}
    for other in build.ARCHS:
        monkeypatch.setenv("SWP_KERNEL_ARCH", other)
        folders[other] = build.build_dir().name
    assert len(set(folders.values())) == len(build.ARCHS)


def test_an_unknown_kernel_arch_is_refused_with_the_values_named(tmp_path):
    result = _probe(tmp_path, SWP_KERNEL_ARCH="avx1024")
    assert "available False" in result.stdout
    assert "SWP_KERNEL_ARCH='avx1024'" in result.stderr and "native, avx2, generic" in result.stderr
