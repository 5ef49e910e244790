"""save/load without pickled code, whole-module torch.save, training checkpoints with skeletons; files as
untrusted input (issue 21): every reproduction of the issue, a killed save, the loader fuzz."""

from __future__ import annotations

import os
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import timm
import torch
import torch.nn as nn
from conftest import calibrate_bn, randomize_skeletons, regularized_step

import swp_plugin
from swp_plugin import StripeConv2d, StripePruner, cli
from swp_plugin.layers.config import use_backend
from swp_plugin.layers.kernels import cpu as cpu_kernel
from swp_plugin.models import create_model
from swp_plugin.persistence import CheckpointError, digest, model_spec
from swp_plugin.testing import random_stripe_model

MODELS = ["vgg16_bn", "resnet56", "resnet18", "mobilenetv2_100", "densenet121"]


@pytest.fixture(autouse=True)
def _same_backend_everywhere():
    """The round trips below compare outputs bit for bit: every stripe layer runs the same backend (with
    backend='auto' a saved and a loaded layer could time differently and pick different, equally exact ones)."""
    with use_backend("stripe"):
        yield


def _fresh(name):
    torch.manual_seed(0)
    if timm.is_model(name):
        return timm.create_model(name, pretrained=False, num_classes=10), torch.randn(2, 3, 64, 64)
    return create_model(name, num_classes=10), torch.randn(2, 3, 32, 32)


def _pruned(name):
    model, x = _fresh(name)
    pruner = StripePruner(model, x[:1], ignored_layers=[model.get_classifier()])
    randomize_skeletons(pruner, dead_stripes=0.5, dead_filters=0.3)
    regularized_step(model, pruner, x)
    calibrate_bn(model, x)
    pruner.step()
    return model, x


@pytest.mark.parametrize("name", MODELS)
def test_save_load_round_trip_is_exact_with_weights_only(name, tmp_path):
    model, x = _pruned(name)
    path = tmp_path / "pruned.pt"
    swp_plugin.save(model, path)
    raw = torch.load(path, weights_only=True)  # tensors and plain Python only
    assert raw["format"] == swp_plugin.persistence.FORMAT and any(e["stripe"] for e in raw["structure"].values())
    fresh, _ = _fresh(name)
    swp_plugin.load(path, fresh).eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), model.eval()(x))
    assert sum(isinstance(m, StripeConv2d) for m in fresh.modules()) == sum(
        isinstance(m, StripeConv2d) for m in model.modules())


def test_whole_module_torch_save_needs_weights_only_false(tmp_path):
    model, x = _pruned("resnet56")
    path = tmp_path / "whole.pt"
    torch.save(model, path)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)
    loaded = torch.load(path, weights_only=False).eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))


def test_load_refuses_other_files_and_architectures(tmp_path):
    model, _ = _pruned("resnet56")
    swp_plugin.save(model, tmp_path / "a.pt")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "b.pt")
    with pytest.raises(ValueError, match="not a swp_plugin.save file"):
        swp_plugin.load(tmp_path / "b.pt", create_model("resnet56"))
    with pytest.raises(ValueError, match="not the same architecture"):
        swp_plugin.load(tmp_path / "a.pt", create_model("vgg16_bn"))


def test_training_checkpoint_with_skeletons_resumes(tmp_path):
    model, x = _fresh("resnet56")
    pruner = StripePruner(model, x[:1], sr=1e-3, ignored_layers=[model.fc])
    randomize_skeletons(pruner, dead_stripes=0.3, dead_filters=0.2)
    regularized_step(model, pruner, x)
    torch.save(model.state_dict(), tmp_path / "ckpt.pt")

    resumed, _ = _fresh("resnet56")
    resumed_pruner = StripePruner(resumed, x[:1], sr=1e-3, ignored_layers=[resumed.fc])
    resumed.load_state_dict(torch.load(tmp_path / "ckpt.pt", weights_only=True))
    assert resumed_pruner.stripe_sparsity() == pruner.stripe_sparsity() > 0
    for m in (model, resumed):
        calibrate_bn(m, x)
    with torch.no_grad():
        assert torch.equal(resumed(x), model(x))
    regularized_step(resumed, resumed_pruner, x)  # training goes on
    resumed_pruner.step()


