"""ResNet-18 (He et al., 2016) for small images, and torchvision's ImageNet variant."""

from __future__ import annotations

from argparse import Namespace
from typing import Tuple

import torch
from torch import nn

from fedml_api.data.datasets import get_image_dataset_spec

#: Values accepted for ``args.model`` by :func:`create_model`.
MODEL_NAMES: Tuple[str, ...] = ("resnet18", "resnet18_imagenet")


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers plus a shortcut; halves height and width when ``stride == 2``.

    Input ``[B, in_channels, H, W]`` -> output ``[B, out_channels, H / stride, W / stride]``.
    Submodule names follow torchvision's ``BasicBlock`` so state dicts read the same.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        # The shortcut must match the residual's shape: a strided 1x1 projection when the
        # block changes resolution or width, the identity otherwise.
        self.downsample: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.downsample(x))


class ResNet18(nn.Module):
    """ResNet-18 for small images such as CIFAR-10's 32x32.

    Unlike the ImageNet network, the stem is a single 3x3 stride-1 convolution with no
    max-pool, so a 32x32 input still has 4x4 resolution in the last stage. Four stages of
    two :class:`BasicBlock` each have ``width, 2*width, 4*width, 8*width`` channels and
    strides 1, 2, 2, 2, followed by global average pooling and a linear classifier.
    With the defaults the model has 11,173,962 parameters.

    Args:
        num_classes: Size of the output.
        in_channels: Channels of the input images (3 for RGB, 1 for grayscale).
        width: Channels of the first stage; 64 is the standard network, smaller values
            give a cheaper model for tests and small datasets.

    Input ``[B, in_channels, H, W]`` float -> logits ``[B, num_classes]``.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 64) -> None:
        super().__init__()
        for name, value in (
            ("num_classes", num_classes),
            ("in_channels", in_channels),
            ("width", width),
        ):
            if value < 1:
                raise ValueError(f"ResNet18: {name} must be >= 1, got {value}")
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._stage(width, width, stride=1)
        self.layer2 = self._stage(width, 2 * width, stride=2)
        self.layer3 = self._stage(2 * width, 4 * width, stride=2)
        self.layer4 = self._stage(4 * width, 8 * width, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8 * width, num_classes)
        # He initialisation for the ReLU network, as torchvision's ResNets do.
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    @staticmethod
    def _stage(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
        return nn.Sequential(
            BasicBlock(in_channels, out_channels, stride), BasicBlock(out_channels, out_channels, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def torchvision_resnet18(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """torchvision's ImageNet ResNet-18 (7x7 stride-2 stem and max-pool), randomly initialised.

    Nothing is downloaded. For ``in_channels != 3`` the first convolution is replaced by
    one with the same geometry and the requested input channels. The stem divides the
    resolution by 4, so on 32x32 inputs this variant is cheaper and less accurate than
    :class:`ResNet18`.
    """
    # Imported here: only this variant needs torchvision, which costs ~1 s to import.
    from torchvision.models import resnet18

    model = resnet18(weights=None, num_classes=num_classes)
    if in_channels != 3:
        old = model.conv1
        model.conv1 = nn.Conv2d(
            in_channels,
            old.out_channels,
            old.kernel_size,
            stride=old.stride,
            padding=old.padding,
            bias=False,
        )
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    return model


def create_model(args: Namespace) -> nn.Module:
    """Build the model named by ``args.model`` for ``args.dataset``.

    Reads ``args.model`` (one of :data:`MODEL_NAMES`), ``args.dataset`` (its registry spec
    gives the input channels and the number of classes) and ``args.resnet_width`` (only
    ``"resnet18"`` can change it; torchvision's network is fixed at 64).
    """
    spec = get_image_dataset_spec(args.dataset)
    if args.model == "resnet18":
        return ResNet18(spec.num_classes, spec.channels, args.resnet_width)
    if args.model == "resnet18_imagenet":
        if args.resnet_width != 64:
            raise ValueError(
                f"--resnet_width {args.resnet_width} is not supported by resnet18_imagenet "
                "(torchvision's network has a fixed width of 64); use --model resnet18"
            )
        return torchvision_resnet18(spec.num_classes, spec.channels)
    raise ValueError(f"unknown model {args.model!r}; expected one of {', '.join(MODEL_NAMES)}")
