#!/bin/sh
# Shared launcher behind every experiment's run_fedavg_distributed_pytorch.sh.
#
#   sh launch_fedavg.sh EXPERIMENT_DIR CLIENT_NUM WORKER_NUM ROUND [main_fedavg.py options...]
#
# Starts CLIENT_NUM+1 processes (process 0 is the server, 1..CLIENT_NUM the clients;
# with the option --worker_processes P, P+1: processes 1..P are workers serving the clients)
# running EXPERIMENT_DIR/main_fedavg.py with mpirun over EXPERIMENT_DIR/mpi_host_file
# (or $MPI_HOST_FILE). A hostfile naming only this machine runs everything locally;
# otherwise process i runs on the host of the hostfile's i-th process slot (see
# fedml_api/utils/hostfile.py), started over ssh from this machine.
# Environment: PYTHON (default python3), MPIRUN (default mpirun), MPIRUN_ARGS (extra flags),
# FEDML_EXIT_GRACE (seconds ranks get to exit after the server is done; default 15).
#
# Before mpirun, main_fedavg.py runs once here as a pre-flight check (FEDML_PREFLIGHT;
# see fedml_api/distributed/fedavg/preflight.py): bad options, missing client data and a
# bad --resume checkpoint are reported once, before any rank starts (FEDML_PREFLIGHT=0
# skips it).
#
# Failures: the job runs with Open MPI's ULFM (--with-ft ulfm), so a dead client is
# reported to the server instead of ending the job. A client that is alive but never
# exits (frozen by SIGSTOP, hung) would keep mpirun waiting forever, so the server
# reports its exit status through FEDML_STATUS_FILE and, once it has, this launcher
# gives the other ranks FEDML_EXIT_GRACE seconds and then stops what is left. The
# server also leaves its pid there at start: if it dies without reporting (killed), the
# launcher stops the job within seconds instead of leaving the clients waiting.
# The exit status is the server's (0: the run completed), else non-zero.
set -eu

usage() {
    echo "usage: sh run_fedavg_distributed_pytorch.sh CLIENT_NUM WORKER_NUM ROUND [main_fedavg.py options...]" >&2
    echo "  e.g. sh run_fedavg_distributed_pytorch.sh 10 5 50 --data_path /data/cifar10_split" >&2
    exit 2
}
# (No leading zero: shell arithmetic would read 010 as octal 8, and fail on 08.)
is_positive_int() { case "$1" in ''|0*|*[!0-9]*) return 1 ;; esac; }

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

GRACE=${FEDML_EXIT_GRACE:-15}
# Counted in shell arithmetic (hundredths of a second), which takes integers only: a value
# such as 1.5 would stop this script once the server has reported, leaving the job running.
case "$GRACE" in
    ''|*[!0-9]*) echo "error: FEDML_EXIT_GRACE must be a whole number of seconds (0 or more), got '$GRACE'" >&2; exit 2 ;;
