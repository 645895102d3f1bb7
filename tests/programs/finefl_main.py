"""A main_fedavg.py written as FineFL's documents show it, run under mpirun by the tests.

Nothing here comes from this framework but the two functions the seed's walk-through
imports (FedML_init, FedML_FedAvg_distributed) and the ModelTrainer base class:

* its own ``add_args(parser)`` with only FineFL's arguments, which parses them too;
* a trainer whose ``get_model_params`` returns numpy arrays of ``named_parameters()``
  (as FineFL's ResNet18Trainer does) and which reads ``self.id``;
* a result aggregator of its own (no base class) with FineFL's
  ``aggregate_test_result(self, round_idx, result_dict)``.

The model is float64, so a dtype lost on the way would show in the final model.

    mpirun -np CLIENTS+1 python tests/programs/finefl_main.py --client_num_in_total CLIENTS \
        --client_num_per_round K --comm_round R --data_path DIR
"""
import argparse
import logging
import os
import random
import socket
import sys

import numpy as np
import setproctitle
import torch
import wandb
from torch import nn

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "../.."))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

from fedml_api.distributed.fedavg.FedAvgAPI import FedML_FedAvg_distributed, FedML_init  # noqa: E402
from fedml_core.trainer.model_trainer import ModelTrainer  # noqa: E402
from tiny_federation import make_model  # noqa: E402


def add_args(parser):
    """
    parser : argparse.ArgumentParser
    return a parser added with args required by fit
    """
    parser.add_argument('--client_num_in_total', type=int, default=1000, metavar='NN', help='number of workers in a distributed cluster')
    parser.add_argument('--client_num_per_round', type=int, default=4, metavar='NN', help='number of workers')
    parser.add_argument('--comm_round', type=int, default=10, help='how many round of communications we shoud use')
    parser.add_argument('--is_mobile', type=int, default=0, help='whether the program is running on the FedML-Mobile server side')
    parser.add_argument('--frequency_of_the_test', type=int, default=1, help='the frequency of the algorithms')
    parser.add_argument('--gpu_server_num', type=int, default=1, help='gpu_server_num')
    parser.add_argument('--gpu_num_per_server', type=int, default=1, help='gpu_num_per_server')
    parser.add_argument('--lr', type=float, default=0.1)
    parser.add_argument('--data_path', type=str, default='/FineFL/fedml_api/model/Tiny/data/')
    args = parser.parse_args()
    return args


def load(path):
    data = torch.load(os.path.join(path, "data.pt"))
    return data["x"].double(), data["y"]


class FineFLTrainer(ModelTrainer):
    def get_model_params(self):
        with torch.no_grad():
            return {name: param.data.cpu().numpy() for name, param in self.model.named_parameters()}

    def set_model_params(self, model_parameters):
        with torch.no_grad():
            for name, param in self.model.named_parameters():
                param.data = torch.tensor(model_parameters[name])

    def get_local_sample_number(self, train_path):
        self.id_when_counting = self.id  # the first call the federation makes on a client
        return len(load(train_path)[1])

    def train(self, device, args, train_path):
        x, y = load(train_path)
        logging.info("client_idx %d trains", self.id)
        self.model.train()
        optimizer = torch.optim.SGD(self.model.parameters(), lr=args.lr)
        for _ in range(3):
            optimizer.zero_grad()
            nn.functional.cross_entropy(self.model(x), y).backward()
            optimizer.step()

    def test(self, device, args, test_path):
        x, y = load(test_path)
        self.model.eval()
        with torch.no_grad():
            accuracy = (self.model(x).argmax(1) == y).double().mean().item()
        return {"Accuracy": accuracy, "id": self.id, "id_when_counting": self.id_when_counting}


class FineFLResultAggregator():
    def aggregate_test_result(self, round_idx, result_dict):
        total = sum(entry["sample_number"] for entry in result_dict.values())
        accuracy = sum(entry["result"]["Accuracy"] * entry["sample_number"] for entry in result_dict.values()) / total
        return {
            "Accuracy": accuracy,
            "round_idx": round_idx,
            "client_idx": sorted(result_dict),
            "ids": [result_dict[i]["result"]["id"] for i in sorted(result_dict)],
            "ids_when_counting": [result_dict[i]["result"]["id_when_counting"] for i in sorted(result_dict)],
            "sample_numbers": [result_dict[i]["sample_number"] for i in sorted(result_dict)],
        }


if __name__ == "__main__":
    logging.getLogger().setLevel(logging.INFO)

    comm, process_id, worker_number = FedML_init()

    parser = argparse.ArgumentParser()
    args = add_args(parser)
    logging.info(args)

    str_process_name = "FedAvg (distributed):" + str(process_id)
    setproctitle.setproctitle(str_process_name)

    logging.basicConfig(level=logging.INFO,
                        format=str(process_id) + ' - %(asctime)s %(filename)s[line:%(lineno)d] %(levelname)s %(message)s')
    hostname = socket.gethostname()
    logging.info("#############process ID = " + str(process_id) + ", host name = " + hostname)

    if process_id == 0:
        wandb.init(project="fedml", name="FedAVG(d)" + "r" + str(args.comm_round), config=args)

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    torch.cuda.manual_seed_all(0)

    device = torch.device("cpu")

    train_path = os.path.join(os.path.join(args.data_path, str(process_id)), "train")
    test_path = os.path.join(os.path.join(args.data_path, str(process_id)), "test")

    model = make_model().double()

    model_trainer = FineFLTrainer(model)
    result_aggregator = FineFLResultAggregator()
    FedML_FedAvg_distributed(process_id, worker_number, device, comm, model, args, train_path, test_path, result_aggregator, model_trainer)
