#!/bin/sh
# Federated MyModel (template): sh run_fedavg_distributed_pytorch.sh CLIENT_NUM WORKER_NUM ROUND [options...]
# e.g. sh run_fedavg_distributed_pytorch.sh 10 5 50 --data_path ../../../data/digits
# Options are main_fedavg.py's (python3 main_fedavg.py --help); hosts are in ./mpi_host_file.
HERE=$(cd "$(dirname "$0")" && pwd)
exec sh "$HERE/../launch_fedavg.sh" "$HERE" "$@"
