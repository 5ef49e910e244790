"""Target-driven pruning (macs_reduction / params_reduction), gradual schedule, report, pictures, CLI."""

from __future__ import annotations

import pytest
import timm
import torch
from conftest import regularized_step

import swp_plugin
from swp_plugin import StripeConv2d, StripePruner, count_ops_and_params
from swp_plugin.cli import main as cli
from swp_plugin.models import resnet20, resnet56, vgg16_bn
from swp_plugin.pruning.target import batchnorm_gains


def _net(name, width=1.0):
    torch.manual_seed(0)
    if name == "resnet18":
        return timm.create_model("resnet18", num_classes=10), torch.randn(2, 3, 64, 64)
    return {"vgg16_bn": vgg16_bn, "resnet56": resnet56}[name](width=width), torch.randn(2, 3, 32, 32)


def _reached(name, metric, target, width=1.0):
    model, x = _net(name, width)
    before = count_ops_and_params(model, x[:1])
    pruner = StripePruner(model, x[:1], ignored_layers=[model.get_classifier()], **{f"{metric}_reduction": target})
    pruner.step()
    after = count_ops_and_params(model, x[:1])
    index = 0 if metric == "macs" else 1
    return 1 - after[index] / before[index]


@pytest.mark.parametrize("name, metric, target", [("vgg16_bn", "macs", 0.5), ("resnet56", "params", 0.4)])
def test_target_is_reached_within_0_03(name, metric, target):
    assert abs(_reached(name, metric, target, width=0.5) - target) <= 0.03


@pytest.mark.slow
@pytest.mark.parametrize("target", [0.4, 0.5, 0.6])
@pytest.mark.parametrize("name", ["vgg16_bn", "resnet56", "resnet18"])
def test_macs_targets_full_grid(name, target):
    assert abs(_reached(name, "macs", target) - target) <= 0.03


def test_iterative_schedule_reaches_target_over_k_steps():
    model = resnet20(width=0.5)
    x = torch.randn(4, 3, 32, 32)
    dense = count_ops_and_params(model, x[:1])[0]
    pruner = StripePruner(model, x[:1], sr=1e-4, macs_reduction=0.5, iterative_steps=3, ignored_layers=[model.fc])
    for _ in range(3):
        regularized_step(model, pruner, x)  # training goes on between steps; killed stripes stay dead
        pruner.step()
    assert [round(goal, 3) for goal, _ in pruner.target_history] == [0.167, 0.333, 0.5]
    assert all(abs(goal - reached) <= 0.03 for goal, reached in pruner.target_history)
    assert any(isinstance(m, StripeConv2d) for m in model.modules())
    assert abs(1 - count_ops_and_params(model, x[:1])[0] / dense - 0.5) <= 0.03


def test_max_pruning_ratio_caps_every_layer():
    model = resnet20(width=0.5)
    x = torch.randn(1, 3, 32, 32)
    pruner = StripePruner(model, x, macs_reduction=0.3, max_pruning_ratio=0.4, ignored_layers=[model.fc])
    pruner.step()
    for m in model.modules():
        if isinstance(m, StripeConv2d) and m.kernel_size == (3, 3):
            assert m.num_stripes >= 0.6 * m.out_channels * 9 - 1


@pytest.mark.parametrize("score", ["fs", "fs_bn"])
def test_fs_bn_score_kills_filters_the_batchnorm_scales_down_first(score):
    torch.manual_seed(0)
    model = resnet20(width=0.5)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        model.layers[0].bn1.weight[:4] = 1e-3  # half of the block's internal channels nearly switched off
    pruner = StripePruner(model, x, macs_reduction=0.3, score=score, ignored_layers=[model.fc])
    pruner.step()
    kept = model.layers[0].conv1.out_channels
    assert kept <= 4 if score == "fs_bn" else kept == 8  # 'fs' ignores the BatchNorm, 'fs_bn' removes them


