"""A stripe-pruned model inside torch-pruning: backward, DepGraph, BNScalePruner, a second StripePruner,
StripeImportance driving torch-pruning's own pruner."""

from __future__ import annotations

import torch
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
