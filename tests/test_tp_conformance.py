"""torch-pruning 1.6.1's own call patterns, replayed with ``StripePruner`` where its pruners stood: the README
quickstart, the interactive loop (``group.prune()``, ``group.prune(idxs=...)``, soft pruning, an interrupted loop),
the pruning history saved and loaded on a fresh model, and the benchmark driver's flow (sparse training with
``regularize``, then progressive ``step()`` until a speed-up). Figures come from ``swp_plugin.count_ops_and_params``.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch_pruning as tp
from conftest import calibrate_bn, randomize_skeletons, rel_err
from torchvision.models import resnet18

from swp_plugin import StripeConv2d, StripeImportance, StripePruner, count_ops_and_params
from swp_plugin.models import resnet20, vgg16_bn


def _classifier_ignored(model: nn.Module, num_classes: int):
    """The README's "DO NOT prune the final classifier!" loop."""
    return [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == num_classes]


def _stripes(model: nn.Module):
    return {n: m.num_stripes for n, m in model.named_modules() if isinstance(m, StripeConv2d)}


def test_readme_quickstart_with_only_the_pruner_line_changed():
    model = resnet18(num_classes=10)
    example_inputs = torch.randn(1, 3, 64, 64)
    imp = tp.importance.GroupMagnitudeImportance(p=2)  # torch-pruning's own: read on stripes (StripeMagnitude)
    ignored_layers = _classifier_ignored(model, 10)
    convs = {n: m.out_channels * m.kernel_size[0] * m.kernel_size[1] for n, m in model.named_modules()
             if isinstance(m, nn.Conv2d)}
    pruner = StripePruner(model, example_inputs, importance=imp, pruning_ratio=0.5,  # was tp.pruner.BasePruner
                          ignored_layers=ignored_layers, round_to=8)
    base_macs, base_nparams = tp.utils.count_ops_and_params(model, example_inputs)  # torch-pruning's own counter
    pruner.step()
    macs, nparams = tp.utils.count_ops_and_params(model, example_inputs)
    assert (macs, nparams) == count_ops_and_params(model, example_inputs, include_indexes=False)  # sees stripes
    kept = _stripes(model)
    assert set(kept) == set(convs)  # every conv is now a stripe conv
    for name, stripes in kept.items():  # pruning_ratio: each layer lost half of its stripes, kept a multiple of 8
        assert stripes % 8 == 0 and abs(stripes - convs[name] / 2) <= 8, (name, stripes, convs[name])
    assert 0.4 < macs / base_macs < 0.6 and nparams < 0.6 * base_nparams
    assert model(example_inputs).shape == (1, 10)


def _vgg_with_dead_filters():
    torch.manual_seed(0)
    model = vgg16_bn(num_classes=10, width=0.125)
    x = torch.randn(4, 3, 32, 32)
    pruner = StripePruner(model, x[:2], ignored_layers=[model.classifier])
    randomize_skeletons(pruner, dead_stripes=0.3, dead_filters=0.3)
    model.train()
    F.cross_entropy(model(x), torch.arange(4)).backward()
    pruner.regularize(model)  # kills the zeroed stripes, masks the dead filters' BatchNorm channels
    calibrate_bn(model, x)
    with torch.no_grad():
        before = model(x)
    return model, x, pruner, before


def _channels(model):
    return [m.num_features for m in model.modules() if isinstance(m, nn.BatchNorm2d)]


def test_interactive_loop_prunes_the_yielded_groups_exactly():
    model, x, pruner, before = _vgg_with_dead_filters()
    channels = _channels(model)
    seen = 0
    for group in pruner.step(interactive=True):  # the README's interactive loop
        dep, idxs = group[0]
        assert dep.target.module is not None and idxs
        group.prune()
        seen += 1
    assert seen and sum(_channels(model)) < sum(channels)
    assert rel_err(before, model(x).detach()) <= 1e-4


def test_interactive_prune_with_own_indexes_does_what_was_asked():
    model, x, pruner, before = _vgg_with_dead_filters()
    first = True
    for group in pruner.step(interactive=True):
        if first:
            root = group[0].dep.target.module
            out = root.out_channels
            with pytest.raises(ValueError, match="distinct channel indexes"):
                group.prune(idxs=[0, 0, out + 5])  # refused, nothing pruned
            assert root.out_channels == out
            group.prune(idxs=[0, 2, 6])  # the user's channels, live or not
            assert root.out_channels == out - 3
            first = False
        else:
            group.prune()
    after = model(x).detach()
    assert after.shape == before.shape and rel_err(before, after) > 1e-3  # live channels went: a new function
    assert any(isinstance(m, StripeConv2d) for m in model.modules())


def test_interrupted_interactive_loop_is_finished_by_the_next_step():
    model, x, pruner, before = _vgg_with_dead_filters()
    with pytest.warns(UserWarning, match="Call pruner.step"):
        for group in pruner.step(interactive=True):
            group.prune()
            break
    with pytest.raises(RuntimeError, match="still open"):
        pruner.regularize(model)
    pruner.step()  # prunes the groups left, converts, checks
    assert all(isinstance(m, StripeConv2d) for m in model.features if isinstance(m, (nn.Conv2d, StripeConv2d)))
    assert rel_err(before, model(x).detach()) <= 1e-4
    with pytest.raises(RuntimeError, match="already merged"):
        pruner.step()