# ------------------------------------------------------------------ files are untrusted input (issue 21)
needs_cpp = pytest.mark.skipif(not cpu_kernel.available(), reason=f"no compiled kernel: {cpu_kernel.build_error()}")


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1)).eval()


def _edited(path: Path, target: Path, edit, fix_digest: bool = True) -> Path:
    """``path``'s checkpoint edited by ``edit(checkpoint)`` and written to ``target`` (its digest recomputed, as
    someone editing the file on purpose would)."""
    checkpoint = torch.load(path, weights_only=True)
    edit(checkpoint)
    if fix_digest and "digest" in checkpoint:
        checkpoint["digest"] = digest(checkpoint)
    torch.save(checkpoint, target)
    return target


def _stripe_file(tmp_path: Path) -> Path:
    model = random_stripe_model(_net(), keep=0.5)
    swp_plugin.save(model, tmp_path / "stripe.pt")
    return tmp_path / "stripe.pt"


FORWARD_IN_CHILD = """
import sys, torch, torch.nn as nn, swp_plugin
x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))
for path in sys.argv[1:]:
    torch.manual_seed(0)
    try:
        model = swp_plugin.load(path, nn.Sequential(nn.Conv2d(3, 8, 3, padding=1)).eval())
    except ValueError as err:
        print("refused:", err, flush=True)
        continue
    with torch.no_grad():
        print("max", float(model(x).abs().max()), flush=True)
"""


