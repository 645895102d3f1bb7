"""Federated YOLOv3 object detection on YOLO-format data (e.g. COCO, coco128).

Launched on every process by run_fedavg_distributed_pytorch.sh; process 0 is the
server, processes 1..CLIENT_NUM are clients with data under <data_path>/<id>/{train,test}/
(images/ and labels/, as scripts/split_dataset.py --dataset yolo writes them); by
default fedml_api/model/YOLOv3/coco/<id>/, the seed documents' location.
The steps every process takes are listed in fedml_api/distributed/fedavg/experiment.py.
"""
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "../../..")))

from fedml_api.distributed.fedavg.experiment import run_fedavg_experiment  # noqa: E402
from fedml_api.model.YOLOv3 import YOLOv3ResultAggregator, YOLOv3Trainer, add_yolov3_args, check_yolov3_args, create_model  # noqa: E402

if __name__ == "__main__":
    run_fedavg_experiment("fedYOLOv3", add_yolov3_args, create_model, YOLOv3Trainer, YOLOv3ResultAggregator,
                          check_model_args=check_yolov3_args, default_data_path="fedml_api/model/YOLOv3/coco")
