"""Federated YOLOv3 object detection on YOLO-format data (e.g. COCO, coco128).

Launched on every process by run_fedavg_distributed_pytorch.sh; process 0 is the
server, processes 1..CLIENT_NUM are clients with data under <data_path>/<id>/{train,test}/
(images/ and labels/, as scripts/split_dataset.py --dataset yolo writes them).
"""
import argparse
import logging
import os
import socket
import sys

import setproctitle

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "../../..")))

from fedml_api.distributed.fedavg.args import add_federation_args, check_federation_args, default_run_dir  # noqa: E402
from fedml_api.distributed.fedavg.FedAvgAPI import FedML_FedAvg_distributed, FedML_init  # noqa: E402
from fedml_api.model.YOLOv3 import YOLOv3ResultAggregator, YOLOv3Trainer, add_yolov3_args, check_yolov3_args, create_model  # noqa: E402
from fedml_api.utils.process_setup import init_training_device, seed_everything  # noqa: E402
from fedml_api.utils.wandb_setup import init_wandb  # noqa: E402


def add_args(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """Federation arguments first, then the model's training and testing arguments."""
    add_federation_args(parser)
    add_yolov3_args(parser)
    args = parser.parse_args()
    try:
        check_federation_args(args)
        check_yolov3_args(args)
    except ValueError as error:
        parser.error(str(error))
    return args


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    comm, process_id, worker_number = FedML_init()

    parser = argparse.ArgumentParser(description="Federated YOLOv3 (FedAvg over MPI)")
    args = add_args(parser)
    if process_id == 0:
        logging.info(args)

    setproctitle.setproctitle("FedAvg (distributed):" + str(process_id))
    logging.info("process %d of %d on host %s (pid %d)", process_id, worker_number, socket.gethostname(), os.getpid())

    wandb_run = None
    if process_id == 0:
        args.run_dir = args.run_dir or default_run_dir("fedYOLOv3")
        os.makedirs(args.run_dir, exist_ok=True)
        wandb_run = init_wandb(args, project="fedml", name=f"FedAvg-YOLOv3-r{args.comm_round}-c{args.client_num_in_total}")

    seed_everything(args.seed)
    device = init_training_device(process_id, comm)

    train_path = os.path.join(args.data_path, str(process_id), "train")
    test_path = os.path.join(args.data_path, str(process_id), "test")

    try:
        model = create_model(args)
    except (FileNotFoundError, ValueError) as error:  # bad --model_def, --pretrained_weights or --img_size
        parser.error(str(error))
    model_trainer = YOLOv3Trainer(model, args)
    result_aggregator = YOLOv3ResultAggregator()

    FedML_FedAvg_distributed(process_id, worker_number, device, comm, model, args,
                             train_path, test_path, result_aggregator, model_trainer)
    if wandb_run is not None:
        wandb_run.finish()
