"""main_fedavg.py for the tiny federation (tests/tiny_federation.py), run under mpirun.

    mpirun -np CLIENTS+1 python tests/programs/tiny_main.py --client_num_in_total CLIENTS \
        --client_num_per_round K --comm_round R --data_path DIR --run_dir DIR [--seed S]
"""
import argparse
import logging
import os
import sys
import time

import setproctitle

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "../.."))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

from fedml_api.distributed.fedavg.args import add_federation_args, check_federation_args  # noqa: E402
from fedml_api.distributed.fedavg.FedAvgAPI import FedML_FedAvg_distributed, FedML_init  # noqa: E402
from fedml_api.utils.process_setup import init_training_device, seed_everything  # noqa: E402
from fedml_core.trainer.result_aggregator import WeightedMeanResultAggregator  # noqa: E402
from tiny_federation import FaultyTrainer, MomentumTrainer, make_model  # noqa: E402

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")  # as experiment.py
    comm, process_id, worker_number = FedML_init()
    parser = add_federation_args(argparse.ArgumentParser())
    parser.add_argument("--train_delay", type=float, default=0.0, help="seconds each local training sleeps first")
    parser.add_argument("--inject_error", action="append", default=[], help="METHOD:CLIENT[:ROUND] (see FaultyTrainer)")
    parser.add_argument("--finish_delay", type=float, default=0.0,
                        help="seconds the server sleeps after the last round, before writing its results")
    parser.add_argument("--hidden_units", type=int, default=8, help="the model's hidden layer width (its size: 48 bytes a unit)")
    parser.add_argument("--lr", type=float, default=0.1, help="TinyTrainer's local learning rate (what SCAFFOLD reads)")
    parser.add_argument("--momentum_state", action="store_true",
                        help="train with SGD momentum whose buffers each client keeps across rounds (MomentumTrainer)")
    args = parser.parse_args()
    if args.finish_delay:  # lets tests act after the last round, once the clients are released
        from fedml_api.utils.run_recorder import RunRecorder

        finish = RunRecorder.finish
        RunRecorder.finish = lambda self, *a, **k: (time.sleep(args.finish_delay), finish(self, *a, **k))[1]
    check_federation_args(args)
    setproctitle.setproctitle("FedAvg (distributed):" + str(process_id))
    seed_everything(args.seed)
    device = init_training_device(process_id, comm)
    model = make_model(args.hidden_units)
    FedML_FedAvg_distributed(
        process_id, worker_number, device, comm, model, args,
        os.path.join(args.data_path, str(process_id), "train"),
        os.path.join(args.data_path, str(process_id), "test"),
        WeightedMeanResultAggregator(), MomentumTrainer(model) if args.momentum_state else FaultyTrainer(model, args.inject_error),
    )
