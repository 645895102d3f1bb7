#!/bin/sh
# Federated YOLOv3: sh run_fedavg_distributed_pytorch.sh CLIENT_NUM WORKER_NUM ROUND [options...]
# e.g. sh run_fedavg_distributed_pytorch.sh 2 2 3 --data_path ../../../data/coco128_2clients \
#          --model_def yolov3-tiny.cfg --img_size 320
# Options are main_fedavg.py's (python3 main_fedavg.py --help); hosts are in ./mpi_host_file.
HERE=$(cd "$(dirname "$0")" && pwd)
exec sh "$HERE/../launch_fedavg.sh" "$HERE" "$@"
