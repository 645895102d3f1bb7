"""Template: federate your own model with FedAvg.

Copy this folder to fedml_experiments/distributed/fed<YourModel>/ and follow the TODOs.
As shipped it runs as is: a small CNN on the per-client ``data.h5`` files written by
scripts/split_dataset.py (e.g. ``--dataset digits``), so you can try it before changing it:

    sh run_fedavg_distributed_pytorch.sh 4 4 5    # data: ../../../data/digits_4clients (the quickstart's)

Every process runs this file: process 0 is the server, processes 1..CLIENT_NUM the
clients, each reading <data_path>/<process_id>/train and .../test.
"""
import argparse
import os
import sys
from typing import Any, Dict

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "../../..")))

from fedml_api.data.client_data import count_client_samples, load_client_split  # noqa: E402
from fedml_api.distributed.fedavg.experiment import run_fedavg_experiment  # noqa: E402
from fedml_core.trainer.model_trainer import ModelTrainer  # noqa: E402
from fedml_core.trainer.result_aggregator import WeightedMeanResultAggregator  # noqa: E402


# TODO(model): replace with your model, or import it from fedml_api/model/<YourModel>/.
class MyModel(nn.Module):
    def __init__(self, in_channels: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(in_channels, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(4), nn.Flatten())
        self.head = nn.Linear(16 * 16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def create_model(args: argparse.Namespace) -> nn.Module:
    # TODO(model): build your model from args; every process must build the same architecture.
    return MyModel(args.in_channels, args.num_classes)


class MyModelTrainer(ModelTrainer):
    """TODO(trainer): how your model trains and tests on one client's data.

    get_model_params / set_model_params are inherited (the full state_dict: parameters
    AND buffers); override them only if your model keeps state elsewhere.
    """

    def get_local_sample_number(self, train_path: str) -> int:
        # TODO(trainer): the number of training samples under train_path (the FedAvg weight).
        return count_client_samples(train_path)

    def train(self, device: torch.device, args: argparse.Namespace, train_path: str) -> None:
        # TODO(trainer): your training loop. args.round_idx is the current round (0-based).
        data = load_client_split(train_path)  # cached per process (see set_cache_budget)
        model = self.model.to(device).train()
        optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
        for _ in range(args.epochs):
            for batch in torch.randperm(len(data)).split(args.batch_size):
                images = data.images[batch].to(device).float().div_(255)
                loss = F.cross_entropy(model(images), data.labels[batch].to(device))
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()

    def test(self, device: torch.device, args: argparse.Namespace, test_path: str) -> Dict[str, Any]:
        # TODO(trainer): evaluate; return plain, JSON-serialisable numbers.
        data = load_client_split(test_path)
        model = self.model.to(device).eval()
        with torch.no_grad():
            logits = model(data.images.to(device).float().div_(255))
            labels = data.labels.to(device)
            return {"accuracy": (logits.argmax(1) == labels).float().mean().item(),
                    "loss": F.cross_entropy(logits, labels).item()}


# TODO(metrics): WeightedMeanResultAggregator takes the sample-weighted mean of every
# numeric metric; subclass ResultAggregator if your metrics combine differently.
MyResultAggregator = WeightedMeanResultAggregator


def add_model_args(parser: argparse.ArgumentParser) -> None:
    # TODO(args): your model's training and testing arguments (the federation's come first).
    group = parser.add_argument_group("model")
    group.add_argument("--in_channels", type=int, default=1)
    group.add_argument("--num_classes", type=int, default=10)
    group.add_argument("--epochs", type=int, default=1)
    group.add_argument("--batch_size", type=int, default=32)
    group.add_argument("--lr", type=float, default=0.05)


if __name__ == "__main__":
    # Every process runs the seed's steps (fedml_api/distributed/fedavg/experiment.py):
    # arguments, process title, seeds, device, data paths, then FedAvg with your pieces.
    # TODO(name, data): your experiment's name and where its clients' folders are by
    # default (relative to the project root; --data_path overrides it).
    run_fedavg_experiment("fedMyModel", add_model_args, create_model, MyModelTrainer, MyResultAggregator,
                          default_data_path="data/digits_4clients")
