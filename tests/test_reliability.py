"""Bad input and unusual settings: a clear error (which layer, which value, what to do) or a model that runs.

Every case here has a row in docs/reliability.md with the same behaviour text (checked below).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from conftest import calibrate_bn, outputs_around_step, randomize_skeletons, regularized_step, rel_err
from torch.nn.utils import parametrize

import swp_plugin
from swp_plugin import StripeConv2d, StripePruner, cli
from swp_plugin.models import resnet20
from swp_plugin.recipes.continual import load_pruned_checkpoint

CASES: dict = {}


def case(case_id: str, behaviour: str):
    """Register a test as the check of one row of docs/reliability.md."""

    def register(fn):
        CASES[case_id] = behaviour
        return fn

    return register


def _setup(dtype=torch.float32, **kwargs):
    torch.manual_seed(0)
    model = resnet20(width=0.5).to(dtype)
    x = torch.randn(4, 3, 32, 32, dtype=dtype)
    return model, x, StripePruner(model, x[:1], ignored_layers=[model.fc], **kwargs)


def _untouched(model) -> bool:
    return parametrize.is_parametrized(model.conv1) and not any(isinstance(m, StripeConv2d) for m in model.modules())


@case("nan-skeleton", "step() raises ValueError naming the layer; the model is untouched")
def test_nan_skeleton():
    model, x, pruner = _setup()
    with torch.no_grad():
        pruner.skeletons["layers.2.conv1"][1, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="'layers.2.conv1'.*NaN/Inf"):
        pruner.step()
    assert _untouched(model)


@case("nan-weight", "step() raises ValueError naming the layer; the model is untouched")
def test_nan_weight():
    model, x, pruner = _setup()
    with torch.no_grad():
        model.layers[0].conv2.parametrizations.weight.original[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"'layers\.0\.conv2\..*' holds NaN/Inf"):
        pruner.step()
    assert _untouched(model)


@case("bad-hyperparameter", "negative, NaN/Inf or non-numeric sr / threshold / tolerance: ValueError at construction")
@pytest.mark.parametrize("kwargs", [{"sr": -1.0}, {"threshold": float("inf")}, {"sr": "1e-5"}, {"tolerance": -1.0}])
def test_bad_hyperparameters(kwargs):
    with pytest.raises(ValueError, match="must be"):
        _setup(**kwargs)


@case("bad-target", "a target outside (0, 1), or both macs_reduction and params_reduction: ValueError at construction")
@pytest.mark.parametrize("kwargs", [{"macs_reduction": 1.2}, {"params_reduction": 0.0},
                                    {"macs_reduction": 0.5, "params_reduction": 0.5}])
def test_bad_target(kwargs):
    with pytest.raises(ValueError, match="must be in|one target"):
        _setup(**kwargs)


@case("threshold-and-target", "ValueError at construction: they are mutually exclusive")
def test_threshold_and_target():
    with pytest.raises(ValueError, match="mutually exclusive"):
        _setup(threshold=0.05, macs_reduction=0.5)


@case("unreachable-target", "step() raises ValueError with the reachable reduction; the model is untouched")
def test_unreachable_target():
    model, x, pruner = _setup(macs_reduction=0.9, max_pruning_ratio=0.2)
    with pytest.raises(ValueError, match="unreachable"):
        pruner.step()
    assert _untouched(model)


@case("unknown-option", "an option torch-pruning's BasePruner does not have: TypeError listing the valid ones")
def test_unknown_option():
    with pytest.raises(TypeError, match="unknown StripePruner option.*pruning_ratio"):
        _setup(prunning_ratio=0.5)


@case("layer-loses-every-stripe",
      "regularize() warns naming the layer; step() keeps one empty output channel for it; the model runs, exact")
def test_layer_loses_every_stripe():
    model, x, pruner = _setup()
    with torch.no_grad():
        pruner.skeletons["layers.1.conv1"].fill_(0.01)
    with pytest.warns(UserWarning, match="every stripe of 'layers.1.conv1' is now dead"):
        regularized_step(model, pruner, x)
    (y0,), (y1,) = outputs_around_step(model, pruner, x)
    assert rel_err(y0, y1) <= 1e-4
    assert model.layers[1].conv1.out_channels >= 1 and model.layers[1].conv1.num_stripes == 0


@case("model-loses-every-stripe",
      "every layer warns; step() keeps one channel per layer; the model runs and outputs a constant, exact")
def test_model_loses_every_stripe():
    model, x, pruner = _setup()
    with torch.no_grad():
        for fs in pruner.skeletons.values():
            fs.zero_()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        regularized_step(model, pruner, x)
    assert len([w for w in caught if "every stripe" in str(w.message)]) == len(pruner.skeletons)
    (y0,), (y1,) = outputs_around_step(model, pruner, x)
    assert torch.allclose(y0, y1) and torch.allclose(y1, y1[:1].expand_as(y1))
    assert all(m.out_channels >= 1 for m in model.modules() if isinstance(m, StripeConv2d))


@case("bad-example-inputs", "wrong shape, dtype, type or device: ValueError at construction saying so")
@pytest.mark.parametrize("inputs", [torch.randn(1, 1, 32, 32), "image", torch.randn(1, 3, 32, 32, device="meta")])
def test_bad_example_inputs(inputs):
    model = resnet20(width=0.5)
    with pytest.raises(ValueError, match="example_inputs do not run through the model|example_inputs is on the meta"):
        StripePruner(model, inputs)


@case("step-twice", "RuntimeError: already merged and pruned, build a new StripePruner")
def test_step_twice():
    _, _, pruner = _setup()
    pruner.step()
    with pytest.raises(RuntimeError, match="already merged"):
        pruner.step()


@case("regularize-before-backward", "RuntimeError: call it after loss.backward() and before optimizer.step()")
def test_regularize_before_backward():
    model, _, pruner = _setup()
    with pytest.raises(RuntimeError, match="after loss.backward"):
        pruner.regularize(model)


@case("skeleton-removed", "regularize()/step() raise RuntimeError naming the conv whose Filter Skeleton is gone")
@pytest.mark.parametrize("how", ["remove_parametrization", "replace_module"])
def test_skeleton_removed(how):
    model, x, pruner = _setup()
    if how == "remove_parametrization":
        parametrize.remove_parametrizations(model.layers[3].conv2, "weight")
    else:
        model.layers[3].conv2 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
    with pytest.raises(RuntimeError, match="'layers.3.conv2' is gone"):
        pruner.step()


@case("ignored-not-module", "ValueError at construction: pass the modules themselves")
def test_ignored_not_module():
    model = resnet20(width=0.5)
    with pytest.raises(ValueError, match="pass the modules themselves"):
        StripePruner(model, torch.randn(1, 3, 32, 32), ignored_layers=["fc"])


@case("no-eligible-conv", "ValueError at construction listing why each conv was skipped")
def test_no_eligible_conv():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(2))
    x = torch.randn(1, 3, 8, 8)
    model(x)
    with pytest.raises(ValueError, match="no eligible conv.*in ignored_layers"):
        StripePruner(model, x, ignored_layers=[model[0]])


@case("low-precision", "fp16/bf16 models prune; the exactness check uses a dtype tolerance (1e-2 fp16, 5e-2 bf16)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision(dtype):
    model, x, pruner = _setup(dtype=dtype)
    randomize_skeletons(pruner, dead_stripes=0.5, dead_filters=0.2)
    regularized_step(model, pruner, x)
    (y0,), (y1,) = outputs_around_step(model, pruner, x)
    assert y1.dtype == dtype and rel_err(y0.float(), y1.float()) <= pruner.tolerance


@case("train-mode-at-step",
      "step() compares outputs in eval mode, leaves BatchNorm statistics unchanged and restores train mode")
def test_train_mode_at_step():
    model, x, pruner = _setup()
    calibrate_bn(model, x)
    model.train()
    stats = model.layers[0].bn1.running_mean.clone()
    pruner.step()
    assert model.training and torch.equal(model.layers[0].bn1.running_mean[: len(stats)], stats)


@case("failure-half-way",
      "everything is rehearsed on a copy first: a failure raises RuntimeError and leaves the model as it was")
def test_failure_half_way(monkeypatch):
    model, x, pruner = _setup()
    monkeypatch.setattr(StripeConv2d, "forward", lambda self, inp: torch.zeros(1))
    with pytest.raises(RuntimeError, match="left as it was"):
        pruner.step()
    assert _untouched(model)


@case("group-search-fails",
      "a channel group torch-pruning cannot build (error or over 2 s) keeps its dead channels; stripes are pruned, "
      "exactly, and one warning names what was skipped")
def test_group_search_fails(monkeypatch):
    import torch_pruning as tp

    model, x, pruner = _setup()
    randomize_skeletons(pruner, dead_stripes=0.5, dead_filters=0.3)
    original = tp.DependencyGraph.get_pruning_group

    def failing(self, module, fn, idxs):
        if module is self.model.layers[0].conv1:  # in every graph: of the rehearsal copies and of the model
            raise IndexError("index 7 is out of bounds")
        return original(self, module, fn, idxs)

    monkeypatch.setattr(tp.DependencyGraph, "get_pruning_group", failing)
    with pytest.warns(UserWarning, match=r"channel cleanup skipped in 1 place\(s\).*layers\.0\.conv1: .*IndexError"):
        before, after = outputs_around_step(model, pruner, x)
    assert rel_err(before[0], after[0]) < 1e-4
    assert isinstance(model.layers[0].conv1, StripeConv2d)
    assert any("IndexError" in str(n) for n in pruner.notes)


@case("determinism", "same model, seed and inputs give the same pruned structure and outputs")
def test_determinism():
    results = []
    for _ in range(2):
        model, x, pruner = _setup()
        randomize_skeletons(pruner, dead_stripes=0.5, dead_filters=0.3)
        regularized_step(model, pruner, x)
        calibrate_bn(model, x)
        pruner.step()
        shapes = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
        with torch.no_grad():
            results.append((shapes, model(x)))
    assert results[0][0] == results[1][0] and torch.equal(results[0][1], results[1][1])


@case("optimizer-built-before-step",
      "step() replaces parameters: rebuild the optimizer after step() (documented); old one holds stale tensors")
def test_optimizer_rebuilt_after_step():
    model, x, pruner = _setup()
    old = torch.optim.SGD(model.parameters(), lr=0.1)
    pruner.step()
    current = {id(p) for p in model.parameters()}
    assert not all(id(p) in current for g in old.param_groups for p in g["params"])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)  # the documented way
    model.train()
    nn.functional.cross_entropy(model(x), torch.arange(4)).backward()
    optimizer.step()


@case("cuda", "on CUDA the pruner, masks, probes and stripe layers stay on the model's device (skipped without GPU)")
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda():
    model = resnet20(width=0.5).cuda()
    x = torch.randn(4, 3, 32, 32, device="cuda")
    pruner = StripePruner(model, x[:1], ignored_layers=[model.fc])
    randomize_skeletons(pruner, dead_stripes=0.5, dead_filters=0.2)
    regularized_step(model, pruner, x)
    (y0,), (y1,) = outputs_around_step(model, pruner, x)
    assert rel_err(y0, y1) <= 1e-4 and all(p.is_cuda for p in model.parameters())


@case("ddp-wrapper", "StripePruner on a DistributedDataParallel wrapper: ValueError, build the pruner on the bare "
      "model before wrapping (2-process DDP training: tests/test_ddp.py)")
def test_pruner_on_ddp_wrapper(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        model = resnet20(width=0.5)
        wrapped = nn.parallel.DistributedDataParallel(model)
        with pytest.raises(ValueError, match="build the pruner on the bare model"):
            StripePruner(wrapped, torch.randn(1, 3, 32, 32))
        assert not parametrize.is_parametrized(model.conv1)
    finally:
        dist.destroy_process_group()


def test_docs_reliability_lists_every_case():
    rows = {}
    for line in (Path(__file__).parents[1] / "docs" / "reliability.md").read_text().splitlines():
        match = re.match(r"\| `([a-z0-9-]+)` \| (.+) \|$", line)
        if match:
            rows[match.group(1)] = match.group(2).strip()
    assert rows == CASES


# ------------------------------------------------------------------ deployed models, the CLI, checkpoints (issue 21)
@case("deployed-model-trained", "a deployed model asked for gradients (requires_grad turned on, or an input that "
      "requires grad) raises RuntimeError: inference only, train before deploy()")
def test_deployed_model_refuses_to_train():
    """It used to train silently wrong: backward ran, the kernel convs got no gradient, only the Linear learned."""
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 16 * 16, 2)).eval()
    x = torch.randn(1, 3, 16, 16)
    deployed = swp_plugin.deploy(net, x, choices={"0": "kernel"})
    if not isinstance(deployed.get_submodule("0"), swp_plugin.DeployedStripeConv2d):
        pytest.skip("no compiled kernel here: the conv was deployed dense")
    deployed.requires_grad_(True)
    with pytest.raises(RuntimeError, match="inference-only .* train the model before deploy"):
        deployed(x).sum().backward()
    deployed.requires_grad_(False)
    with pytest.raises(RuntimeError, match="its input"):
        deployed(x.clone().requires_grad_(True))
    with torch.no_grad():
        deployed.requires_grad_(True)
        assert deployed(x).shape == (1, 2)  # inference still works


@case("deploy-non-tensor-input", "deploy(model, 1.0): TypeError naming the example input and what to pass")
def test_deploy_with_a_non_tensor_example():
    with pytest.raises(TypeError, match="example input 0 is a float, not a tensor"):
        swp_plugin.deploy(nn.Sequential(nn.Conv2d(3, 4, 3)).eval(), 1.0)


def _read_only(folder: Path) -> bool:
    """Make ``folder`` read-only, also for root (the immutable attribute); False where that is not possible."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return True
    return bool(shutil.which("chattr")) and subprocess.run(["chattr", "+i", str(folder)],
                                                           capture_output=True).returncode == 0


