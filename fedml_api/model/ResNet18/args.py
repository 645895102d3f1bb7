"""Command-line arguments for training and testing the ResNet-18 models."""

from __future__ import annotations

import argparse

from fedml_api.data.datasets import IMAGE_DATASETS
from fedml_api.model.ResNet18.resnet import MODEL_NAMES
from fedml_api.utils.lr_schedule import LR_SCHEDULES


def add_resnet18_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the model's training and testing arguments to ``parser`` and return it.

    The federation's own arguments (rounds, clients, data path, ...) are added elsewhere.
    """
    group = parser.add_argument_group("ResNet-18 model, training and testing")
    group.add_argument(
        "--model",
        choices=MODEL_NAMES,
        default="resnet18",
        help="resnet18: CIFAR-style 3x3 stem; resnet18_imagenet: torchvision's network",
    )
    group.add_argument(
        "--dataset",
        choices=sorted(IMAGE_DATASETS),
        default="cifar10",
        help="dataset the client folders were split from (sets input channels and classes)",
    )
    group.add_argument(
        "--resnet_width",
        type=_positive_int,
        default=64,
        help="channels of the first stage (64 = standard ResNet-18)",
    )
    group.add_argument("--epochs", type=_positive_int, default=1, help="local epochs per round")
    group.add_argument(
        "--batch_size", type=_positive_int, default=64, help="local training batch size"
    )
    group.add_argument(
        "--test_batch_size", type=_positive_int, default=256, help="evaluation batch size"
    )
    group.add_argument(
        "--lr", type=_non_negative_float, default=0.05, help="base learning rate of local SGD"
    )
    group.add_argument("--momentum", type=_non_negative_float, default=0.9, help="SGD momentum")
    group.add_argument(
        "--wd",
        type=_non_negative_float,
        default=5e-4,
        help="weight decay (not applied to BatchNorm parameters and biases)",
    )
    group.add_argument(
        "--lr_schedule",
        choices=LR_SCHEDULES,
        default="cosine",
        help="learning rate over federated rounds: constant, or cosine decay to ~0",
    )
    return parser


def _positive_int(text: str) -> int:
    error = argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    try:
        value = int(text)
    except ValueError:
        raise error from None
    if value < 1:
        raise error
    return value


def _non_negative_float(text: str) -> float:
    error = argparse.ArgumentTypeError(f"must be a number >= 0, got {text!r}")
    try:
        value = float(text)
    except ValueError:
        raise error from None
    if not value >= 0:  # written so that NaN is rejected too
        raise error
    return value
