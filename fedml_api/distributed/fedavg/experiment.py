"""The body of every experiment's main_fedavg.py: the seed's walk-through, in order.

An experiment names its model's pieces and calls :func:`run_fedavg_experiment`; every
process (server and clients) runs the same steps:

1. logging at INFO;
2. ``comm, process_id, worker_number = FedML_init()``;
3. arguments: the federation's (``add_federation_args``; ``--data_path`` defaults to
   the experiment's data folder) then the model's, checked (a bad value exits with a
   usage error naming it, before any work);
4. ``setproctitle("FedAvg (distributed):<process_id>")`` and the host name logged;
5. on process 0: the run directory and wandb (``--wandb_mode``; never prompts; started
   in the background, see :func:`~fedml_api.utils.wandb_setup.start_wandb`);
6. ``random``, ``numpy``, ``torch`` and CUDA seeded with ``--seed``;
7. ``device = init_training_device(process_id, comm)``;
8. ``train_path`` / ``test_path`` = ``<data_path>/<process_id>/train`` and ``/test``;
9. ``model = create_model(args)`` (a bad model argument, e.g. a missing weights file,
   exits with a usage error), the ModelTrainer around it, the ResultAggregator;
10. ``FedML_FedAvg_distributed(...)``: the server on process 0, a client elsewhere.
"""
from __future__ import annotations

import argparse
import logging
import os
import socket
from typing import Callable, Optional

import setproctitle
import torch

from fedml_api.utils.process_setup import init_training_device, seed_everything
from fedml_api.utils.wandb_setup import start_wandb, wait_for_wandb
from fedml_core.aggregation import AggregationStrategy
from fedml_core.trainer.model_trainer import ModelTrainer
from fedml_core.trainer.result_aggregator import ResultAggregator

from .args import ArgumentParser, add_federation_args, check_federation_args, default_run_dir
from .FedAvgAPI import FedML_FedAvg_distributed, FedML_init
from .preflight import preflight_process_num


def run_fedavg_experiment(
    name: str,
    add_model_args: Callable[[argparse.ArgumentParser], object],
    create_model: Callable[[argparse.Namespace], torch.nn.Module],
    make_trainer: Callable[[torch.nn.Module, argparse.Namespace], ModelTrainer],
    make_result_aggregator: Callable[[], ResultAggregator],
    check_model_args: Optional[Callable[[argparse.Namespace], None]] = None,
    default_data_path: Optional[str] = None,
    strategy: Optional[Callable[[argparse.Namespace], AggregationStrategy]] = None,
) -> None:
    """Run this process's part of a FedAvg experiment (see the module docstring).

    Args:
        name: the experiment's name (run directory prefix, wandb run name), e.g. ``"fedResNet18"``.
        add_model_args: adds the model's training and testing arguments to a parser.
        create_model: builds the model from the parsed arguments (same on every process).
        make_trainer: ``(model, args) -> ModelTrainer``, e.g. the ModelTrainer subclass itself.
        make_result_aggregator: ``() -> ResultAggregator``, e.g. its class.
        check_model_args: raises ValueError naming the first bad model argument (the
            federation's are checked anyway).
        default_data_path: ``--data_path`` when none is given, relative to the project
            root (the experiment's documented data folder, e.g.
            ``"fedml_api/model/ResNet18/cifar10"``); None makes ``--data_path`` required.
        strategy: ``args -> AggregationStrategy``, e.g. your strategy class (default:
            the one ``--federated_optimizer`` names).
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    comm, process_id, worker_number = FedML_init()

    parser = ArgumentParser(description=f"{name}: FedAvg over MPI")
    add_federation_args(parser, default_data_path)
    add_model_args(parser)
    args = parser.parse_args()
    try:
        check_federation_args(args)
        if check_model_args is not None:
            check_model_args(args)
    except ValueError as error:
        parser.error(str(error))
    if process_id == 0:
        logging.info(args)

    setproctitle.setproctitle("FedAvg (distributed):" + str(process_id))
    logging.info("process %d of %d on host %s (pid %d)", process_id, worker_number, socket.gethostname(), os.getpid())

    if process_id == 0 and preflight_process_num() is None:  # the launcher's check writes nothing
        args.run_dir = args.run_dir or default_run_dir(name)
        os.makedirs(args.run_dir, exist_ok=True)
        start_wandb(args, project="fedml", name=f"FedAvg-{name}-r{args.comm_round}-c{args.client_num_in_total}")

    seed_everything(args.seed)
    device = init_training_device(process_id, comm)

    train_path = os.path.join(args.data_path, str(process_id), "train")
    test_path = os.path.join(args.data_path, str(process_id), "test")

    try:
        model = create_model(args)
    except (FileNotFoundError, ValueError) as error:  # e.g. an unknown --model, a missing weights file
        parser.error(str(error))
    model_trainer = make_trainer(model, args)
    result_aggregator = make_result_aggregator()

    FedML_FedAvg_distributed(process_id, worker_number, device, comm, model, args,
                             train_path, test_path, result_aggregator, model_trainer,
                             strategy=strategy(args) if strategy is not None else None)
    wandb_run = wait_for_wandb()
    if wandb_run is not None:
        wandb_run.finish()
