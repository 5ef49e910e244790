"""Exactness of step() on timm CNNs (random init, sensitive BatchNorm statistics)."""

from __future__ import annotations

import pytest
import timm
import torch
from conftest import outputs_around_step, randomize_skeletons, regularized_step, rel_err

from swp_plugin import StripeConv2d, StripePruner

MODELS = ["resnet18", "resnet50", "densenet121", "mobilenetv2_100", "efficientnet_b0"]


def _prune(name, dead_filters):
    model = timm.create_model(name, pretrained=False, num_classes=10)
    x = torch.randn(4, 3, 64, 64)
    pruner = StripePruner(model, x[:1], sr=1e-4, threshold=0.05, ignored_layers=[model.get_classifier()])
    randomize_skeletons(pruner, dead_stripes=0.5, dead_filters=dead_filters)
    if dead_filters:
        regularized_step(model, pruner, x)
    before, after = outputs_around_step(model, pruner, x, features=True)
    return model, before, after


@pytest.mark.parametrize("name", MODELS)
def test_exact_with_random_sparse_skeleton(name):
    model, (y0, f0), (y1, f1) = _prune(name, dead_filters=0.0)
    assert rel_err(y0, y1) <= 1e-4
    assert f0.shape == f1.shape and rel_err(f0, f1) <= 1e-4
    assert any(isinstance(m, StripeConv2d) for m in model.modules())


@pytest.mark.parametrize("name", ["resnet18", "mobilenetv2_100", "densenet121"])
def test_exact_with_dead_filters(name):
    _, (y0, f0), (y1, f1) = _prune(name, dead_filters=0.3)
    assert rel_err(y0, y1) <= 1e-4
    if f0.shape == f1.shape:
        assert rel_err(f0, f1) <= 1e-4