@case("prune-output-not-writable", "`swp prune --out` in a folder that cannot be written: exit 2 naming the path, "
      "before any work")
def test_prune_checks_the_output_before_the_work(tmp_path):
    folder = tmp_path / "read-only"
    folder.mkdir()
    if not _read_only(folder):
        pytest.skip("running as root without chattr +i here: cannot make a folder read-only")
    try:
        out = folder / "pruned.pt"
        result = subprocess.run([sys.executable, "-m", "swp_plugin", "prune", "resnet20", "--macs-reduction", "0.3",
                                 "--num-classes", "10", "--input-size", "3", "32", "32", "--out", str(out)],
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 2, result.stderr
        assert f"cannot write {out}" in result.stderr and "not writable" in result.stderr
        assert "building" not in result.stderr  # nothing was done
    finally:
        subprocess.run(["chattr", "-i", str(folder)], capture_output=True) if os.geteuid() == 0 else folder.chmod(
            0o755)


@case("prune-progress", "`swp prune` says what it is doing on stderr (building, MACs, pruning, writing)")
def test_prune_reports_progress(tmp_path, capsys):
    out = tmp_path / "pruned.pt"
    assert cli.main(["prune", "resnet20", "--macs-reduction", "0.3", "--num-classes", "10", "--input-size", "3", "32",
                     "32", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert all(f"swp: {word}" in err for word in ("building resnet20", "pruned; writing"))
    assert "ranking and pruning" in err and out.exists()


@case("pickled-checkpoint", "load_pruned_checkpoint (continual_prune.py --baseline / --first checkpoint:) of a "
      "pickled file: ValueError, nothing unpickled; trust_pickle=True (--trust-pickle) loads it")
def test_a_pickled_checkpoint_needs_an_explicit_flag(tmp_path):
    marker = tmp_path / "payload-ran"
    torch.save({"model": _Payload(str(marker))}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="trust_pickle=True"):
        load_pruned_checkpoint(tmp_path / "evil.pt")
    assert not marker.exists()


class _Payload:
    """Unpickling it creates a file: proof that a pickle ran."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))
