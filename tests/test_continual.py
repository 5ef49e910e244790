"""examples/continual_prune.py end to end on a tiny budget (every --first option), and its building blocks."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch_pruning as tp

from swp_plugin import StripePruner
from swp_plugin.models import resnet20, vgg16_bn
from swp_plugin.recipes.continual import (
    BNTaylorImportance,
    _filter_norms,
    classifier_of,
    filter_norm_rms,
    load_pruned_checkpoint,
    restore_filter_norms,
    sr_for_push,
)
from swp_plugin.recipes.data import AugmentedTensors
from swp_plugin.recipes.training import lr_sum
from swp_plugin.testing import calibrate_bn, rel_err

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "continual_prune.py"


def _example():
    spec = importlib.util.spec_from_file_location("continual_prune", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TINY = ["--subset", "256", "--test-subset", "256", "--width", "0.125", "--batch-size", "64",
        "--epochs-baseline", "1", "--epochs-sparse", "1", "--epochs-first-finetune", "1", "--gbn-steps", "2",
        "--epochs-gbn-step", "1", "--epochs-swp", "1", "--epochs-finetune", "1",
        "--latency-repeats", "3", "--threads", "1", "--no-progress", "--device", "cpu"]


def _run(tmp_path: Path, *extra: str) -> dict:
    out = tmp_path / "out"
    result = _example().main(TINY + ["--out", str(out), "--json", str(tmp_path / "r.json")] + list(extra))
    written = json.loads((tmp_path / "r.json").read_text())
    assert written["stages"] == result["stages"]
    for stage in written["stages"]:
        assert {"name", "accuracy", "params", "macs", "latency_ms_batch1", "latency_ms_batch64"} <= set(stage)
        assert 0 <= stage["accuracy"] <= 100 and stage["latency_ms_batch1"] > 0 and stage["params"] > 0
    swp = written["stages"][-1]
    assert swp["latency_ms_batch1_eager"] > 0 and "convs on the stripe kernel" in swp["deploy"]
    assert (out / "filter_shapes.png").stat().st_size > 0
    return written


RELOAD = """
import sys, torch
from pathlib import Path
from swp_plugin import StripeConv2d
from swp_plugin.layers.deployed import DeployedStripeConv2d
from swp_plugin.recipes.continual import saved_model
out = Path(sys.argv[1])
outputs = torch.load(out / "outputs.pt")
for name in [n for n in outputs if n != "x"]:
    model, meta = saved_model(out / f"{name}.pt")
    with torch.no_grad():
        y = model.eval()(outputs["x"])
    err = float((y - outputs[name]).abs().max() / outputs[name].abs().max())
    assert err < 1e-5, (name, err)
    kinds = {type(m).__name__ for m in model.modules()}
    print(name, err, "StripeConv2d" in kinds, "DeployedStripeConv2d" in kinds)
