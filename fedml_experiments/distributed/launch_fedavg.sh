#!/bin/sh
# Shared launcher behind every experiment's run_fedavg_distributed_pytorch.sh.
#
#   sh launch_fedavg.sh EXPERIMENT_DIR CLIENT_NUM WORKER_NUM ROUND [main_fedavg.py options...]
#
# Starts CLIENT_NUM+1 processes (process 0 is the server, 1..CLIENT_NUM the clients)
# running EXPERIMENT_DIR/main_fedavg.py with mpirun over EXPERIMENT_DIR/mpi_host_file
# (or $MPI_HOST_FILE). A hostfile naming only this machine runs everything locally.
# Environment: PYTHON (default python3), MPIRUN (default mpirun), MPIRUN_ARGS (extra flags).
set -eu

usage() {
    echo "usage: sh run_fedavg_distributed_pytorch.sh CLIENT_NUM WORKER_NUM ROUND [main_fedavg.py options...]" >&2
    echo "  e.g. sh run_fedavg_distributed_pytorch.sh 10 5 50 --data_path /data/cifar10_split" >&2
    exit 2
}
is_positive_int() { case "$1" in ''|*[!0-9]*) return 1 ;; *) [ "$1" -gt 0 ] ;; esac; }

[ $# -ge 4 ] || usage
EXP_DIR=$1 CLIENT_NUM=$2 WORKER_NUM=$3 ROUND=$4
shift 4
for pair in "CLIENT_NUM:$CLIENT_NUM" "WORKER_NUM:$WORKER_NUM" "ROUND:$ROUND"; do
    is_positive_int "${pair#*:}" || { echo "error: ${pair%%:*} must be a positive integer, got '${pair#*:}'" >&2; usage; }
done
if [ "$WORKER_NUM" -gt "$CLIENT_NUM" ]; then
    echo "error: WORKER_NUM ($WORKER_NUM clients per round) cannot exceed CLIENT_NUM ($CLIENT_NUM clients)" >&2
    exit 2
fi

PROCESS_NUM=$((CLIENT_NUM + 1))
PYTHON=${PYTHON:-python3}
MPIRUN=${MPIRUN:-mpirun}
HOSTFILE=${MPI_HOST_FILE:-$EXP_DIR/mpi_host_file}
[ -f "$HOSTFILE" ] || { echo "error: hostfile $HOSTFILE not found (one host per line, the server's first)" >&2; exit 2; }
command -v "$MPIRUN" >/dev/null 2>&1 || { echo "error: '$MPIRUN' not found; activate the project's virtual environment (see README.md)" >&2; exit 2; }

# Every distinct host the hostfile names (first word of each non-comment line).
HOSTS=$(sed -e 's/#.*//' "$HOSTFILE" | awk 'NF {print $1}' | sort -u)
ONLY_LOCAL=yes
for host in $HOSTS; do
    case "$host" in
        localhost|127.0.0.1|"$(hostname)"|"$(hostname -s 2>/dev/null || hostname)") ;;
        *) ONLY_LOCAL=no ;;
    esac
done

set -- --client_num_in_total "$CLIENT_NUM" --client_num_per_round "$WORKER_NUM" --comm_round "$ROUND" "$@"
# Processes share cores on purpose (more ranks than cores is normal here): no binding,
# and each rank limits its own torch threads.
MPI_FLAGS="-np $PROCESS_NUM --bind-to none"
[ "$(id -u)" = 0 ] && MPI_FLAGS="$MPI_FLAGS --allow-run-as-root"
if [ "$ONLY_LOCAL" = yes ]; then
    MPI_FLAGS="$MPI_FLAGS --host localhost:$PROCESS_NUM --oversubscribe"
else
    MPI_FLAGS="$MPI_FLAGS --hostfile $HOSTFILE --map-by slot -x PATH -x LD_LIBRARY_PATH -x PYTHONPATH"
fi

cd "$EXP_DIR"
# shellcheck disable=SC2086  # MPI_FLAGS and MPIRUN_ARGS are word lists
exec "$MPIRUN" $MPI_FLAGS ${MPIRUN_ARGS:-} "$PYTHON" ./main_fedavg.py "$@"