def test_soft_pruning_loop_keeps_channels_and_function():
    """torch-pruning's tests/test_soft_pruning.py: zero the group's weights instead of group.prune()."""
    model, x, pruner, before = _vgg_with_dead_filters()
    channels = _channels(model)
    for group in pruner.step(interactive=True):
        for dep, idxs in group:
            layer, fn = dep.target.module, dep.handler
            if fn in (tp.prune_conv_in_channels, tp.prune_linear_in_channels):
                layer.weight.data[:, idxs] *= 0
            elif fn in (tp.prune_conv_out_channels, tp.prune_linear_out_channels):
                layer.weight.data[idxs] *= 0
            elif fn is tp.prune_batchnorm_out_channels:
                layer.weight.data[idxs] *= 0
                layer.bias.data[idxs] *= 0
    assert _channels(model) == channels  # soft: no channel removed
    assert rel_err(before, model(x).detach()) <= 1e-4


def test_pruning_history_replays_on_a_fresh_model(tmp_path):
    """torch-pruning's tests/test_load.py, with StripePruner's load_pruning_history on the fresh model."""
    model, x, pruner, before = _vgg_with_dead_filters()
    pruner.step()
    torch.save({"model": model.state_dict(), "pruning": pruner.pruning_history()}, tmp_path / "pruned_model.pth")
    fresh = vgg16_bn(num_classes=10, width=0.125)
    state = torch.load(tmp_path / "pruned_model.pth")  # weights_only: the history is plain data
    StripePruner(fresh, x[:2], ignored_layers=[fresh.classifier]).load_pruning_history(state["pruning"])
    fresh.load_state_dict(state["model"])
    fresh.eval()
    assert _stripes(fresh) == _stripes(model) and _channels(fresh) == _channels(model)
    assert rel_err(before, fresh(x).detach()) <= 1e-4


def test_bad_pruning_history_is_refused_before_the_model_changes():
    model, x, pruner, _ = _vgg_with_dead_filters()
    pruner.step()
    history = pruner.pruning_history()
    name = next(iter(history["stripes"]))
    history["stripes"][name]["pos"][0] = 10**6
    fresh = vgg16_bn(num_classes=10, width=0.125)
    fresh_pruner = StripePruner(fresh, x[:2], ignored_layers=[fresh.classifier])
    with pytest.raises(ValueError, match=f"stripes of '{name}' out of range"):
        fresh_pruner.load_pruning_history(history)
    assert not any(isinstance(m, StripeConv2d) for m in fresh.modules())
    assert torch.nn.utils.parametrize.is_parametrized(fresh.features[0])  # skeletons still attached
    with pytest.raises(ValueError, match="not a StripePruner pruning history"):
        fresh_pruner.load_pruning_history([["features.0", True, [0]]])  # a torch-pruning history


def _progressive_pruning(pruner, model, speed_up, example_inputs):
    """The benchmark driver's progressive_pruning (reproduce/main.py), counting with the plug-in's counter."""
    model.eval()
    base_ops, _ = count_ops_and_params(model, example_inputs)
    current_speed_up = 1
    while current_speed_up < speed_up:
        pruner.step()
        pruned_ops, _ = count_ops_and_params(model, example_inputs)
        current_speed_up = float(base_ops) / pruned_ops
        if pruner.current_step == pruner.iterative_steps:
            break
    return current_speed_up


def test_benchmark_driver_flow_sparse_training_then_progressive_pruning(tmp_path):
    torch.manual_seed(0)
    model = resnet20(num_classes=10, width=0.25)
    example_inputs = torch.randn(1, 3, 16, 16)
    data = [(torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))) for _ in range(3)]
    # get_pruner: the method's line became StripePruner (its importance a stripe importance)
    imp = StripeImportance()
    pruner_entry = partial(StripePruner, sr=1e-3, global_pruning=True)
    pruner = pruner_entry(model, example_inputs, importance=imp, iterative_steps=10, pruning_ratio=1.0,
                          pruning_ratio_dict={}, max_pruning_ratio=0.9, ignored_layers=_classifier_ignored(model, 10),
                          unwrapped_parameters=[])
    # 0. sparsity learning: train_model(..., pruner=pruner) with the optimizer built inside
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=0)
    model.train()
    for data_batch, target in data:
        optimizer.zero_grad()
        loss = F.cross_entropy(model(data_batch), target)
        loss.backward()
        pruner.regularize(model)
        optimizer.step()
    torch.save(model.state_dict(), tmp_path / "reg.pth")
    model.load_state_dict(torch.load(tmp_path / "reg.pth"))
    # 1. pruning
    calibrate_bn(model, torch.cat([d for d, _ in data]))
    ori_ops, ori_size = count_ops_and_params(model, example_inputs)
    speed_up = _progressive_pruning(pruner, model, 1.5, example_inputs)
    pruned_ops, pruned_size = count_ops_and_params(model, example_inputs)
    assert 1 < pruner.current_step < pruner.iterative_steps  # stopped by the speed-up rule
    assert speed_up >= 1.5 and ori_ops / pruned_ops == pytest.approx(speed_up) and pruned_size < ori_size
    assert all(isinstance(b.conv1, StripeConv2d) for b in model.layers)  # pruned for real after every step
    assert not any(torch.nn.utils.parametrize.is_parametrized(m) for m in model.modules())  # a clean model
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 10)
