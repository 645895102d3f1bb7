"""Federated ResNet18 on CIFAR-10 (or scikit-learn's digits, offline).

Launched on every process by run_fedavg_distributed_pytorch.sh; process 0 is the
server, processes 1..CLIENT_NUM are clients with data under <data_path>/<id>/
(by default fedml_api/model/ResNet18/cifar10/<id>/, where FineFL kept it).
The steps every process takes are listed in fedml_api/distributed/fedavg/experiment.py.
"""
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "../../..")))

from fedml_api.distributed.fedavg.experiment import run_fedavg_experiment  # noqa: E402
from fedml_api.model.ResNet18 import ResNet18ResultAggregator, ResNet18Trainer, add_resnet18_args, create_model  # noqa: E402

if __name__ == "__main__":
    run_fedavg_experiment("fedResNet18", add_resnet18_args, create_model, ResNet18Trainer, ResNet18ResultAggregator,
                          default_data_path="fedml_api/model/ResNet18/cifar10")
