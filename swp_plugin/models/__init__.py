"""Models: the paper's CIFAR nets, and ``create_model`` for them or any timm model."""

from typing import Callable, Dict

import torch.nn as nn

from .cifar import VGG, CifarResNet, resnet20, resnet56, vgg16_bn, vgg19_bn

#: name -> constructor of the networks shipped here (timm models are reached through timm's registry).
MODELS: Dict[str, Callable[..., nn.Module]] = {
    "vgg16_bn": vgg16_bn, "vgg19_bn": vgg19_bn, "resnet56": resnet56, "resnet20": resnet20,
}


def create_model(name: str, num_classes: int = 10, in_chans: int = 3, width: float = 1.0, **kwargs) -> nn.Module:
    """One of :data:`MODELS` (``width``: its channel multiplier), else ``timm.create_model(name, pretrained=False,
    ...)`` (``width`` must stay 1: timm models take their own arguments in ``kwargs``)."""
    if name in MODELS:
        return MODELS[name](num_classes=num_classes, in_chans=in_chans, width=width, **kwargs)
    if width != 1.0:
        raise ValueError(f"width={width:g} is the channel multiplier of {sorted(MODELS)}; timm model {name!r} takes "
                         "its own arguments instead (pass them as keyword arguments, e.g. channel_multiplier)")
    import timm

    if not timm.is_model(name):
        raise ValueError(f"unknown model {name!r}: not one of {sorted(MODELS)} and not a timm model name")
    return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans, **kwargs)


__all__ = ["MODELS", "CifarResNet", "VGG", "create_model", "resnet20", "resnet56", "vgg16_bn", "vgg19_bn"]
