"""A stripe-pruned model inside torch-pruning: backward, DepGraph, BNScalePruner, a second StripePruner,
StripeImportance driving torch-pruning's own pruner."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.fx
import torch.nn as nn
import torch_pruning as tp
from conftest import outputs_around_step, randomize_skeletons, regularized_step, rel_err

import swp_plugin
from swp_plugin import StripeConv2d, StripeImportance, StripePruner
from swp_plugin.models import resnet20, vgg16_bn


def _stripe_pruned(ctor=resnet20):
    model = ctor(num_classes=10, in_chans=3, width=0.5)
    x = torch.randn(4, 3, 32, 32)
    head = getattr(model, "fc", None) or model.classifier
    pruner = StripePruner(model, x[:1], ignored_layers=[head])
    randomize_skeletons(pruner, dead_stripes=0.5, dead_filters=0.2)
    regularized_step(model, pruner, x)
    pruner.step()
    return model, x, head


def test_backward_and_finetune_step():
    model, x, _ = _stripe_pruned()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)  # rebuilt after step(), as documented
    model.train()
    loss = nn.functional.cross_entropy(model(x), torch.arange(4))
    loss.backward()
    stripe = next(m for m in model.modules() if isinstance(m, StripeConv2d))
    assert stripe.weight.grad is not None and stripe.weight.grad.abs().sum() > 0
    before = stripe.weight.detach().clone()
    optimizer.step()
    assert not torch.equal(before, stripe.weight)


def test_depgraph_traces_stripe_convs_and_bn_scale_pruner_steps():
    model, x, head = _stripe_pruned()
    DG = tp.DependencyGraph().build_dependency(model, x[:1], customized_pruners=swp_plugin.customized_pruners())
    stripe = model.layers[0].conv1
    assert isinstance(stripe, StripeConv2d) and stripe in DG.module2node
    group = DG.get_pruning_group(stripe, DG.get_pruner_of_module(stripe).prune_out_channels, [0])
    assert any(dep.target.module is model.layers[0].conv2 for dep, _ in group)

    pruner = tp.pruner.BNScalePruner(
        model, x[:1], importance=tp.importance.BNScaleImportance(), pruning_ratio=0.3,
        ignored_layers=[head], **swp_plugin.torch_pruning_kwargs(),
    )
    model.train()
    nn.functional.cross_entropy(model(x), torch.arange(4)).backward()
    pruner.regularize(model)
    channels = sum(m.num_features for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    pruner.step()
    assert sum(m.num_features for m in model.modules() if isinstance(m, nn.BatchNorm2d)) < channels
    model.eval()
    assert model(x).shape == (4, 10)


def test_second_stripe_pruner_on_a_stripe_pruned_model_is_exact():
    model, x, head = _stripe_pruned(vgg16_bn)
    stripes_before = sum(m.num_stripes for m in model.modules() if isinstance(m, StripeConv2d))
    pruner = StripePruner(model, x[:1], ignored_layers=[head])
    assert all(fs.dim() == 1 for fs in pruner.skeletons.values())  # one value per kept stripe
    randomize_skeletons(pruner, dead_stripes=0.3, dead_filters=0.1, seed=1)
    regularized_step(model, pruner, x)
    (y0,), (y1,) = outputs_around_step(model, pruner, x)
    assert rel_err(y0, y1) <= 1e-4
    assert sum(m.num_stripes for m in model.modules() if isinstance(m, StripeConv2d)) < 0.8 * stripes_before


def test_stripe_importance_drives_torch_pruning_pruner():
    model = resnet20(num_classes=10, width=0.5)
    x = torch.randn(2, 3, 32, 32)
    pruner = StripePruner(model, x[:1], ignored_layers=[model.fc])
    with torch.no_grad():
        for _name, fs in pruner.skeletons.items():
            fs.copy_(torch.linspace(0.1, 1.0, fs.shape[0]).view(-1, 1, 1).expand_as(fs))
    importance = StripeImportance(pruner.skeletons)
    conv = model.layers[0].conv1
    DG = tp.DependencyGraph().build_dependency(model, x[:1])
    group = DG.get_pruning_group(conv, tp.prune_conv_out_channels, list(range(conv.out_channels)))
    scores = importance(group)
    assert torch.all(scores[1:] > scores[:-1])  # follows |FS| of the filters

    pruner.detach(merge=True)  # skeletons merged; the importance keeps their values
    tp_pruner = tp.pruner.BasePruner(model, x[:1], importance=importance, pruning_ratio=0.25,
                                     ignored_layers=[model.fc])
    tp_pruner.step()
    assert model.layers[0].conv1.out_channels == conv.out_channels  # same module, pruned in place
    assert conv.out_channels == 8 - 2


# ---------------------------------------------------------------------- serialization, copies, scripting, tracing
def test_tp_state_dict_round_trip_also_in_a_new_process(tmp_path):
    import subprocess
    import sys

    model, x, _ = _stripe_pruned()
    model.eval()
    fresh = resnet20(num_classes=10, in_chans=3, width=0.5)
    tp.load_state_dict(fresh, state_dict=tp.state_dict(model))
    assert rel_err(fresh.eval()(x), model(x)) == 0
    torch.save({"sd": tp.state_dict(model), "x": x, "y": model(x).detach()}, tmp_path / "tp.pt")
    code = ("import sys, torch, torch_pruning as tp; from swp_plugin.models import resnet20; "
            "o = torch.load(sys.argv[1], weights_only=False); m = resnet20(num_classes=10, in_chans=3, width=0.5); "
            "tp.load_state_dict(m, state_dict=o['sd']); m.eval(); "
            "print(float((m(o['x']) - o['y']).abs().max() / o['y'].abs().max()))")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "tp.pt")], capture_output=True, text=True,
                         check=True)
    assert float(out.stdout.strip().splitlines()[-1]) <= 1e-5


def test_tp_state_dict_of_deployed_layers_and_a_wrong_stripe_count_is_refused():
    from swp_plugin.layers.deployed import DeployedStripeConv2d

    layer = StripeConv2d.from_dense(nn.Conv2d(4, 6, 3, padding=1), torch.rand(6, 3, 3) > 0.4)
    deployed = nn.Sequential(DeployedStripeConv2d.from_stripe(layer), nn.ReLU())
    fresh = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.ReLU())
    tp.load_state_dict(fresh, state_dict=tp.state_dict(deployed))
    x = torch.randn(2, 4, 7, 7)
    assert torch.equal(fresh(x), deployed(x))
    with pytest.raises(ValueError, match="num_stripes is the number of rows of weight"):
        layer.num_stripes = layer.num_stripes + 1


def test_deep_copy_with_skeletons_attached_is_independent():
    model = resnet20(num_classes=10, width=0.5)
    x = torch.randn(4, 3, 32, 32)
    pruner = StripePruner(model, x[:1], ignored_layers=[model.fc])
    randomize_skeletons(pruner, dead_stripes=0.5, dead_filters=0.2)
    twin, other = copy.deepcopy(model), copy.deepcopy(model)
    assert type(twin.layers[0].conv1) is not type(model.layers[0].conv1)  # a parametrized class of its own
    swp_plugin.detach_skeletons(other, merge=True)  # on a copy first: the original keeps its skeletons
    regularized_step(model, pruner, x)
    pruner.step()
    twin.eval()
    assert twin(x).shape == (4, 10) and swp_plugin.detach_skeletons(twin) > 0
    assert other.eval()(x).shape == (4, 10)


def test_model_ema_v3_is_carried_through_step():
    from timm.utils import ModelEmaV3

    from swp_plugin.interop import step_with_ema

    model = resnet20(num_classes=10, width=0.5)
    x = torch.randn(4, 3, 32, 32)
    early = ModelEmaV3(model)  # before the pruner: no skeletons, refused before anything changes
    pruner = StripePruner(model, x[:1], ignored_layers=[model.fc])
    ema = ModelEmaV3(model, decay=0.9)
    randomize_skeletons(pruner, dead_stripes=0.5, dead_filters=0.2)
    regularized_step(model, pruner, x)
    ema.update(model)
    with pytest.raises(ValueError, match="after StripePruner"):
        step_with_ema(pruner, early)
    assert not any(isinstance(m, StripeConv2d) for m in model.modules())  # the model untouched by the refusal
    step_with_ema(pruner, ema)
    stripes = [(n, m.stripe_mask()) for n, m in model.named_modules() if isinstance(m, StripeConv2d)]
    assert stripes and all(torch.equal(ema.module.get_submodule(n).stripe_mask(), s) for n, s in stripes)
    before = [t.clone() for t in ema.module.state_dict().values()]
    ema.update(model)  # keeps averaging: its own weights move a tenth of the way towards the model's
    for b, a, m in zip(before, ema.module.state_dict().values(), model.state_dict().values(), strict=True):
        assert torch.allclose(a, torch.lerp(b, m, 0.1) if b.is_floating_point() else m, atol=1e-6)
    assert not torch.equal(ema.module.layers[0].conv1.weight, model.layers[0].conv1.weight)
    assert ema.module.eval()(x).shape == (4, 10)


def test_pruned_model_scripts_and_traces_with_plain_fx():
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import prepare_fx

    model, x, _ = _stripe_pruned()
    model.eval()
    y = model(x)
    assert rel_err(torch.jit.script(model)(x), y) <= 1e-5
    traced = torch.fx.symbolic_trace(model)
    assert rel_err(traced(x), y) <= 1e-5
    prepared = prepare_fx(copy.deepcopy(model), get_default_qconfig_mapping(), (x[:1],))  # torch.ao FX quantization
    assert rel_err(prepared(x), y) <= 1e-5