def test_batchnorm_gains_shapes():
    conv, bn = torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.0, -2.0, 0.0, 0.5]))
        bn.running_var.fill_(4.0 - bn.eps)
    gain = batchnorm_gains([conv], [bn])[0]
    assert gain.shape == (4, 1, 1) and torch.allclose(gain.flatten(), torch.tensor([0.5, 1.0, 0.0, 0.25]))
    stripe = StripeConv2d.from_dense(conv, torch.tensor([[[1, 0, 0]] * 3, [[0, 1, 0]] * 3, [[0] * 3] * 3,
                                                         [[1, 1, 1]] * 3], dtype=torch.bool))
    per_stripe = batchnorm_gains([stripe], [bn])[0]
    assert torch.equal(per_stripe, gain.flatten()[stripe.stripe_out])
    assert batchnorm_gains([conv], [None]) == [None]
    with pytest.raises(ValueError, match="score must be one of"):
        StripePruner(resnet20(width=0.25), torch.randn(1, 3, 32, 32), macs_reduction=0.5, score="bn")


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"macs_reduction": 0.5, "threshold": 0.05}, "mutually exclusive"),
        ({"macs_reduction": 0.5, "params_reduction": 0.5}, "one target"),
        ({"macs_reduction": 1.5}, r"must be in \(0"),
        ({"params_reduction": -0.1}, "must be finite and >= 0"),
        ({"macs_reduction": 0.5, "max_pruning_ratio": 0.0}, "max_pruning_ratio must be in"),
    ],
)
def test_bad_targets(kwargs, error):
    model = resnet20(width=0.5)
    with pytest.raises(ValueError, match=error):
        StripePruner(model, torch.randn(1, 3, 32, 32), **kwargs)


def test_unreachable_target_is_a_clear_error_and_model_untouched():
    model = resnet20(width=0.5)
    pruner = StripePruner(model, torch.randn(1, 3, 32, 32), macs_reduction=0.9, max_pruning_ratio=0.2,
                          ignored_layers=[model.fc])
    with pytest.raises(ValueError, match="unreachable"):
        pruner.step()
    assert not any(isinstance(m, StripeConv2d) for m in model.modules())


def test_report_and_pictures(tmp_path):
    model, x = _net("vgg16_bn", width=0.25)
    baseline = vgg16_bn(width=0.25)
    pruner = StripePruner(model, x[:1], macs_reduction=0.5, ignored_layers=[model.classifier])
    pruner.step()
    rows = swp_plugin.report(model, x[:1], baseline=baseline, show=False)
    total = rows[-1]
    assert total["layer"] == "total" and len(rows) == 14
    assert abs(total["macs"] / total["macs_before"] - 0.5) < 0.05
    assert rows[1]["kind"].startswith("Strip(") and rows[1]["backend"] in ("auto(dense)", "auto(cpp)", "auto(stripe)")
    swp_plugin.measure.plot_stripe_ratios(model, tmp_path / "ratios.png")
    swp_plugin.measure.plot_filter_shapes(model, tmp_path / "shapes.png")
    assert (tmp_path / "ratios.png").stat().st_size > 10_000 and (tmp_path / "shapes.png").stat().st_size > 10_000


def test_cli_prune_and_report_round_trip(tmp_path, capsys):
    out = tmp_path / "r20.pt"
    assert cli(["prune", "resnet20", "--macs-reduction", "0.5", "--input-size", "3", "32", "32",
                "--num-classes", "10", "--out", str(out)]) == 0
    assert "50" in capsys.readouterr().out
    assert cli(["report", str(out), "--plot", str(tmp_path / "r20.png")]) == 0
    text = capsys.readouterr().out
    assert "Strip(" in text and "total" in text
    assert (tmp_path / "r20.png").exists() and (tmp_path / "r20_shapes.png").exists()


def test_cli_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli(["prune", "no_such_net", "--macs-reduction", "0.5", "--out", str(tmp_path / "x.pt")])
    assert exit_info.value.code == 2 and "unknown model 'no_such_net'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli(["report", str(tmp_path / "missing.pt")])
    assert "No such file" in capsys.readouterr().err
