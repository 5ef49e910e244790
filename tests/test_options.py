"""swp_plugin.pruning.options: every torch-pruning BasePruner option StripePruner accepts has an effect, every other
one is refused with the reason; pruning_ratio and its companions with their stripe meanings; BasePruner's methods."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch_pruning as tp
from conftest import calibrate_bn, randomize_skeletons, regularized_step, rel_err
from torch_pruning.pruner.algorithms.scheduler import linear_scheduler

from swp_plugin import StripeConv2d, StripePruner
from swp_plugin.models import resnet20
from swp_plugin.pruning.options import REFUSED


def _model():
    torch.manual_seed(0)
    return resnet20(width=0.25), torch.randn(2, 3, 16, 16)


@pytest.mark.parametrize("option", sorted(REFUSED))
def test_refused_base_pruner_options_say_why(option):
    model, x = _model()
    with pytest.raises(TypeError, match=option):
        StripePruner(model, x[:1], ignored_layers=[model.fc], **{option: 0.5})


def test_channel_importance_unknown_options_and_bad_values_are_refused():
    model, x = _model()
    with pytest.raises(TypeError, match="stripe_scores"):
        StripePruner(model, x[:1], pruning_ratio=0.3, importance=tp.importance.GroupTaylorImportance())
    with pytest.raises(TypeError, match="unknown StripePruner option"):
        StripePruner(model, x[:1], pruning_ratios=0.3)
    with pytest.raises(ValueError, match="global_pruning=False"):
        StripePruner(model, x[:1], macs_reduction=0.3, global_pruning=False)
    for option in ({"iterative_steps": 3}, {"max_pruning_ratio": 0.5}, {"round_to": 8}, {"isomorphic": True}):
        with pytest.raises(ValueError, match="act when step"):
            StripePruner(model, x[:1], **option)
    with pytest.raises(ValueError, match="iterative_pruning_ratio_scheduler"):
        StripePruner(model, x[:1], macs_reduction=0.3, iterative_steps=2,
                     iterative_pruning_ratio_scheduler=lambda r, k: [0.0, 0.9, 0.9])
    with pytest.raises(ValueError, match="iterative_steps must be an integer"):
        StripePruner(model, x[:1], pruning_ratio=0.3, iterative_steps=2.5)
    with pytest.raises(ValueError, match="graph_timeout"):
        StripePruner(model, x[:1], graph_timeout=-1)
    with pytest.raises(ValueError, match="give one of them"):
        StripePruner(model, x[:1], pruning_ratio=0.3, macs_reduction=0.3)
    with pytest.raises(ValueError, match="pruning_ratio_dict keys"):
        StripePruner(model, x[:1], pruning_ratio_dict={"conv1": 0.3})
    StripePruner(model, x[:1], pruning_ratio_dict={}, num_heads={}, prune_num_heads=False)  # defaults: no effect


def _conv_stripes(model):
    return {n: (m.num_stripes if isinstance(m, StripeConv2d) else m.out_channels * m.kernel_size[0] * m.kernel_size[1])
            for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, StripeConv2d))}


def test_pruning_ratio_is_the_fraction_of_each_layers_stripes_over_iterative_steps():
    model, x = _model()
    initial = _conv_stripes(model)
    pruner = StripePruner(model, x[:1], pruning_ratio=0.6, iterative_steps=3, ignored_layers=[model.fc])
    assert pruner.get_target_pruning_ratio(model.conv1, step=3) == pytest.approx(0.6)
    for step in range(1, 4):
        pruner.step()  # every step prunes: stripe layers after each
        kept = _conv_stripes(model)
        goal = linear_scheduler(0.6, 3)[step]
        for name, n in initial.items():
            assert kept[name] == int(n * (1 - goal)), (step, name)
        if step == 1:  # fine-tuning between steps: update_regularizer() attaches the next skeletons
            with pytest.raises(RuntimeError, match="update_regularizer"):
                pruner.regularize(model)
            pruner.update_regularizer()
            regularized_step(model, pruner, x)
    assert pruner.current_step == 3
    with pytest.raises(RuntimeError, match="already merged"):
        pruner.step()


def test_global_pruning_dict_and_cap():
    model, x = _model()
    initial = _conv_stripes(model)
    pruner = StripePruner(model, x[:1], pruning_ratio=0.5, global_pruning=True, max_pruning_ratio=0.7,
                          pruning_ratio_dict={model.conv1: 0.0}, ignored_layers=[model.fc])
    pruner.step()
    kept = _conv_stripes(model)
    assert kept["conv1"] == initial["conv1"]  # its own scope, ratio 0
    others = [n for n in initial if n != "conv1"]
    assert sum(kept[n] for n in others) == int(sum(initial[n] for n in others) * 0.5)  # one ranking
    assert all(kept[n] >= initial[n] * 0.3 - 1 for n in others)  # max_pruning_ratio per layer
    assert len({round(kept[n] / initial[n], 2) for n in others}) > 1  # global: layers differ


def test_isomorphic_ranks_each_stripe_shape_apart():
    model, x = _model()
    initial = _conv_stripes(model)
    modules = dict(model.named_modules())
    pruner = StripePruner(model, x[:1], pruning_ratio=0.5, isomorphic=True, ignored_layers=[model.fc])
    shapes = {}
    for n in initial:
        m = modules[n]
        shapes.setdefault((m.in_channels, m.kernel_size), []).append(n)
    pruner.step()
    kept = _conv_stripes(model)
    for names in shapes.values():
        assert sum(kept[n] for n in names) == int(sum(initial[n] for n in names) * 0.5)


def test_importance_protocol_decides_which_stripes_die():
    class CenterFirst:
        def stripe_scores(self, layer, skeleton, weight):
            score = torch.full(skeleton.shape, 0.1)
            if skeleton.dim() == 3 and skeleton.shape[1] == 3:
                score[:, 1, 1] = 1.0
            return score

    model, x = _model()
    pruner = StripePruner(model, x[:1], pruning_ratio=8 / 9, importance=CenterFirst(), ignored_layers=[model.fc])
    pruner.step()
    for m in model.modules():
        if isinstance(m, StripeConv2d) and m.kernel_size == (3, 3):
            assert torch.all(m.stripe_pos == 4) and m.num_stripes == m.out_channels


def test_root_module_types_customized_pruners_and_other_methods():
    model, x = _model()
    pruner = StripePruner(model, x[:1], ignored_layers=[model.fc], root_module_types=[nn.Linear])
    randomize_skeletons(pruner, dead_stripes=0.3, dead_filters=0.4)
    regularized_step(model, pruner, x)
    calibrate_bn(model, x)
    channels = sum(m.num_features for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    pruner.step()
    assert sum(m.num_features for m in model.modules() if isinstance(m, nn.BatchNorm2d)) == channels  # no conv root

    model, x = _model()
    pruner = StripePruner(model, x[:1], ignored_layers=[model.fc])
    group = pruner.DG.get_pruning_group(model.conv1, tp.prune_conv_out_channels, [0, 1, 2])
    scores = pruner.estimate_importance(group)
    assert scores.shape == (3,) and torch.all(scores > 0)
    with pytest.raises(NotImplementedError, match="out channels"):
        pruner.manual_prune_width(model.layers[0].conv1, tp.prune_conv_in_channels, [0])
    out = model.layers[0].conv1.out_channels
    pruner.manual_prune_width(model.layers[0].conv1, tp.prune_conv_out_channels, [0, 1])
    assert torch.all(model.layers[0].conv1.weight[:2] == 0)  # killed now (the function changes, as asked)
    pruner.reset()
    assert pruner.current_step == 0
    calibrate_bn(model, x)
    pruner.step()
    assert model.layers[0].conv1.out_channels == out - 2  # removed with their channels by step()


def test_scheduler_sets_each_iterative_step_goal():
    model, x = _model()
    front_loaded = lambda ratio, steps: [0.0] + [ratio] * steps  # noqa: E731
    pruner = StripePruner(model, x[:1], macs_reduction=0.4, iterative_steps=3, global_pruning=True,
                          iterative_pruning_ratio_scheduler=front_loaded, ignored_layers=[model.fc])
    pruner.step()
    assert pruner.target_history[0][0] == pytest.approx(0.4)
    assert abs(pruner.target_history[0][1] - 0.4) <= 0.03


def test_forward_fn_and_output_transform_are_used():
    """A model called with a dict and returning a tuple: forward_fn runs it (tracing, checks), output_transform
    picks the traced output."""

    class DictNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = resnet20(width=0.25)

        def forward(self, image, scale):
            logits = self.net(image * scale)
            return logits, logits.softmax(1)

    torch.manual_seed(0)
    model = DictNet()
    inputs = {"image": torch.randn(2, 3, 16, 16), "scale": 2.0}
    calls = []

    def forward_fn(m, x):
        calls.append(1)
        return m(x["image"], x["scale"])

    pruner = StripePruner(model, inputs, forward_fn=forward_fn, output_transform=lambda out: out[0],
                          ignored_layers=[model.net.fc])
    assert calls and pruner.DG is not None
    randomize_skeletons(pruner, dead_stripes=0.5, dead_filters=0.3)
    calibrate_bn(model.net, inputs["image"] * 2)
    model.eval()
    with torch.no_grad():
        before = model(inputs["image"], 2.0)[0]
    pruner.step()
    with torch.no_grad():
        assert rel_err(before, model(inputs["image"], 2.0)[0]) < 1e-4
