"""torchvision's models for the coverage sweep (``benchmarks/timm_coverage.py --source torchvision``).

Classification CNNs (``weights=None``) and the segmentation models (``weights=None, weights_backbone=None``:
nothing downloads; FCN and DeepLabV3 with their auxiliary head, so they return ``{'out', 'aux'}``). The layers
that produce the outputs are every conv or linear with ``num_classes`` outputs: the classifier, googlenet's and
inception_v3's auxiliary classifiers, the last conv of each segmentation head.
"""

from __future__ import annotations

from typing import Dict, List, Tuple

import torch
import torch.nn as nn
import torchvision

#: name -> family: every CNN family of torchvision 0.28 (smallest variants, plus the ones with a special layer)
#: and the segmentation models. All run at 96x96 except where :data:`SIZES` says otherwise.
MODELS: Dict[str, str] = {
    "resnet18": "resnet",
    "resnet50": "resnet",
    "resnext50_32x4d": "resnext",
    "wide_resnet50_2": "wide resnet",
    "vgg11": "vgg",  # no BatchNorm, dropout in the classifier
    "vgg11_bn": "vgg",
    "alexnet": "alexnet",  # no BatchNorm, 11x11 stride-4 stem
    "squeezenet1_0": "squeezenet",  # fire modules (concat), a conv classifier, no BatchNorm
    "squeezenet1_1": "squeezenet",
    "densenet121": "densenet",
    "googlenet": "inception",  # auxiliary classifiers in train mode
    "googlenet@noaux": "inception",
    "inception_v3": "inception",  # auxiliary classifier in train mode
    "inception_v3@noaux": "inception",
    "mobilenet_v2": "mobilenet",
    "mobilenet_v3_small": "mobilenet",
    "mobilenet_v3_large": "mobilenet",
    "mnasnet0_5": "mnasnet",
    "shufflenet_v2_x0_5": "shufflenet",  # channel split and shuffle
    "efficientnet_b0": "efficientnet",
    "efficientnet_v2_s": "efficientnet",
    "regnet_x_400mf": "regnet",
    "regnet_y_400mf": "regnet",
    "convnext_tiny": "convnext",  # depthwise 7x7 convs, nn.Linear MLPs, LayerNorm
    "fcn_resnet50": "segmentation",  # dict outputs {'out', 'aux'}
    "deeplabv3_resnet50": "segmentation",
    "deeplabv3_mobilenet_v3_large": "segmentation",
    "lraspp_mobilenet_v3_large": "segmentation",  # dict output {'out'}
}

#: name suffix: built with ``aux_logits=False`` (no auxiliary classifiers)
NOAUX = "@noaux"

#: per-model input sizes: inception_v3's auxiliary classifier (run in train mode) needs 299x299
SIZES: Dict[str, int] = {"inception_v3": 299}


def is_model(name: str) -> bool:
    """Whether ``name`` (``@noaux`` allowed) is a torchvision model."""
    return name.removesuffix(NOAUX) in torchvision.models.list_models()


def make_model(name: str, size: int, num_classes: int = 10) -> Tuple[nn.Module, torch.Tensor]:
    """``(model in eval mode, input (4, 3, size, size))``, random init, nothing downloaded."""
    torch.manual_seed(0)
    kwargs = {"weights": None, "num_classes": num_classes, **({"aux_logits": False} if NOAUX in name else {})}
    if name in torchvision.models.list_models(module=torchvision.models.segmentation):
        kwargs.update(weights_backbone=None, **({} if name.startswith("lraspp") else {"aux_loss": True}))
    model = torchvision.models.get_model(name.removesuffix(NOAUX), **kwargs)
    return model.eval(), torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(0))


def output_layers(model: nn.Module, num_classes: int = 10) -> List[nn.Module]:
    """Every conv or linear with ``num_classes`` outputs (classifiers, auxiliary classifiers, the last conv of
    each segmentation head): left unpruned so that every output keeps its channels."""
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))
              and getattr(m, "out_channels", getattr(m, "out_features", None)) == num_classes]
    if not layers:
        raise ValueError(f"no conv or linear layer with {num_classes} outputs in {type(model).__name__}")
    return layers
