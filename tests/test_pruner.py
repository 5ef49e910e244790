"""StripePruner on the paper's nets: regularize semantics, exact step(), channel cleanup, bad input."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch_pruning as tp
from conftest import calibrate_bn, outputs_around_step, randomize_skeletons, regularized_step, rel_err

from swp_plugin import StripeConv2d, StripePruner
from swp_plugin.models import resnet20, resnet56, vgg16_bn

NETS = {"vgg16_bn": vgg16_bn, "resnet56": resnet56}


def _build(name, **kw):
    model = NETS[name](num_classes=10, in_chans=3)
    x = torch.randn(8, 3, 32, 32)
    head = model.classifier if name == "vgg16_bn" else model.fc
    return model, x, StripePruner(model, x[:2], sr=1e-4, threshold=0.05, ignored_layers=[head], **kw)


def _bn_channels(model):
    return sum(m.num_features for m in model.modules() if isinstance(m, nn.BatchNorm2d))


@pytest.mark.parametrize("name", NETS)
def test_exact_with_half_the_stripes_dead(name):
    model, x, pruner = _build(name)
    randomize_skeletons(pruner, dead_stripes=0.5)
    (y0, f0), (y1, f1) = outputs_around_step(model, pruner, x, features=True)
    assert rel_err(y0, y1) <= 1e-4 and rel_err(f0, f1) <= 1e-4
    convs = [m for m in model.modules() if isinstance(m, StripeConv2d)]
    assert len(convs) == len(pruner.skeletons)
    kept = sum(c.num_stripes for c in convs) / sum(c.out_channels * 9 for c in convs if c.kernel_size == (3, 3))
    assert 0.4 < kept < 0.6


@pytest.mark.parametrize("name", NETS)
def test_dead_filters_are_removed_and_model_stays_exact(name):
    model, x, pruner = _build(name)
    randomize_skeletons(pruner, dead_stripes=0.3, dead_filters=0.3)
    inner = [m for n, m in model.named_modules() if n.endswith("bn1") or n.startswith("features")]
    channels_before = _bn_channels(nn.ModuleList(inner))
    regularized_step(model, pruner, x)
    (y0,), (y1,) = outputs_around_step(model, pruner, x)
    assert rel_err(y0, y1) <= 1e-4
    assert _bn_channels(nn.ModuleList(inner)) < 0.85 * channels_before  # BN features really dropped
    if name == "resnet56":  # residual channels stay unless every producer of them is dead
        assert [b.conv2.out_channels for b in model.layers] == [16] * 9 + [32] * 9 + [64] * 9


def test_regularize_is_the_reference_update():
    model, x, pruner = _build("resnet56")
    fs = pruner.skeletons["layers.0.conv1"]
    with torch.no_grad():
        fs.fill_(0.5)
        fs[3] = 0.01  # filter 3: every stripe under the threshold
        fs[4, 0, 0] = -0.02
    model.train()
    nn.functional.cross_entropy(model(x), torch.arange(8) % 10).backward()
    grad_before = fs.grad.clone()
    pruner.regularize(model)
    alive = fs.abs() > 0
    expected = (grad_before + 1e-4 * torch.sign(torch.full_like(fs, 0.5))) * alive
    torch.testing.assert_close(fs.grad, expected)
    assert torch.all(fs[3] == 0) and fs[4, 0, 0] == 0 and int(alive.sum()) == fs.numel() - 10
    bn = model.layers[0].bn1
    assert bn.weight[3] == 0 and bn.bias[3] == 0 and bn.parametrizations.weight.original.grad[3] == 0
    assert bn.weight[2] != 0
    # a dead stripe stays dead even if the optimizer moves its value
    with torch.no_grad():
        fs[3] = 1.0
    assert torch.all(model.layers[0].conv1.weight[3] == 0)


def test_fed_norms_found_through_depgraph_not_module_order():
    class Shuffled(nn.Module):  # bn registered before conv, and a ReLU in between
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(4)
            self.conv = nn.Conv2d(3, 4, 3)
            self.head = nn.Conv2d(4, 2, 1)

        def forward(self, x):
            return self.head(self.bn(torch.relu(self.conv(x))))

    model = Shuffled()
    pruner = StripePruner(model, torch.randn(1, 3, 8, 8), ignored_layers=[model.head])
    assert pruner.state.mask_targets["conv"] == [("bn", "weight"), ("bn", "bias"), ("conv", "bias")]


def test_interactive_step_yields_torch_pruning_groups():
    model, x, pruner = _build("vgg16_bn")
    randomize_skeletons(pruner, dead_stripes=0.3, dead_filters=0.3)
    regularized_step(model, pruner, x)
    calibrate_bn(model, x)
    with torch.no_grad():
        y0 = model(x)
    groups = []
    for group in pruner.step(interactive=True):
        assert isinstance(group, tp.Group)
        groups.append(group)
        group.prune()
    assert groups and rel_err(y0, model(x).detach()) <= 1e-4
    assert all(isinstance(m, StripeConv2d) for m in model.features if isinstance(m, (nn.Conv2d, StripeConv2d)))


def test_detach_without_pruning_restores_plain_model():
    model, x, pruner = _build("resnet56")
    n_params = sum(p.numel() for p in model.parameters())
    pruner.detach(merge=False)
    assert not any(torch.nn.utils.parametrize.is_parametrized(m) for m in model.modules())
    assert sum(p.numel() for p in model.parameters()) == n_params - sum(f.numel() for f in pruner.skeletons.values())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"sr": -1e-5}, "sr must be finite and >= 0"),
        ({"threshold": -0.1}, "threshold must be finite and >= 0"),
        ({"sr": math.nan}, "sr must be finite"),
        ({"threshold": "0.05"}, "threshold must be a real number"),
        ({"ignored_layers": ["fc"]}, "ignored_layers must hold nn.Module"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, match):
    model = resnet56()
    with pytest.raises(ValueError, match=match):
        StripePruner(model, torch.randn(1, 3, 32, 32), **kwargs)


def test_bad_example_inputs_and_no_conv():
    with pytest.raises(ValueError, match="example_inputs do not run through the model"):
        StripePruner(resnet56(), torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match="no eligible conv"):
        StripePruner(nn.Sequential(nn.Flatten(), nn.Linear(12, 2)), torch.randn(1, 3, 2, 2))


def test_nan_skeleton_is_refused_before_touching_the_model():
    model, x, pruner = _build("resnet56")
    with torch.no_grad():
        pruner.skeletons["layers.3.conv2"][0, 1, 1] = float("nan")
    with pytest.raises(ValueError, match="layers.3.conv2"):
        pruner.step()
    assert not any(isinstance(m, StripeConv2d) for m in model.modules())


def test_call_order_errors():
    model, x, pruner = _build("resnet56")
    with pytest.raises(RuntimeError, match="after loss.backward"):
        pruner.regularize(model)
    pruner.step()
    with pytest.raises(RuntimeError, match="already merged"):
        pruner.step()
    assert pruner.stripe_sparsity() == 0.0  # still readable after step()


def test_regularize_under_autocast_with_grad_scaler():
    model, x, pruner = _build("resnet56")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    with torch.no_grad():
        pruner.skeletons["layers.0.conv1"][0] = 0.0
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = nn.functional.cross_entropy(model(x), torch.arange(8) % 10)
    optimizer.zero_grad()
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)  # documented: unscale before regularize
    pruner.regularize(model)
    scaler.step(optimizer)
    scaler.update()
    assert model.layers[0].bn1.weight[0] == 0 and torch.all(model.layers[0].conv1.weight[0] == 0)
    (y0,), (y1,) = outputs_around_step(model, pruner, x)
    assert rel_err(y0, y1) <= 1e-4


def test_without_depgraph_stripes_are_still_pruned_exactly():
    model = resnet56()
    x = torch.randn(4, 3, 32, 32)
    with pytest.warns(UserWarning, match="DependencyGraph is unavailable"):
        pruner = StripePruner(model, x[:1], ignored_layers=[model.fc], graph_timeout=1e-6)
    assert pruner.DG is None and "TimeoutError" in pruner.graph_error
    randomize_skeletons(pruner, dead_stripes=0.5, dead_filters=0.3)
    regularized_step(model, pruner, x)
    channels = _bn_channels(model)
    (y0,), (y1,) = outputs_around_step(model, pruner, x)
    assert rel_err(y0, y1) <= 1e-4
    assert _bn_channels(model) == channels  # no channel cleanup without the graph
    assert all(isinstance(b.conv1, StripeConv2d) for b in model.layers)


def test_rehearsal_keeps_the_model_untouched_when_stripes_cannot_be_reproduced(monkeypatch):
    model, x, pruner = _build("resnet56")
    randomize_skeletons(pruner, dead_stripes=0.5)
    calibrate_bn(model, x)
    monkeypatch.setattr(StripeConv2d, "forward", lambda self, inp: torch.zeros(1))  # a broken stripe layer
    with pytest.raises(RuntimeError, match="left as it was"):
        pruner.step()
    assert not any(isinstance(m, StripeConv2d) for m in model.modules())
    assert torch.nn.utils.parametrize.is_parametrized(model.conv1)  # skeletons still attached


def test_verify_false_prunes_anyway_with_a_warning(monkeypatch):
    model, x, pruner = _build("resnet56", verify=False)
    randomize_skeletons(pruner, dead_stripes=0.5)
    calibrate_bn(model, x)
    monkeypatch.setattr(StripeConv2d, "forward", lambda self, inp: torch.zeros(1))  # a broken stripe layer
    with pytest.warns(UserWarning, match="pruned anyway"):
        pruner.step()
    assert isinstance(model.conv1, StripeConv2d)


@pytest.mark.parametrize("where", ["weight", "running_var", "inputs"])
def test_nan_is_named_before_the_exactness_check(where):
    model = resnet20(width=0.25)
    x = torch.randn(2, 3, 16, 16)
    if where == "inputs":
        x[0, 0, 0, 0] = float("nan")
        with pytest.raises(ValueError, match=r"example_inputs holds NaN"):
            StripePruner(model, x, ignored_layers=[model.fc])
        return
    pruner = StripePruner(model, x, ignored_layers=[model.fc])
    with torch.no_grad():
        if where == "weight":
            model.fc.weight[0, 0] = float("inf")
        else:
            model.layers[1].bn1.running_var[2] = float("nan")
    match = "parameter 'fc.weight'" if where == "weight" else "BatchNorm statistic 'layers.1.bn1.running_var'"
    with pytest.raises(ValueError, match=match):
        pruner.step()
    assert not any(isinstance(m, StripeConv2d) for m in model.modules())


def test_tied_weights_meta_models_and_customized_conv_pruners():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = (nn.Conv2d(4, 4, 3, padding=1) for _ in range(3))
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.c(self.b(torch.relu(self.a(x))))

    x = torch.randn(2, 4, 8, 8)
    for ignored in ([], ["b"]):  # one tied conv pruned would rewrite the other's weight when merged
        tied = Tied()
        with pytest.raises(ValueError, match=r"\['a', 'b'\] share one weight tensor"):
            StripePruner(tied, x, ignored_layers=[getattr(tied, n) for n in ignored])
    tied = Tied()
    pruner = StripePruner(tied, x, ignored_layers=[tied.a, tied.b])  # the documented way out
    randomize_skeletons(pruner, dead_stripes=0.5)
    with torch.no_grad():
        y0 = tied(x)
    pruner.step()
    assert isinstance(tied.c, StripeConv2d) and tied.b.weight is tied.a.weight and rel_err(y0, tied(x)) <= 1e-4
    with torch.device("meta"):
        meta = resnet20(width=0.25)
    with pytest.raises(ValueError, match="meta device"):
        StripePruner(meta, torch.randn(1, 3, 16, 16))

    calls = []

    class CountingConvPruner(tp.function.ConvPruner):
        def prune_out_channels(self, layer, idxs):
            calls.append(len(idxs))
            return super().prune_out_channels(layer, idxs)

    model, x, pruner = _build("vgg16_bn", customized_pruners={nn.Conv2d: CountingConvPruner()})
    randomize_skeletons(pruner, dead_stripes=0.3, dead_filters=0.3)
    regularized_step(model, pruner, x)
    channels = _bn_channels(model.features)
    (y0,), (y1,) = outputs_around_step(model, pruner, x)
    assert calls and _bn_channels(model.features) < 0.85 * channels  # the user's pruner removed the dead filters
    assert rel_err(y0, y1) <= 1e-4