"""


def _reload_in_a_fresh_process(out: Path) -> str:
    """Every model file the example wrote loads in a new process (swp_plugin.load) and reproduces its outputs;
    `swp report` reads each of them."""
    result = subprocess.run([sys.executable, "-c", RELOAD, str(out)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    for path in sorted(out.glob("*.pt")):
        if path.name != "outputs.pt":
            report = subprocess.run([sys.executable, "-m", "swp_plugin", "report", str(path)], capture_output=True,
                                    text=True, timeout=600)
            assert report.returncode == 0 and "total" in report.stdout, report.stderr[-2000:]
    return result.stdout


def _names_and_macs(result: dict):
    return [s["name"] for s in result["stages"]], [s["macs"] for s in result["stages"]]


def _check_swp(result: dict) -> None:
    before, swp = result["stages"][-2:]
    assert swp["name"] == "swp" and swp["macs"] <= before["macs"]
    if swp["dead_stripes"] > 0.5:  # whole layers died: MACs must show it
        assert swp["macs"] < 0.5 * before["macs"]


@pytest.mark.needs_data
@pytest.mark.parametrize("first", ["slimming", "gbn"])
def test_channel_first_stage_then_swp(tmp_path, first):
    result = _run(tmp_path, "--first", first)
    names, macs = _names_and_macs(result)
    assert names == ["baseline", first, "swp"]
    reloaded = _reload_in_a_fresh_process(tmp_path / "out")
    assert set(line.split()[0] for line in reloaded.splitlines()) == {"baseline", first, "swp", "swp_deployed"}
    assert "swp_deployed" in reloaded and reloaded.count("True") >= 2
    assert macs[0] > macs[1]  # channels removed
    _check_swp(result)


@pytest.mark.needs_data
def test_none_is_swp_on_the_baseline_plain_sr_cliff(tmp_path):
    # plain SWP (no renormalisation) with a large sr: every stripe dies within the 4 steps; still exact
    result = _run(tmp_path, "--first", "none", "--renorm", "0", "--sr", "8")
    names, macs = _names_and_macs(result)
    assert names == ["baseline", "swp"] and result["stages"][1]["dead_stripes"] > 0.9
    _check_swp(result)


@pytest.mark.needs_data
def test_pruned_checkpoint_is_pruned_further(tmp_path):
    torch.manual_seed(0)
    model = vgg16_bn(num_classes=10, in_chans=1, width=0.125)
    x = torch.randn(2, 1, 28, 28)
    torch.save(model, tmp_path / "original.pt")
    tp.pruner.MagnitudePruner(model, x, importance=tp.importance.MagnitudeImportance(p=1), pruning_ratio=0.3,
                              ignored_layers=[model.classifier]).step()
    torch.save(model, tmp_path / "pruned.pt")
    result = _run(tmp_path, "--first", f"checkpoint:{tmp_path / 'pruned.pt'}", "--baseline",
                  str(tmp_path / "original.pt"), "--trust-pickle")  # pickled files: only with the flag
    names, macs = _names_and_macs(result)
    assert names == ["baseline", "checkpoint", "swp"] and macs[0] > macs[1]
    _check_swp(result)


def test_bn_taylor_importance_scores_batchnorm_gates_globally():
    torch.manual_seed(0)
    model = resnet20(num_classes=10, in_chans=1, width=0.25)
    x, y = torch.randn(8, 1, 16, 16), torch.arange(8)
    importance = BNTaylorImportance()
    pruner = tp.pruner.BasePruner(model, x[:1], importance=importance, global_pruning=True, pruning_ratio=0.4,
                                  iterative_steps=2, ignored_layers=[model.fc])
    channels = sum(m.num_features for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    for _ in range(2):
        importance.reset()
        for _ in range(2):
            model.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            importance.accumulate(model)
        group = pruner.DG.get_pruning_group(model.conv1, tp.prune_conv_out_channels, [0, 1, 2])
        scores = importance(group)
        assert scores is not None and scores.shape == (3,) and torch.all(scores >= 0)
        pruner.step()
    assert sum(m.num_features for m in model.modules() if isinstance(m, nn.BatchNorm2d)) < 0.8 * channels
    assert model(x).shape == (8, 10)


def test_restore_filter_norms_is_exact_and_scales_up():
    torch.manual_seed(0)
    model = resnet20(num_classes=10, in_chans=1, width=0.25)
    x = torch.randn(4, 1, 16, 16)
    target = filter_norm_rms(model)
    pruner = StripePruner(model, x[:1], ignored_layers=[model.fc])
    with torch.no_grad():
        for fs in pruner.skeletons.values():  # shrunken skeletons, some stripes dead
            fs.mul_(0.1).masked_fill_(torch.rand(fs.shape) < 0.3, 0)
    model.train()
    nn.functional.cross_entropy(model(x), torch.arange(4)).backward()
    pruner.regularize(model)
    pruner.step()
    calibrate_bn(model, x)
    with torch.no_grad():
        y0 = model(x)
    factors = restore_filter_norms(model, x[:1], target)
    assert len(factors) >= 19 and min(factors.values()) > 5  # every conv (and shortcut) feeds a BN
    with torch.no_grad():
        assert rel_err(y0, model(x)) <= 1e-5
    modules = dict(model.named_modules())
    for name in factors:
        norms = _filter_norms(modules[name])
        assert torch.all((norms == 0) | (norms >= 0.999 * target[name]))


def test_lr_sum_and_sr_for_push():
    assert math.isclose(lr_sum(0.1, 100, "cosine"), 0.1 * 101 / 2, rel_tol=1e-9)
    assert math.isclose(lr_sum(0.1, 100, "step"), 0.1 * 50 + 0.01 * 25 + 0.001 * 25, rel_tol=1e-9)
    assert math.isclose(lr_sum(0.1, 100, "constant"), 10.0)
    sr = sr_for_push(0.9, 0.1, 100, "cosine", momentum=0.9)
    assert math.isclose(sr * lr_sum(0.1, 100) / (1 - 0.9), 0.9, rel_tol=1e-9)


def test_helpers_checkpoint_and_head(tmp_path):
    model = vgg16_bn(num_classes=10, in_chans=1, width=0.125)
    assert classifier_of(model) is model.classifier and classifier_of(resnet20()).out_features == 10
    torch.save({"model": model, "epoch": 3}, tmp_path / "wrapped.pt")
    with pytest.raises(ValueError, match="trust_pickle=True"):  # unpickling runs code: only when asked
        load_pruned_checkpoint(tmp_path / "wrapped.pt")
    assert isinstance(load_pruned_checkpoint(tmp_path / "wrapped.pt", trust_pickle=True), type(model))
    torch.save(model.state_dict(), tmp_path / "state.pt")
    with pytest.raises(ValueError, match="torch.save\\(model\\)"):
        load_pruned_checkpoint(tmp_path / "state.pt")


def test_augmented_tensors_keep_shape_and_labels():
    data = torch.utils.data.TensorDataset(torch.randn(4, 1, 28, 28), torch.arange(4))
    augmented = AugmentedTensors(data, padding=4, fill=-1.0)
    x, y = augmented[2]
    assert x.shape == (1, 28, 28) and y == 2 and len(augmented) == 4


def test_width_is_for_the_paper_nets_only(capsys):
    parse = _example().parse_args
    assert parse(["--model", "resnet18"]).width == 1.0            # the cpu preset's 0.25 is not applied to timm
    assert parse(["--model", "resnet56"]).width == 0.25
    with pytest.raises(SystemExit):
        parse(["--model", "resnet18", "--width", "0.5"])
    assert "--width is the channel multiplier" in capsys.readouterr().err
    from swp_plugin.models import create_model

    with pytest.raises(ValueError, match="width=0.5 is the channel multiplier"):
        create_model("resnet18", width=0.5)
    assert create_model("resnet20", in_chans=1, width=0.5).conv1.out_channels == 8


def test_renormalize_skeletons_with_the_pruner_attached():
    """feeding_batchnorms finds the conv -> BatchNorm pairs also on a model whose convs and norms are
    parametrized (a regression: it found none there, so the renormalisation silently did nothing); renormalising
    sets each filter's largest FS to 1 and keeps the eval outputs."""
    from swp_plugin.recipes.continual import feeding_batchnorms, renormalize_skeletons

    model = resnet20(num_classes=10, in_chans=1, width=0.25)
    x = torch.randn(8, 1, 28, 28)
    before = feeding_batchnorms(model, x[:1])
    pruner = StripePruner(model, x[:1], sr=1e-3, ignored_layers=[model.fc])
    after = feeding_batchnorms(model, x[:1])
    assert len(after) == len(before) == 21 and all(after[n] is bn for n, bn in before.items())
    calibrate_bn(model, x)
    with torch.no_grad():
        for fs in pruner.skeletons.values():
            fs.mul_(torch.rand_like(fs) * 0.5 + 0.1)
    model.eval()
    with torch.no_grad():
        y = model(x)
        renormalize_skeletons(pruner, after)
        assert rel_err(model(x), y) < 1e-5
    for name, fs in pruner.skeletons.items():
        assert torch.allclose(fs.abs().flatten(1).amax(1), torch.ones(fs.shape[0])), name