def _child_forward(*paths: Path) -> list:
    """One line per file: its output's max, or the loader's error (in one fresh process: a crash fails the test
    instead of killing the run)."""
    result = subprocess.run([sys.executable, "-c", FORWARD_IN_CHILD, *map(str, paths)], capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, f"exit {result.returncode} (a crash?)\n{result.stdout}\n{result.stderr[-2000:]}"
    return result.stdout.strip().splitlines()


PLAN_EDITS = [("ptr", 10**9), ("ptr", -5), ("phase_info", -100000), ("entries", 10**6), ("rows", 10**6)]


@needs_cpp
def test_a_kernel_plan_is_never_read_from_a_file(tmp_path):
    """The issue's SIGSEGV (``ptr`` edited) and silent out-of-bounds read (``phase_info[0, 0] = -100000``: values
    around 3e30): a deployed file whose plan tensors were edited. Plans are derived from the checked stripe
    indexes, never loaded: the edited plan of an old-format file (format 1 stored plans) is ignored and the
    output is the good file's."""
    x = torch.randn(1, 3, 16, 16)
    deployed = swp_plugin.deploy(_net(), x, choices={"0": "kernel"})
    swp_plugin.save(deployed, tmp_path / "dep.pt")
    assert not any(k.endswith((".ptr", ".phase_info", ".entries", ".rows")) for k in
                   torch.load(tmp_path / "dep.pt", weights_only=True)["state_dict"])
    layer = deployed.get_submodule("0")

    def old_format_with_bad_plan(field, value):
        def edit(ck):
            ck["format"] = "swp_plugin/1"
            del ck["digest"]
            for name in ("rows", "phase_info", "ptr", "entries"):  # the plan buffers format 1 stored
                ck["state_dict"][f"0.{name}"] = torch.zeros(layer.out_channels + 1, dtype=torch.long)
            ck["state_dict"][f"0.{field}"].view(-1)[1] = value
        return edit

    bad = [_edited(tmp_path / "dep.pt", tmp_path / f"bad{i}.pt", old_format_with_bad_plan(*edit))
           for i, edit in enumerate(PLAN_EDITS)]
    good, *outputs = _child_forward(tmp_path / "dep.pt", *bad)
    assert good.startswith("max") and outputs == [good] * len(PLAN_EDITS)


@needs_cpp
def test_deployed_stripe_indexes_are_checked(tmp_path):
    x = torch.randn(1, 3, 16, 16)
    swp_plugin.save(swp_plugin.deploy(_net(), x, choices={"0": "kernel"}), tmp_path / "dep.pt")
    edits = [("stripe_out", 10**9), ("stripe_pos", -1), ("stripe_pos", 0)]  # out of range, position 0 last

    def edit(field, value):
        return lambda ck: ck["state_dict"][f"0.{field}"].__setitem__(-1, value)

    bad = [_edited(tmp_path / "dep.pt", tmp_path / f"bad{i}.pt", edit(*e)) for i, e in enumerate(edits)]
    for path, (field, _), line in zip(bad, edits, _child_forward(*bad)):
        assert line.startswith(f"refused: {path}") and field in line, line


@pytest.mark.parametrize("edit, message", [
    (lambda s: s["0.stripe_pos"].__setitem__(0, 9), r"stripe_pos\[0\] = 9 is outside \[0, 9\)"),
    (lambda s: s["0.stripe_out"].__setitem__(0, -1), r"stripe_out\[0\] = -1 is outside"),
    (lambda s: s["0.stripe_pos"].__setitem__(slice(None), s["0.stripe_pos"].flip(0)), "out of order"),
    (lambda s: s["0.stripe_out"].__setitem__(1, int(s["0.stripe_out"][0])), "duplicates|out of order"),
    (lambda s: s.__setitem__("0.stripe_out", s["0.stripe_out"][:-1]), "shape"),
    (lambda s: s.__setitem__("0.stripe_pos", s["0.stripe_pos"].int()), "dtype torch.int32"),
])
def test_stripe_indexes_are_checked(tmp_path, edit, message):
    """Edited ``stripe_pos`` / ``stripe_out`` made the cpp, stripe and dense backends compute different things."""
    bad = _edited(_stripe_file(tmp_path), tmp_path / "bad.pt", lambda ck: edit(ck["state_dict"]))
    with pytest.raises(CheckpointError, match=message) as info:
        swp_plugin.load(bad, _net())
    assert str(info.value).startswith(str(bad)) and "state_dict['0.stripe" in str(info.value)


@pytest.mark.parametrize("name, key, value, message", [
    ("1", "eps", 100.0, r"structure\['1'\]\['eps'\]: unknown key"),
    ("0", "stride", [2, 2], r"structure\['0'\]\['stride'\]: unknown key"),
    ("0", "out_channels", 10**9, r"\['out_channels'\]: 1000000000 must be an int in \[1, 8\]"),
    ("1", "num_features", "8", r"\['num_features'\]: '8' must be an int"),
    ("1", "type", "Linear", "records a Linear, the model has a BatchNorm2d"),
])
def test_structure_entries_follow_the_schema(tmp_path, name, key, value, message):
    """Any key of an entry used to be setattr'd onto the module (``eps=100`` on a BatchNorm: output off by 22%)."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)).eval()
    swp_plugin.save(model, tmp_path / "m.pt")
    bad = _edited(tmp_path / "m.pt", tmp_path / "bad.pt", lambda ck: ck["structure"][name].__setitem__(key, value))
    with pytest.raises(CheckpointError, match=message):
        swp_plugin.load(bad, nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)))


def test_a_stripe_entry_cannot_change_the_convolution(tmp_path):
    bad = _edited(_stripe_file(tmp_path), tmp_path / "bad.pt",
                  lambda ck: ck["structure"]["0"].__setitem__("stride", [2, 2]))
    with pytest.raises(CheckpointError, match=r"\['stride'\]: \[2, 2\] differs from the model's \(1, 1\)"):
        swp_plugin.load(bad, _net())


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused(tmp_path, value):
    bad = _edited(_stripe_file(tmp_path), tmp_path / "bad.pt",
                  lambda ck: ck["state_dict"]["0.weight"].view(-1).__setitem__(3, value))
    with pytest.raises(CheckpointError, match=r"state_dict\['0.weight'\]: 1 NaN/Inf"):
        swp_plugin.load(bad, _net())


def test_a_damaged_file_is_refused_by_its_digest(tmp_path):
    path = _stripe_file(tmp_path)
    bad = _edited(path, tmp_path / "bad.pt", lambda ck: ck["state_dict"]["0.weight"].view(-1).__setitem__(0, 0.5),
                  fix_digest=False)
    with pytest.raises(CheckpointError, match="digest: the content does not match"):
        swp_plugin.load(bad, _net())


def test_unclear_files_get_clear_errors(tmp_path):
    path = _stripe_file(tmp_path)
    data = path.read_bytes()
    cases = {"empty.pt": (b"", "is empty \\(0 bytes\\)"),
             "half.pt": (data[: len(data) // 2], "is damaged or truncated"),
             "k1000.pt": (data[:1000], "is damaged or truncated"),
             "text.pt": (b"hello, world\n", "is not a swp_plugin.save file \\(not a torch.save archive: a text file")}
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(CheckpointError, match=f"^{tmp_path / name}: {message}"):
            swp_plugin.load(tmp_path / name, _net())
    for key in ("structure", "state_dict"):
        bad = _edited(path, tmp_path / f"no-{key}.pt", lambda ck, key=key: ck.pop(key))
        with pytest.raises(CheckpointError, match=f"{key}: missing"):
            swp_plugin.load(bad, _net())
    newer = _edited(path, tmp_path / "newer.pt", lambda ck: ck.__setitem__("format", "swp_plugin/7"))
    with pytest.raises(CheckpointError, match="written by a newer swp_plugin .* upgrade swp_plugin"):
        swp_plugin.load(newer, _net())


def test_metadata_is_checked_before_a_model_is_built(tmp_path):
    """``model_kwargs`` went to ``timm.create_model`` as they were (a file could make `swp report` open another
    file it names); a file without ``num_classes`` gave a raw KeyError."""
    model = create_model("resnet20", num_classes=10)
    swp_plugin.save(model, tmp_path / "m.pt", architecture="resnet20", num_classes=10, input_size=[3, 32, 32],
                    model_kwargs={"width": 1.0})
    meta = swp_plugin.persistence.read(tmp_path / "m.pt")["metadata"]
    assert model_spec(tmp_path / "m.pt", meta)["model_kwargs"] == {"width": 1.0}
    for edit, message in [({"model_kwargs": {"pretrained_cfg_overlay": {"file": "/etc/passwd"}}}, "unknown key"),
                          ({"num_classes": None}, r"\['num_classes'\]: None must be an int"),
                          ({"input_size": [3, 32]}, r"\['input_size'\]: \[3, 32\] must be \[C, H, W\]"),
                          ({"architecture": "../x"}, "is not a model name")]:
        with pytest.raises(CheckpointError, match=message):
            model_spec(tmp_path / "m.pt", {**meta, **edit})
    bad = _edited(tmp_path / "m.pt", tmp_path / "bad.pt",
                  lambda ck: ck["metadata"]["model_kwargs"].update(pretrained_cfg_overlay={"file": "x"}))
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["report", str(bad)])
    assert exit_info.value.code == 2


def test_a_killed_save_never_damages_the_previous_file(tmp_path):
    """SIGKILL at random moments of saves over an existing file (a forked child saving in a loop): the file is
    always a complete model, the old or a new one (it used to be left at 0 bytes or cut)."""
    path = tmp_path / "model.pt"
    model = nn.Linear(2000, 4000)  # 32 MB: a save takes a while
    swp_plugin.save(model, path, version=0)
    rng = random.Random(0)
    for _ in range(8):
        pid = os.fork()
        if pid == 0:  # the child: save until killed
            try:
                for i in range(1, 10**6):
                    swp_plugin.save(model, path, version=i)
            finally:
                os._exit(1)
        time.sleep(rng.uniform(0.0, 0.6))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        checkpoint = swp_plugin.persistence.read(path)  # complete: its digest matches
        assert isinstance(checkpoint["metadata"]["version"], int)
        swp_plugin.load(path, nn.Linear(2000, 4000))
