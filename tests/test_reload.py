"""Every saved form of a stripe-pruned model, deployed or not, runs in a **fresh process** and reproduces the outputs
of the process that saved it: whole-module ``torch.save`` (after the saving process picked backends and built
caches), ``swp_plugin.save`` / ``load`` of a deployed model, a scripted deployed model (``torch.jit.save`` /
``swp_plugin.deployment.jit_load``), and a pickled deployed model where the kernel cannot load (PyTorch fallback)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import swp_plugin
from swp_plugin.deployment import deploy
from swp_plugin.layers.kernels import cpu as cpu_kernel
from swp_plugin.models import resnet56
from swp_plugin.testing import calibrate_bn, random_stripe_model, rel_err

needs_cpp = pytest.mark.skipif(not cpu_kernel.available(), reason=f"no compiled kernel: {cpu_kernel.build_error()}")

CHILD = """
import sys, torch
import swp_plugin  # noqa: F401 - the pickled classes live there
from swp_plugin.models import resnet56
kind, path, io = sys.argv[1:4]
x, want = torch.load(io)
if kind == "pickle":
    model = torch.load(path, weights_only=False)
elif kind == "save":
    model = swp_plugin.load(path, resnet56(width=0.5))
else:
    model = swp_plugin.deployment.jit_load(path)
with torch.no_grad():
    got = model(x)
err = float((got - want).abs().max() / want.abs().max())
print("err", err, "kernel", swp_plugin.layers.kernels.cpu.available())
"""


def _child(kind: str, path: Path, io: Path, **env) -> str:
    result = subprocess.run([sys.executable, "-c", CHILD, kind, str(path), str(io)], capture_output=True, text=True,
                            timeout=600, env={**os.environ, "PYTHONWARNINGS": "default", **env})
    assert result.returncode == 0, result.stderr[-3000:]
    err = float(result.stdout.split()[1])
    assert err < 1e-5, result.stdout
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def stripe_model():
    torch.manual_seed(0)
    model = random_stripe_model(resnet56(width=0.5).eval(), 0.3)
    calibrate_bn(model, torch.randn(4, 3, 32, 32))
    return model, torch.randn(2, 3, 32, 32)


def _io(tmp_path: Path, model, x) -> Path:
    with torch.no_grad():
        y = model(x)
    torch.save((x, y), tmp_path / "io.pt")
    return tmp_path / "io.pt"


def test_pickled_stripe_model_after_auto_choices(stripe_model, tmp_path):
    model, x = stripe_model
    io = _io(tmp_path, model, x)  # this process picked backends ('cpp' where it won) for this shape
    torch.save(model, tmp_path / "m.pt")
    _child("pickle", tmp_path / "m.pt", io)
    _child("pickle", tmp_path / "m.pt", io, SWP_DISABLE_CPP="1")  # no kernel there: the PyTorch paths


@needs_cpp
def test_deployed_model_every_way(stripe_model, tmp_path):
    model, x = stripe_model
    deployed = deploy(model, x)
    io = _io(tmp_path, deployed, x)
    with torch.no_grad():
        assert rel_err(model(x), deployed(x)) < 1e-5
    torch.save(deployed, tmp_path / "pickled.pt")
    _child("pickle", tmp_path / "pickled.pt", io)
    out = _child("pickle", tmp_path / "pickled.pt", io, SWP_DISABLE_CPP="1")
    assert "kernel False" in out and "computing the same function with PyTorch ops" in out
    swp_plugin.save(deployed, tmp_path / "saved.pt")
    assert torch.load(tmp_path / "saved.pt", weights_only=True)["deploy"]["choices"]
    _child("save", tmp_path / "saved.pt", io)
    scripted = torch.jit.script(deployed)
    torch.jit.save(scripted, tmp_path / "scripted.pt")
    _child("jit", tmp_path / "scripted.pt", io)


def test_swp_load_of_a_pickled_module_says_what_to_do(stripe_model, tmp_path):
    model, _ = stripe_model
    torch.save(model, tmp_path / "m.pt")
    with pytest.raises(ValueError, match="pickled Python objects"):
        swp_plugin.load(tmp_path / "m.pt", resnet56(width=0.5))
