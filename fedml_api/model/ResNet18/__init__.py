"""ResNet-18 for federated image classification: model, trainer, result aggregator, arguments."""

from fedml_api.model.ResNet18.args import add_resnet18_args
from fedml_api.model.ResNet18.resnet import (
    MODEL_NAMES,
    ResNet18,
    create_model,
    torchvision_resnet18,
)
from fedml_api.model.ResNet18.ResNet18ResultAggregator import ResNet18ResultAggregator
from fedml_api.model.ResNet18.ResNet18Trainer import (
    ResNet18Trainer,
    augment_batch,
    normalize_batch,
)

__all__ = [
    "MODEL_NAMES",
    "ResNet18",
    "ResNet18ResultAggregator",
    "ResNet18Trainer",
    "add_resnet18_args",
    "augment_batch",
    "create_model",
    "normalize_batch",
    "torchvision_resnet18",
]
