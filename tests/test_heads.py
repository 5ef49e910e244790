"""swp_plugin.utils.heads: timm's feature-size attributes follow the model after channels before the classifier
went, so ``reset_classifier(n)`` builds a classifier that fits (a plain head, and VGG's head after its pre-logits
ConvMlp, found by the slow timm contract on vgg11_bn)."""

from __future__ import annotations

import timm
import torch
import torch.nn as nn
from timm.models.vgg import VGG

from swp_plugin.utils.heads import sync_feature_sizes


def _reset_and_run(model: nn.Module, x: torch.Tensor) -> tuple:
    model.reset_classifier(5)
    with torch.no_grad():
        return tuple(model.eval()(x).shape)


def test_a_head_after_a_pre_logits_mlp_reads_its_new_width():
    model = VGG([8, "M", 8, "M"], num_classes=10).eval()  # ConvMlp(8 -> 4096 -> 4096), then ClassifierHead
    model.pre_logits.fc2 = nn.Conv2d(4096, 100, 1)  # as if 3996 dead filters had gone
    model.head.fc = nn.Linear(100, 10)
    x = torch.randn(2, 3, 16, 16)
    changed = sync_feature_sizes(model, x)
    assert changed == {"head_hidden_size": 100, "head.in_features": 100}
    assert _reset_and_run(model, x) == (2, 5)


def test_a_plain_head_follows_num_features_and_an_unchanged_model_is_left_alone():
    model = timm.create_model("resnet10t", num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    assert sync_feature_sizes(model, x) == {}
    model.layer4[-1].conv2 = nn.Conv2d(512, 500, 3, padding=1, bias=False)
    model.layer4[-1].bn2 = nn.BatchNorm2d(500)
    model.layer4[-1].downsample = nn.Sequential(nn.Conv2d(256, 500, 1, stride=2, bias=False), nn.BatchNorm2d(500))
    model.fc = nn.Linear(500, 10)
    changed = sync_feature_sizes(model, x)
    assert changed["num_features"] == 500 and changed["head_hidden_size"] == 500
    assert _reset_and_run(model, x) == (1, 5)
