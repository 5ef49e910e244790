"""DCP (swp_plugin.recipes.dcp): channel selection on a toy problem, torch-pruning groups, the example's
``--first dcp`` and its checkpoint going back through ``--first checkpoint:``."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from test_continual import _check_swp, _names_and_macs, _run
from torch.utils.data import DataLoader, TensorDataset

from swp_plugin import count_ops_and_params
from swp_plugin.models import MODELS, resnet20
from swp_plugin.models.cifar import VGG
from swp_plugin.recipes.dcp import AuxModel, DCPPruner, aux_criterion
from swp_plugin.recipes.training import evaluate, fit

NOISE, SIGNAL = [1, 3, 4, 6], [0, 2, 5, 7]


def _toy_data(n: int, gen: torch.Generator):
    """4 classes; input channel 0 carries the class (its mean level), channel 1 is pure noise (std 3).
    Returns ``x (n, 2, 8, 8)``, ``y (n,)``."""
    y = torch.randint(0, 4, (n,), generator=gen)
    signal = (y.float() - 1.5).view(-1, 1, 1, 1) + 0.5 * torch.randn(n, 1, 8, 8, generator=gen)
    return torch.cat([signal, 3 * torch.randn(n, 1, 8, 8, generator=gen)], 1), y


def _toy_model(seed: int):
    """conv1 (fixed) -> 8 channels, those in NOISE read only the noise input, the others only the signal;
    conv2, conv3, classifier trained 5 epochs. Returns the model, a loader and a test loader."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = VGG([8, 8, 8], num_classes=4, in_chans=2)
    conv1 = model.features[0]
    with torch.no_grad():
        conv1.weight.zero_()
        for c in range(8):
            if c in NOISE:
                conv1.weight[c, 1] = torch.randn(3, 3) / 3
            else:
                conv1.weight[c, 0] = (1 if c % 2 else -1) / 3
    conv1.weight.requires_grad_(False)
    loader = DataLoader(TensorDataset(*_toy_data(2048, gen)), batch_size=64, shuffle=True, generator=gen)
    test = DataLoader(TensorDataset(*_toy_data(512, gen)), batch_size=512)
    fit(model, loader, 5, 0.05, progress=False)
    return model, loader, test


@pytest.fixture
def one_thread():
    """Tiny tensors: a second thread only waits for the first (and for other jobs on a shared machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("seed", [0, 3])
def test_noise_channels_go_first(seed, one_thread):
    model, loader, test = _toy_model(seed)
    assert evaluate(model, test) > 95
    x = next(iter(test))[0]
    pruner = DCPPruner(model, x[:2], pruning_ratio=0.5, num_aux=1, ignored_layers=[model.classifier])
    conv1, conv2, conv3 = model.features[0], model.features[3], model.features[6]
    assert pruner.units == [conv2, conv3] and pruner.stages == [[conv2], [conv3]] and pruner.aux_layers == [conv2]
    assert pruner.skipped == {"features.0": "no producing layer (network input)"}
    with pytest.raises(ValueError, match="fine-tune pruner.aux_model\\(0\\) first"):
        pruner.select_channels(conv2, [next(iter(loader))])
    fit(pruner.aux_model(0), loader, 1, 0.01, progress=False, criterion=aux_criterion)
    batches = [b for _, b in zip(range(2), loader)]
    assert pruner.prune_stage(0, batches) == [("features.3", 4, 8)]
    assert sorted(pruner.selections["features.3"]) == SIGNAL
    # the torch-pruning group removed the noise filters of conv1 and their BatchNorm channels
    assert conv1.out_channels == 4 and model.features[1].num_features == 4
    assert conv1.weight[:, 1].abs().sum() == 0 and conv1.weight[:, 0].abs().sum() > 0
    assert evaluate(model, test) > 90  # before any fine-tuning
    fit(pruner.aux_model(1), loader, 1, 0.01, progress=False, criterion=aux_criterion)
    assert pruner.prune_stage(1, batches) == [("features.6", 4, 8)] and conv2.out_channels == 4
    assert model(x).shape == (512, 4)


def test_resnet_block_channels_and_stages(one_thread):
    torch.manual_seed(0)
    model = resnet20(num_classes=10, in_chans=1, width=0.5)
    x, y = torch.randn(16, 1, 16, 16), torch.arange(16) % 10
    macs_before, _ = count_ops_and_params(model, x[:1])
    pruner = DCPPruner(model, x[:2], pruning_ratio=0.5, num_aux=2, ignored_layers=[model.fc])
    blocks = list(model.layers)
    assert pruner.units == [b.conv2 for b in blocks]  # the block-internal channels, as DCP prunes ResNets
    assert pruner.stages == [[b.conv2 for b in blocks[i:i + 3]] for i in (0, 3, 6)]
    assert pruner.aux_layers == [blocks[2].conv2, blocks[5].conv2]
    assert "channels also feed" in pruner.skipped["layers.0.conv1"]
    for p in range(pruner.num_stages):
        aux = pruner.aux_model(p)
        assert isinstance(aux, AuxModel) == (p < 2)
        assert torch.isfinite(aux_criterion(aux(x), y))  # untrained heads: enough for the structure
        pruner.prune_stage(p, [(x, y)])
    assert [b.conv1.out_channels for b in blocks] == [4] * 3 + [8] * 3 + [16] * 3
    assert count_ops_and_params(model, x[:1])[0] < 0.7 * macs_before and model(x).shape == (16, 10)
    assert not any(m._forward_hooks for m in model.modules())  # nothing left behind: the model pickles


def test_bad_input_is_refused():
    model = VGG([4, 4], num_classes=3, in_chans=1)
    x = torch.randn(2, 1, 8, 8)
    with pytest.raises(ValueError, match="pruning_ratio"):
        DCPPruner(model, x, pruning_ratio=1.0)
    with pytest.raises(ValueError, match="1 prunable layer\\(s\\), too few for 2 auxiliary losses"):
        DCPPruner(model, x, num_aux=2)
    pruner = DCPPruner(model, x, pruning_ratio=0.5, num_aux=0)
    conv = pruner.units[0]
    with pytest.raises(ValueError, match="non-zero weights"):
        pruner.remove_unselected(conv, [0])


def test_vgg19_is_registered():
    model = MODELS["vgg19_bn"](num_classes=10, in_chans=1, width=0.25)
    assert sum(isinstance(m, nn.Conv2d) for m in model.modules()) == 16
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


@pytest.mark.needs_data
def test_first_dcp_then_swp_and_its_checkpoint_goes_back(tmp_path):
    result = _run(tmp_path / "dcp", "--first", "dcp", "--dcp-batches", "2")
    names, macs = _names_and_macs(result)
    assert names == ["baseline", "dcp", "swp"] and macs[1] < 0.75 * macs[0]
    _check_swp(result)
    # the route of a user with DCP's own code: the saved DCP-slimmed model, fed back as a pruned checkpoint
    out = tmp_path / "dcp" / "out"
    again = _run(tmp_path / "again", "--first", f"checkpoint:{out / 'dcp.pt'}", "--baseline", str(out / "baseline.pt"))
    names_again, macs_again = _names_and_macs(again)
    assert names_again == ["baseline", "checkpoint", "swp"] and macs_again[:2] == macs[:2]
    assert [s["accuracy"] for s in again["stages"][:2]] == [s["accuracy"] for s in result["stages"][:2]]
    _check_swp(again)
