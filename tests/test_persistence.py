"""save/load without pickled code, whole-module torch.save, training checkpoints with skeletons."""

from __future__ import annotations

import pickle

import pytest
import timm
import torch
from conftest import calibrate_bn, randomize_skeletons, regularized_step

import swp_plugin
from swp_plugin import StripeConv2d, StripePruner
from swp_plugin.layers.config import use_backend
from swp_plugin.models import create_model

MODELS = ["vgg16_bn", "resnet56", "resnet18", "mobilenetv2_100", "densenet121"]


@pytest.fixture(autouse=True)
def _same_backend_everywhere():
    """The round trips below compare outputs bit for bit: every stripe layer runs the same backend (with
    backend='auto' a saved and a loaded layer could time differently and pick different, equally exact ones)."""
    with use_backend("stripe"):
        yield


def _fresh(name):
    torch.manual_seed(0)
    if timm.is_model(name):
        return timm.create_model(name, pretrained=False, num_classes=10), torch.randn(2, 3, 64, 64)
    return create_model(name, num_classes=10), torch.randn(2, 3, 32, 32)


def _pruned(name):
    model, x = _fresh(name)
    pruner = StripePruner(model, x[:1], ignored_layers=[model.get_classifier()])
    randomize_skeletons(pruner, dead_stripes=0.5, dead_filters=0.3)
    regularized_step(model, pruner, x)
    calibrate_bn(model, x)
    pruner.step()
    return model, x


@pytest.mark.parametrize("name", MODELS)
def test_save_load_round_trip_is_exact_with_weights_only(name, tmp_path):
    model, x = _pruned(name)
    path = tmp_path / "pruned.pt"
    swp_plugin.save(model, path)
    raw = torch.load(path, weights_only=True)  # tensors and plain Python only
    assert raw["format"] == swp_plugin.persistence.FORMAT and any(e["stripe"] for e in raw["structure"].values())
    fresh, _ = _fresh(name)
    swp_plugin.load(path, fresh).eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), model.eval()(x))
    assert sum(isinstance(m, StripeConv2d) for m in fresh.modules()) == sum(
        isinstance(m, StripeConv2d) for m in model.modules())


def test_whole_module_torch_save_needs_weights_only_false(tmp_path):
    model, x = _pruned("resnet56")
    path = tmp_path / "whole.pt"
    torch.save(model, path)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)
    loaded = torch.load(path, weights_only=False).eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))


def test_load_refuses_other_files_and_architectures(tmp_path):
    model, _ = _pruned("resnet56")
    swp_plugin.save(model, tmp_path / "a.pt")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "b.pt")
    with pytest.raises(ValueError, match="not a swp_plugin.save file"):
        swp_plugin.load(tmp_path / "b.pt", create_model("resnet56"))
    with pytest.raises(ValueError, match="not the same architecture"):
        swp_plugin.load(tmp_path / "a.pt", create_model("vgg16_bn"))


def test_training_checkpoint_with_skeletons_resumes(tmp_path):
    model, x = _fresh("resnet56")
    pruner = StripePruner(model, x[:1], sr=1e-3, ignored_layers=[model.fc])
    randomize_skeletons(pruner, dead_stripes=0.3, dead_filters=0.2)
    regularized_step(model, pruner, x)
    torch.save(model.state_dict(), tmp_path / "ckpt.pt")

    resumed, _ = _fresh("resnet56")
    resumed_pruner = StripePruner(resumed, x[:1], sr=1e-3, ignored_layers=[resumed.fc])
    resumed.load_state_dict(torch.load(tmp_path / "ckpt.pt", weights_only=True))
    assert resumed_pruner.stripe_sparsity() == pruner.stripe_sparsity() > 0
    for m in (model, resumed):
        calibrate_bn(m, x)
    with torch.no_grad():
        assert torch.equal(resumed(x), model(x))
    regularized_step(resumed, resumed_pruner, x)  # training goes on
    resumed_pruner.step()
