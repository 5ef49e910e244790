"""swp_plugin.recipes.baselines (shape-wise pruning, stripe group lasso, MACs-matched channel pruners) and the
granularity benchmark end to end on a tiny budget."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from swp_plugin import StripeConv2d, StripePruner, count_ops_and_params
from swp_plugin.models import resnet20, vgg16_bn
from swp_plugin.recipes.baselines import (
    ShapeWisePruner,
    StripeGroupLasso,
    l1_filter_pruner,
    prune_channels_to_macs,
    slimming_pruner,
)

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "granularity.py"


def _train_steps(model, x, after_backward, steps=3, lr=0.1):
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    model.train()
    for _ in range(steps):
        loss = F.cross_entropy(model(x), torch.arange(x.shape[0]) % 10)
        optimizer.zero_grad()
        loss.backward()
        after_backward()
        optimizer.step()


@pytest.mark.parametrize("ctor", [resnet20, vgg16_bn])
def test_shape_wise_keeps_the_same_positions_in_every_filter(ctor):
    model = ctor(in_chans=1, width=0.25)
    x = torch.randn(8, 1, 28, 28)
    dense = count_ops_and_params(model, x[:1])[0]
    pruner = ShapeWisePruner(model, x[:1], sr=1e-3, macs_reduction=0.5, ignored_layers=[model.get_classifier()])
    assert all(fs.shape[1:] == (3, 3) for fs in pruner.skeletons.values())  # 1x1 shortcuts stay dense
    _train_steps(model, x, lambda: pruner.regularize(model))
    for fs in pruner.skeletons.values():  # tied across filters: one shared skeleton per layer
        assert torch.equal(fs, fs[:1].expand_as(fs))
    pruner.step()  # kills the weakest kernel positions (not exact: they were alive), then prunes exactly
    assert abs(1 - count_ops_and_params(model, x[:1])[0] / dense - 0.5) <= 0.03
    layers = [m for m in model.modules() if isinstance(m, StripeConv2d) and m.kernel_size == (3, 3)]
    assert layers
    for layer in layers:
        mask = layer.stripe_mask()
        assert torch.equal(mask, mask[:1].expand_as(mask))


def test_shape_wise_threshold_kills_whole_positions():
    model = vgg16_bn(in_chans=1, width=0.125)
    x = torch.randn(4, 1, 28, 28)
    pruner = ShapeWisePruner(model, x[:1], sr=0.0, threshold=0.05, ignored_layers=[model.classifier])
    fs = next(iter(pruner.skeletons.values()))
    with torch.no_grad():
        fs[:, 0, 0] = 0.01  # one position under the threshold in every filter
    model.train()
    F.cross_entropy(model(x), torch.arange(4)).backward()
    pruner.regularize(model)
    alive = pruner.skeleton(next(iter(pruner.skeletons))).alive
    assert not alive[:, 0, 0].any() and alive[:, 1:, :].all()


def test_stripe_group_lasso_gradient_and_magnitude_pruning():
    model = resnet20(in_chans=1, width=0.25)
    x = torch.randn(4, 1, 16, 16)
    lasso = StripeGroupLasso(model, 0.1, ignored_layers=[model.fc])
    assert len(lasso.layers) == 21  # every conv, shortcuts included
    conv = lasso.layers[0][1]
    with torch.no_grad():
        conv.weight[0, :, 0, 0] = 0  # a zero stripe gets no gradient from the penalty
    weight = conv.weight.detach().clone().requires_grad_(True)
    (0.1 * weight.norm(dim=1).sum()).backward()
    conv.weight.grad = torch.zeros_like(conv.weight)
    lasso.regularize()
    expected = torch.nan_to_num(weight.grad)
    assert torch.allclose(conv.weight.grad, expected, atol=1e-6) and conv.weight.grad[0, :, 0, 0].eq(0).all()
    assert lasso.penalty() > 0 and lasso.mean_stripe_norm() > 0
    # pruning afterwards: untrained skeletons (FS = 1) rank the stripes by weight norm
    pruner = StripePruner(model, x[:1], macs_reduction=0.4, ignored_layers=[model.fc])
    norms = conv.weight.detach().norm(dim=1)
    pruner.step()
    kept = dict(model.named_modules())[lasso.layers[0][0]].stripe_mask()
    if (~kept).any() and kept.any():
        assert norms[~kept].max() <= norms[kept].max()


@pytest.mark.parametrize("kind", ["l1", "slimming"])
def test_channel_pruners_hit_a_macs_target(kind):
    torch.manual_seed(0)
    model = vgg16_bn(in_chans=1, width=0.5)
    with torch.no_grad():  # trained-looking BatchNorm scales (equal scales tie in slimming's global ranking)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.05, 1.0)
    x = torch.randn(2, 1, 28, 28)
    dense = count_ops_and_params(model, x[:1])[0]
    if kind == "l1":
        def make(m, r):
            return l1_filter_pruner(m, x[:1], r, [m.classifier])
    else:
        def make(m, r):
            return slimming_pruner(m, x[:1], r, ignored_layers=[m.classifier])
    ratio, reached = prune_channels_to_macs(model, x[:1], make, 0.5)
    assert 0 < ratio < 0.95 and abs(reached - 0.5) <= 0.03
    assert abs(1 - count_ops_and_params(model, x[:1])[0] / dense - reached) < 1e-9
    assert model(x).shape == (2, 10)


def _bench():
    spec = importlib.util.spec_from_file_location("granularity", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_method_specs_and_paired_verdicts():
    _bench()  # puts benchmarks/ on sys.path
    from granularity_methods import parse_spec, points_of
    from granularity_report import compare, interpolate

    spec = parse_spec("swp:push=8:gradual=4")
    assert spec.base == "swp" and spec.options == {"push": 8.0, "gradual": 4} and parse_spec(spec.name) == spec
    args = type("Args", (), {"targets": [0.3, 0.7], "paper_pushes": [0.95]})()
    assert points_of(args, parse_spec("swp:at=0.7")) == [0.7] and points_of(args, parse_spec("swp")) == [0.3, 0.7]
    assert points_of(args, parse_spec("swp_paper")) == [0.95]
    for bad in ("swq", "l1_filter:push=2", "swp:push", "swp:score=bn", "shape:gradual=2"):
        with pytest.raises(ValueError):
            parse_spec(bad)
    assert compare({0: 80.0, 1: 81.0, 2: 82.0}, {0: 79.0, 1: 80.1, 2: 80.9})[0] == "beats"
    assert compare({0: 80.0, 1: 81.0, 2: 82.0}, {0: 81.0, 1: 80.0, 2: 82.5})[0] == "ties"
    assert compare({0: 70.0, 1: 71.0}, {0: 71.0, 1: 73.0})[0] == "ties"  # 2 seeds: t = 3, under 12.7
    assert compare({0: 70.0, 1: 71.0}, {0: 71.0, 1: 72.1})[0] == "loses to"  # t = 21
    assert compare({0: 70.0}, {0: 71.0})[0] == "single seed"
    rows = [{"macs_reduction": 0.3, "accuracy": 88.0}, {"macs_reduction": 0.7, "accuracy": 84.0}]
    assert interpolate(rows, 0.5) == pytest.approx(86.0) and interpolate(rows, 0.8) is None


@pytest.mark.needs_data
def test_granularity_benchmark_tiny(tmp_path):
    bench = _bench()
    doc = tmp_path / "results.md"
    doc.write_text("# Results\n\n## Another section\n\nkept\n")
    out = tmp_path / "granularity_quick.json"
    argv = ["--quick", "--subset", "256", "--test-subset", "256", "--width", "0.25", "--epochs-baseline", "1",
            "--epochs-sparse", "1", "--epochs-finetune", "1", "--targets", "0.3,0.6", "--seeds", "0,1", "--threads",
            "1", "--no-progress", "--methods", "swp,swp:gradual=2:score=fs,swp_paper,shape,group_lasso,l1_filter,"
            "slimming", "--paper-pushes", "0.95", "--json", str(out), "--doc", str(doc)]
    result = bench.main(argv)
    written = json.loads(out.read_text())
    assert written["results"] == json.loads(json.dumps(result["results"]))
    rows = written["results"]
    methods = {"baseline", "swp", "swp:gradual=2:score=fs", "swp_paper", "shape", "group_lasso", "l1_filter",
               "slimming"}
    assert {r["method"] for r in rows} == methods and {r["seed"] for r in rows} == {0, 1}
    assert len(rows) == 2 * (1 + 6 * 2 + 1)
    base = rows[0]
    for r in rows:
        assert {"method", "seed", "net", "macs", "params", "accuracy", "model"} <= set(r) and r["net"] == "resnet20"
        assert 0 <= r["accuracy"] <= 100 and r["params"] > 0
        assert (tmp_path / "granularity_quick_models" / r["model"]).exists()
        if r["method"] not in ("baseline", "swp_paper"):
            assert abs(r["macs_reduction"] - r["target"]) <= 0.05 and r["macs"] < base["macs"]
    text = doc.read_text()
    assert "## Another section\n\nkept" in text and text.count(bench.report.SECTION_TITLE) == 1
    assert "vs L1 filter: SWP" in text and "| -60% |" in text and "SWP paper (threshold), 0.95" in text
    assert (tmp_path / "granularity_quick.png").stat().st_size > 0
    models = tmp_path / "granularity_quick_models"
    stamps = {p.name: p.stat().st_mtime_ns for p in models.glob("*.pt")}
    again = bench.main(argv + ["--resume"])  # every point is there: nothing is trained again, no row doubles
    assert {p.name: p.stat().st_mtime_ns for p in models.glob("*.pt")} == stamps
    assert json.loads(json.dumps(again["results"])) == rows
    # latency of every saved model, side by side, then the doc again (a rerun replaces the section)
    bench.main(argv + ["--latency-only", "--latency-repeats", "2"])
    timed = json.loads(out.read_text())
    main = [r for r in timed["results"] if r["method"] != "swp:gradual=2:score=fs"]  # variants are not timed
    assert all(r["latency_b1_ms"] > 0 and r["latency_b64_ms"] > 0 for r in main)
    again = doc.read_text()
    assert again.count("<!-- granularity:begin -->") == 1 and "kept" in again and "speed-up b1 / b64" in again