esac
while case "$GRACE" in 0?*) true ;; *) false ;; esac; do GRACE=${GRACE#0}; done  # 08 is not octal here

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
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

# Only the shipped default, one local host line without slots=, means "every process on
# this machine"; any other hostfile must hold the run's processes, on one host or many.
SIZED=$(sed -e 's/#.*//' "$HOSTFILE" | awk 'NF { lines++; if (NF > 1) sized = 1 } END { print (lines > 1 || sized) ? "yes" : "no" }')
# With --worker_processes P, P workers serve the CLIENT_NUM clients: P + 1 processes.
# "--worker_processes auto" takes P from a hostfile that sizes the job (its processes
# minus the server's, at most CLIENT_NUM), and passes main_fedavg.py that number.
WORKER_PROCESSES=
PREVIOUS=
for arg do
    case "$PREVIOUS:$arg" in
        --worker_processes:*) WORKER_PROCESSES=$arg ;;
        *:--worker_processes=*) WORKER_PROCESSES=${arg#*=} ;;
    esac
    PREVIOUS=$arg
done
if [ "$WORKER_PROCESSES" = auto ]; then
    if [ "$SIZED" = no ] && [ "$ONLY_LOCAL" = yes ]; then
        echo "error: --worker_processes auto takes the number of workers from the hostfile's processes, but $HOSTFILE" \
             "does not size the job (one local host without slots=): give a number, or a hostfile with slots" >&2
        exit 2
    fi
    SLOTS=$(PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -m fedml_api.utils.hostfile --count "$HOSTFILE") || exit 2
    WORKER_PROCESSES=$((SLOTS - 1 < CLIENT_NUM ? SLOTS - 1 : CLIENT_NUM))
    [ "$WORKER_PROCESSES" -ge 1 ] || { echo "error: $HOSTFILE holds $SLOTS process(es): the server and at least one worker need 2" >&2; exit 2; }
    echo "launcher: --worker_processes auto: $WORKER_PROCESSES workers ($HOSTFILE holds $SLOTS processes)" >&2
fi
if [ -n "$WORKER_PROCESSES" ]; then
    is_positive_int "$WORKER_PROCESSES" && [ "$WORKER_PROCESSES" -le "$CLIENT_NUM" ] || {
        echo "error: --worker_processes must be a whole number between 1 and CLIENT_NUM ($CLIENT_NUM) or auto, got '$WORKER_PROCESSES'" >&2
        exit 2
    }
    PROCESS_NUM=$((WORKER_PROCESSES + 1))
else
    PROCESS_NUM=$((CLIENT_NUM + 1))
fi
if [ "$SIZED" = yes ] || [ "$ONLY_LOCAL" = no ]; then
    PLACEMENT=$(PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -m fedml_api.utils.hostfile "$HOSTFILE" "$PROCESS_NUM") || exit 2
fi

# Path options are relative to where the user ran this script, but the processes run
# in EXP_DIR: make them absolute (the same absolute path then holds on every host).
absolute() { case "$1" in /*) printf '%s' "$1" ;; *) printf '%s' "$PWD/$1" ;; esac; }
PATH_VALUE_NEXT=
PREVIOUS=
for arg do
    shift
    if [ -n "$PATH_VALUE_NEXT" ]; then
        arg=$(absolute "$arg")
        PATH_VALUE_NEXT=
    fi
    # "--worker_processes auto" reaches main_fedavg.py as the number it stands for.
    if [ "$arg" = --worker_processes=auto ]; then
        arg="--worker_processes=$WORKER_PROCESSES"
    elif [ "$arg" = auto ] && [ "$PREVIOUS" = --worker_processes ]; then
        arg=$WORKER_PROCESSES
    fi
    PREVIOUS=$arg
    case "$arg" in
        --data_path|--run_dir|--resume|--model_def|--pretrained_weights) PATH_VALUE_NEXT=$arg ;;
        --data_path=*|--run_dir=*|--resume=*|--model_def=*|--pretrained_weights=*)
            arg="${arg%%=*}=$(absolute "${arg#*=}")" ;;
    esac
    set -- "$@" "$arg"
done

set -- --client_num_in_total "$CLIENT_NUM" --client_num_per_round "$WORKER_NUM" --comm_round "$ROUND" "$@"

# The pre-flight check: the experiment's main, alone, with the same arguments. Its
# output is shown when it fails (the reason, once) and, on success, only its warnings.
# On other hosts, make_hostfile.py --check and each client's own error name missing data.
if [ "${FEDML_PREFLIGHT:-1}" != 0 ]; then
    PREFLIGHT_LOG=$(mktemp "${TMPDIR:-/tmp}/fedml-preflight.XXXXXX")
    PREFLIGHT_STATUS=0
    (
        cd "$EXP_DIR"
        [ "$ONLY_LOCAL" = yes ] && export FEDML_PREFLIGHT_CHECK_DATA=1
        # A lone process talks to nobody: MPI's "self" transport is all it needs (the
        # others' set-up, TCP's above all, cost a second of MPI_Init).
        OMPI_MCA_btl=${OMPI_MCA_btl:-self} FEDML_PREFLIGHT=$PROCESS_NUM WANDB_MODE=disabled WANDB_SILENT=true PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" \
            "$PYTHON" ./main_fedavg.py "$@" </dev/null >"$PREFLIGHT_LOG" 2>&1
    ) || PREFLIGHT_STATUS=$?
    if [ "$PREFLIGHT_STATUS" != 0 ]; then
        grep -v -E '^[0-9-]+ [0-9:,]+ INFO ' "$PREFLIGHT_LOG" >&2 || true
        rm -f "$PREFLIGHT_LOG"
        exit 2
    fi
    grep -E ' WARNING ' "$PREFLIGHT_LOG" >&2 || true
    rm -f "$PREFLIGHT_LOG"
fi
# Processes share cores on purpose (more ranks than cores is normal here): no binding,
# and each rank limits its own torch threads.
MPI_FLAGS="-np $PROCESS_NUM --bind-to none --with-ft ulfm"
[ "$(id -u)" = 0 ] && MPI_FLAGS="$MPI_FLAGS --allow-run-as-root"
if [ "$ONLY_LOCAL" = yes ]; then
    MPI_FLAGS="$MPI_FLAGS --host localhost:$PROCESS_NUM --oversubscribe"
    # Every rank on this host: shared memory carries all the traffic. Without TCP's
    # set-up (interfaces probed by every rank) MPI_Init takes ~0.1 s instead of ~1 s.
    # OMPI_MCA_btl, or --mca btl in MPIRUN_ARGS, chooses otherwise.
    case " ${MPIRUN_ARGS:-} " in
        *" btl "*) ;;
        *) export OMPI_MCA_btl="${OMPI_MCA_btl:-self,sm}" ;;
    esac
else
    # PLACEMENT (checked above: the hostfile holds PROCESS_NUM processes) is the host of
    # each process id; the seq mapper puts process i on the i-th host of the list,
    # whatever the hosts' core counts.
    # Remote daemons and processes are found at this Open MPI's prefix (the same path on
    # every host, like the project and its environment).
    MPI_PREFIX=$(cd "$(dirname "$(readlink -f "$(command -v "$MPIRUN")")")/.." && pwd)
    MPI_FLAGS="$MPI_FLAGS --host $PLACEMENT --map-by seq --prefix $MPI_PREFIX"
    # mpirun warns about -x of an unset variable: forward only the ones set here.
    for var in PATH LD_LIBRARY_PATH PYTHONPATH; do
        eval "value=\${$var:-}"
        [ -z "$value" ] || MPI_FLAGS="$MPI_FLAGS -x $var"
    done
fi

# torch's allocator puts large tensors (models) in transparent huge pages: MPI's
# single-copy transfers of 4 KiB-paged memory are about twice as slow.
export THP_MEM_ALLOC_ENABLE="${THP_MEM_ALLOC_ENABLE:-1}"

STATUS_FILE=$(mktemp "${TMPDIR:-/tmp}/fedml-status.XXXXXX")
rm -f "$STATUS_FILE"  # the server creates it when it is done
export FEDML_STATUS_FILE="$STATUS_FILE"

cd "$EXP_DIR"
MPIRUN_PID=
# (dash's kill takes no "--" after a bare signal name: always "kill -s SIGNAL -- -PGID".)
stop_job() { if [ -n "$MPIRUN_PID" ]; then kill -s "$1" -- "-$MPIRUN_PID" 2>/dev/null || true; fi; }

# The grace is wall time, read from /proc/uptime with the shell's own read (no process per
# poll): counting polls would stretch it on a loaded machine, where each sleep runs long.
now_cs() { read -r UPTIME _ < /proc/uptime; NOW=$(( ${UPTIME%.*} * 100 + 1${UPTIME#*.} - 100 )); }
WAIT_FROM=  # uptime (1/100 s) when the server reported, died without reporting, or we were interrupted
STOPPED=no
SERVER_DIED=no
INTERRUPTED=  # the exit status after a signal to this launcher (128 + its number)
interrupt() {
    INTERRUPTED=$1
    echo "launcher: interrupted; stopping the job" >&2
    stop_job TERM
    STOPPED=yes
    now_cs
    WAIT_FROM=$((NOW - GRACE * 100))  # what ignores TERM gets KILL 3 s later
}
# Installed before mpirun starts: a signal in between must not leave it running alone.
trap 'interrupt 130' INT
trap 'interrupt 143' TERM
trap 'interrupt 129' HUP
# mpirun runs in a session (and process group) of its own, so that stopping the group
# also stops its ssh sessions (one to a cut-off host would otherwise linger). setsid
# execs in place here: a script's background job is no process group leader.
# shellcheck disable=SC2086  # MPI_FLAGS and MPIRUN_ARGS are word lists
setsid "$MPIRUN" $MPI_FLAGS -x FEDML_STATUS_FILE -x THP_MEM_ALLOC_ENABLE ${MPIRUN_ARGS:-} "$PYTHON" ./main_fedavg.py "$@" &
MPIRUN_PID=$!
[ -z "$INTERRUPTED" ] || stop_job TERM  # the signal came while mpirun was being started
THIS_HOST=$(hostname)
while kill -0 "$MPIRUN_PID" 2>/dev/null; do
    if [ -f "$STATUS_FILE" ] || [ "$SERVER_DIED" = yes ] || [ -n "$INTERRUPTED" ]; then
        now_cs
        WAIT_FROM=${WAIT_FROM:-$NOW}
        WAITED=$((NOW - WAIT_FROM))  # 1/100 s
        if [ "$STOPPED" = no ] && [ "$WAITED" -ge $((GRACE * 100)) ]; then
            if [ "$SERVER_DIED" = yes ]; then
                echo "launcher: the server (process 0) died without reporting an exit status; stopping the job" >&2
            else
                echo "launcher: the server finished ${GRACE} s ago but some ranks have not exited (frozen or hung clients); stopping them" >&2
            fi
            stop_job TERM
            STOPPED=yes
        elif [ "$STOPPED" = yes ] && [ "$WAITED" -ge $((GRACE * 100 + 300)) ]; then
            # mpirun cannot reach some host to stop its processes: kill it, its process
            # group and its children (its ssh sessions run in process groups of their own).
            pkill -KILL -P "$MPIRUN_PID" 2>/dev/null || true
            stop_job KILL
        fi
    elif [ -f "$STATUS_FILE.server" ]; then
        # "HOST PID" of the server; it can be watched when it runs on this machine.
        read -r SERVER_HOST SERVER_PID < "$STATUS_FILE.server" || true
        if [ "$SERVER_HOST" = "$THIS_HOST" ] && ! kill -0 "$SERVER_PID" 2>/dev/null && [ ! -f "$STATUS_FILE" ]; then
            SERVER_DIED=yes
            now_cs
            WAIT_FROM=$(( NOW - (GRACE > 2 ? GRACE - 2 : 0) * 100 ))  # the clients get 2 s to notice and exit by themselves
        fi
    fi
    # The run ends soon after the server has reported: then poll faster, so that the
    # command returns within ~20 ms of mpirun (not up to 0.1 s later).
    if [ -n "$WAIT_FROM" ] || [ -f "$STATUS_FILE" ]; then sleep 0.02; else sleep 0.1; fi
done
MPI_STATUS=0
wait "$MPIRUN_PID" || MPI_STATUS=$?
if [ "$SERVER_DIED" = yes ] && [ "$STOPPED" = no ]; then
    # The clients noticed and the job ended by itself: the reason is still the server's death.
    echo "launcher: the server (process 0) died without reporting an exit status" >&2
fi
stop_job KILL  # whatever is left of the job on this machine
rm -f "$STATUS_FILE.server"
if [ -n "$INTERRUPTED" ]; then
    rm -f "$STATUS_FILE"
    exit "$INTERRUPTED"
fi
if [ -f "$STATUS_FILE" ]; then
    SERVER_STATUS=$(cat "$STATUS_FILE")
    rm -f "$STATUS_FILE"
    exit "$SERVER_STATUS"
fi
# The server never reported: the run did not complete, whatever mpirun says.
[ "$MPI_STATUS" != 0 ] || MPI_STATUS=1
exit "$MPI_STATUS"
