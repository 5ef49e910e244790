"""The paper's CIFAR networks: VGG16-BN, VGG19-BN and ResNet56 (any depth 6n+2), with ``in_chans`` and a width
knob.

Initialisation follows the reference code: BatchNorm weights 0.5, classifier weights N(0, 0.01).
"""

from __future__ import annotations

from typing import List, Sequence, Union

import torch
import torch.nn as nn

VGG16_CFG: List[Union[int, str]] = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
VGG19_CFG: List[Union[int, str]] = [
    64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512,
]


def _init(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.constant_(m.weight, 0.5)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)


class VGG(nn.Module):
    """CIFAR VGG with BatchNorm: ``features`` (3x3 conv-BN-ReLU, max-pools), global pool, ``classifier``.

    Input ``(N, in_chans, H, W)`` (32x32 for CIFAR, 28x28 for Fashion-MNIST) -> logits ``(N, num_classes)``.
    """

    def __init__(self, cfg: Sequence[Union[int, str]] = VGG16_CFG, num_classes: int = 10, in_chans: int = 3,
                 width: float = 1.0) -> None:
        super().__init__()
        layers: List[nn.Module] = []
        channels = in_chans
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                out = max(1, int(round(v * width)))
                conv = nn.Conv2d(channels, out, 3, padding=1, bias=False)
                layers += [conv, nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
                channels = out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.num_features = channels
        self.classifier = nn.Linear(channels, num_classes)
        _init(self)

    def get_classifier(self) -> nn.Module:
        return self.classifier

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.forward_features(x)), 1))


class BasicBlock(nn.Module):
    """3x3-3x3 residual block; a 1x1 conv + BN shortcut where the shape changes."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(out + shortcut)


class CifarResNet(nn.Module):
    """ResNet for CIFAR (He et al. 2016): depth 6n+2, stages of 16/32/64 channels (times ``width``)."""

    def __init__(self, depth: int = 56, num_classes: int = 10, in_chans: int = 3, width: float = 1.0) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CifarResNet depth must be 6n+2 (20, 32, 44, 56, 110), got {depth}")
        n = (depth - 2) // 6
        planes = [max(1, int(round(c * width))) for c in (16, 32, 64)]
        self.conv1 = nn.Conv2d(in_chans, planes[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes[0])
        self.relu = nn.ReLU(inplace=True)
        blocks, in_planes = [], planes[0]
        for stage, p in enumerate(planes):
            for i in range(n):
                blocks.append(BasicBlock(in_planes, p, stride=2 if stage > 0 and i == 0 else 1))
                in_planes = p
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.num_features = in_planes
        self.fc = nn.Linear(in_planes, num_classes)
        _init(self)

    def get_classifier(self) -> nn.Module:
        return self.fc

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(self.relu(self.bn1(self.conv1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.forward_features(x)), 1))


def vgg16_bn(num_classes: int = 10, in_chans: int = 3, width: float = 1.0) -> VGG:
    """The paper's VGG16 (CIFAR variant, BatchNorm)."""
    return VGG(VGG16_CFG, num_classes=num_classes, in_chans=in_chans, width=width)


def vgg19_bn(num_classes: int = 10, in_chans: int = 3, width: float = 1.0) -> VGG:
    """VGG19 (CIFAR variant, BatchNorm), the net of the paper's DCP row (Table 3)."""
    return VGG(VGG19_CFG, num_classes=num_classes, in_chans=in_chans, width=width)


def resnet56(num_classes: int = 10, in_chans: int = 3, width: float = 1.0) -> CifarResNet:
    """The paper's ResNet56."""
    return CifarResNet(56, num_classes=num_classes, in_chans=in_chans, width=width)


def resnet20(num_classes: int = 10, in_chans: int = 3, width: float = 1.0) -> CifarResNet:
    """A shallower CIFAR ResNet for quick CPU runs."""
    return CifarResNet(20, num_classes=num_classes, in_chans=in_chans, width=width)
