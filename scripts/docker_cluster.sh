#!/usr/bin/env bash
# A fedml-mpi cluster of containers: one head node and N compute nodes from one image,
# linked by key-only ssh, the experiment launched with mpirun from the head node.
#
#   scripts/docker_cluster.sh build                  build the image (docker/Dockerfile)
#   scripts/docker_cluster.sh up N                   start headnode + computenode1..N on one network
#   scripts/docker_cluster.sh run EXPERIMENT CLIENT_NUM WORKER_NUM ROUND [main_fedavg.py options...]
#   scripts/docker_cluster.sh hostfile CLIENT_NUM    write and check the head node's mpi_host_file
#   scripts/docker_cluster.sh exec NODE COMMAND...   run a command in a node (e.g. exec headnode bash)
#   scripts/docker_cluster.sh down                   remove the containers, the network and the keys
# Containers on several servers (docs/DEPLOYMENT.md):
#   scripts/docker_cluster.sh keys NODE...           keys for these nodes (the head node first)
#   scripts/docker_cluster.sh node NODE              start this server's node, on the host's network
# Machines that cannot pull images:
#   scripts/docker_cluster.sh base-image [IMAGE]     a Debian base image made with debootstrap
#
# e.g.  scripts/docker_cluster.sh up 3
#       scripts/docker_cluster.sh run fedResNet18 3 2 5 --data_path /data/cifar10_3clients
#       scripts/docker_cluster.sh down
#
# Every node mounts FEDML_DATA_DIR at /data; the head node mounts FEDML_RUNS_DIR at /runs,
# where `run` puts the run directory unless --run_dir is given. Each cluster gets fresh
# ssh keys (a cluster key pair and one host key per node) in FEDML_CLUSTER_DIR, mounted
# read-only into the nodes; `down` deletes them.
#
# Environment:
#   FEDML_ENGINE        docker or podman (default: docker when its daemon answers, else podman)
#   PODMAN_RUNTIME      OCI runtime podman should use (e.g. runc)
#   FEDML_IMAGE         image (default fedml-mpi:latest)
#   FEDML_CLUSTER       cluster name: prefix of container and network names (default fedml)
#   FEDML_CLUSTER_DIR   keys, node list and hostfile (default ~/.fedml-docker/<cluster>)
#   FEDML_DATA_DIR      mounted at /data on every node (default <repo>/data)
#   FEDML_RUNS_DIR      mounted at /runs on the head node (default <repo>/runs)
#   FEDML_GPUS          all or none (default: all when nvidia-smi finds a GPU here)
#   FEDML_SHM_SIZE      /dev/shm of each node (default 2g)
#   FEDML_SSH_PORT      port of the nodes' sshd, chosen by up/keys (default 22)
#   FEDML_MOUNT_SOURCE  1: mount this checkout over the image's /opt/fedml (no rebuild after edits)
#   build:      BASE_IMAGE, TORCH_REQUIREMENTS (docker/Dockerfile's build arguments),
#               FEDML_WHEELHOUSE (a folder of wheels to install from, offline)
#   base-image: FEDML_DEBIAN_SUITE (bookworm), FEDML_DEBIAN_MIRROR (default: this machine's
#               apt mirror), FEDML_DOCKER_CACHE (/var/tmp/fedml-docker-cache)
#   run:        MPIRUN_ARGS, FEDML_EXIT_GRACE, WANDB_API_KEY, WANDB_MODE are passed on when set
set -euo pipefail
shopt -s inherit_errexit  # a failure inside $(...) fails the command that uses it

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CLUSTER=${FEDML_CLUSTER:-fedml}
IMAGE=${FEDML_IMAGE:-fedml-mpi:latest}
STATE=${FEDML_CLUSTER_DIR:-$HOME/.fedml-docker/$CLUSTER}
NETWORK=$CLUSTER-net
SHM_SIZE=${FEDML_SHM_SIZE:-2g}
PROJECT=/opt/fedml                         # the project's path in the image
HEAD_HOSTFILE=/var/lib/fedml/mpi_host_file  # the hostfile `run` uses, inside the head node
SSH_WAIT_SECONDS=60

die() { echo "docker_cluster: error: $*" >&2; exit 1; }
say() { echo "docker_cluster: $*" >&2; }
usage() { sed -n '2,20p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2; exit "${1:-2}"; }
is_positive_int() { case "$1" in ''|*[!0-9]*) return 1 ;; *) [ "$1" -gt 0 ] ;; esac; }
# The absolute path of a folder to mount, created if missing.
abs_dir() { mkdir -p "$1" && (cd "$1" && pwd); }

# -- container engine -----------------------------------------------------------------

ENGINE=()
detect_engine() {
    local name=${FEDML_ENGINE:-}
    if [ -z "$name" ]; then
        if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
            name=docker
        elif command -v podman >/dev/null 2>&1; then
            name=podman
        else
            die "no container engine: install docker (with its daemon running) or podman, or set FEDML_ENGINE"
        fi
    fi
    case "$name" in
        docker|podman) command -v "$name" >/dev/null 2>&1 || die "FEDML_ENGINE=$name but '$name' is not installed" ;;
        *) die "FEDML_ENGINE must be docker or podman, got '$name'" ;;
    esac
    ENGINE=("$name")
    if [ -n "${PODMAN_RUNTIME:-}" ]; then
        [ "$name" = podman ] || die "PODMAN_RUNTIME is set but the engine is $name"
        ENGINE+=(--runtime "$PODMAN_RUNTIME")
    fi
}
engine() { "${ENGINE[@]}" "$@"; }
is_podman() { [ "${ENGINE[0]}" = podman ]; }
image_exists() { engine image inspect "$1" >/dev/null 2>&1; }
require_image() {
    image_exists "$IMAGE" || die "image $IMAGE not found: build it first (scripts/docker_cluster.sh build)"
}

# -- the cluster's state: node list, keys, hostfile ---------------------------------------

container_of() { echo "$CLUSTER-$1"; }
cluster_containers() { engine ps -a --filter "label=fedml.cluster=$CLUSTER" --format '{{.Names}}'; }
is_running() { [ "$(engine inspect -f '{{.State.Running}}' "$1" 2>/dev/null)" = true ]; }
require_cluster() {
    [ -s "$STATE/nodes" ] || die "no cluster '$CLUSTER' here ($STATE/nodes missing): start one with 'up N', or 'keys' then 'node'"
}
nodes() { cat "$STATE/nodes"; }
head_node() { nodes | head -n 1; }
ssh_port() { cat "$STATE/ssh_port"; }

# Fresh keys for NODE... (the head node first) in $STATE, made in a throwaway container
# from the image (docker/cluster_keys.sh), so the files belong to the nodes' root user.
make_keys() {
    local port=${FEDML_SSH_PORT:-22}
    case "$port" in ''|*[!0-9]*) die "FEDML_SSH_PORT must be a port number, got '$port'" ;; esac
    [ -z "$(cluster_containers)" ] || die "cluster '$CLUSTER' has containers ($(cluster_containers | tr '\n' ' ')); 'down' first, or set FEDML_CLUSTER to another name"
    remove_state
    mkdir -p "$STATE"
    chmod 700 "$STATE"
    engine run --rm --network none -v "$STATE:/state" "$IMAGE" sh "$PROJECT/docker/cluster_keys.sh" /state "$port" "$@"
    printf '%s\n' "$@" > "$STATE/nodes"
    echo "$port" > "$STATE/ssh_port"
}

remove_state() {
    [ -d "$STATE" ] || return 0
    # Keys made in a container may belong to a root that is not this user: remove them
    # the same way when plain rm is not allowed to.
    if ! rm -rf "$STATE/ssh" "$STATE/hosts" 2>/dev/null; then
        engine run --rm --network none -v "$STATE:/state" "$IMAGE" rm -rf /state/ssh /state/hosts
    fi
    rm -f "$STATE/nodes" "$STATE/ssh_port" "$STATE/mpi_host_file"
    rmdir "$STATE" 2>/dev/null || true
}

# -- nodes ---------------------------------------------------------------------------------

gpu_flags() {
    local gpus=${FEDML_GPUS:-}
    if [ -z "$gpus" ]; then
        gpus=none
        if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then gpus=all; fi
    fi
    case "$gpus" in
        none) ;;
        # podman reaches GPUs through CDI (nvidia-ctk cdi generate), docker through its --gpus flag
        all) if is_podman; then echo "--device nvidia.com/gpu=all"; else echo "--gpus all"; fi ;;
        *) die "FEDML_GPUS must be all or none, got '$gpus'" ;;
    esac
}

# start_node NODE [engine run options...]: one node's container, keys and data mounted.
start_node() {
    local node=$1
    shift
    DATA_DIR=$(abs_dir "$DATA_DIR")
    RUNS_DIR=$(abs_dir "$RUNS_DIR")
    local args=(run -d --name "$(container_of "$node")"
                --label "fedml.cluster=$CLUSTER" --label "fedml.node=$node"
                --shm-size "$SHM_SIZE" -e "FEDML_SSH_PORT=$(ssh_port)"
                -v "$STATE/ssh:/etc/fedml/ssh:ro" -v "$STATE/hosts/$node:/etc/fedml/host-keys:ro"
                -v "$DATA_DIR:/data" "$@")
    [ "$node" != "$(head_node)" ] || args+=(-v "$RUNS_DIR:/runs")
    [ "${FEDML_MOUNT_SOURCE:-0}" != 1 ] || args+=(-v "$ROOT:$PROJECT")
    # shellcheck disable=SC2207  # gpu_flags prints whole flags separated by spaces
    args+=($(gpu_flags))
    engine "${args[@]}" "$IMAGE" >/dev/null
}

# Until every node's sshd lets the head node in with the cluster key.
wait_for_ssh() {
    local head deadline node
    head=$(container_of "$(head_node)")
    deadline=$((SECONDS + SSH_WAIT_SECONDS))
    for node in $(nodes); do
        until engine exec "$head" ssh -o ConnectTimeout=2 "$node" true 2>/dev/null; do
            if [ "$SECONDS" -ge "$deadline" ]; then
                is_running "$(container_of "$node")" || {
                    engine logs "$(container_of "$node")" >&2 || true
                    die "node $node stopped (its log is above)"
                }
                engine exec "$head" ssh -o ConnectTimeout=2 "$node" true || true
                die "the head node cannot ssh to $node after ${SSH_WAIT_SECONDS} s (the ssh error is above)"
            fi
            sleep 1
        done
    done
}

# write_hostfile CLIENT_NUM: the server on the head node, client i on compute node
# ((i-1) mod N)+1, checked from the head node (ssh, the project, torch and mpi4py on every
# node: scripts/make_hostfile.py --check) and written there for the launcher; a copy
# goes to $STATE/mpi_host_file.
write_hostfile() {
    local client_num=$1 head i
    local all=() computes=() clients=()
    mapfile -t all < <(nodes)
    head=${all[0]}
    computes=("${all[@]:1}")
    [ ${#computes[@]} -gt 0 ] || die "cluster '$CLUSTER' has no compute node"
    is_running "$(container_of "$head")" || die "the head node's container $(container_of "$head") is not running here"
    for ((i = 0; i < client_num; i++)); do clients+=("${computes[i % ${#computes[@]}]}"); done
    engine exec "$(container_of "$head")" python "$PROJECT/scripts/make_hostfile.py" \
        --server "$head" --clients "${clients[@]}" --out "$HEAD_HOSTFILE" --check
    engine exec "$(container_of "$head")" cat "$HEAD_HOSTFILE" > "$STATE/mpi_host_file"
}

# -- commands --------------------------------------------------------------------------------

cmd_build() {
    [ $# -eq 0 ] || die "build takes no arguments; set BASE_IMAGE, TORCH_REQUIREMENTS or FEDML_WHEELHOUSE instead"
    local args=(build -f "$ROOT/docker/Dockerfile" -t "$IMAGE")
    [ -z "${BASE_IMAGE:-}" ] || args+=(--build-arg "BASE_IMAGE=$BASE_IMAGE")
    [ -z "${TORCH_REQUIREMENTS:-}" ] || args+=(--build-arg "TORCH_REQUIREMENTS=$TORCH_REQUIREMENTS")
    if [ -n "${FEDML_WHEELHOUSE:-}" ]; then
        compgen -G "$FEDML_WHEELHOUSE/*.whl" >/dev/null || die "FEDML_WHEELHOUSE=$FEDML_WHEELHOUSE holds no wheels"
        args+=(--build-context "wheelhouse=$(cd "$FEDML_WHEELHOUSE" && pwd)")
    fi
    if is_podman; then
        # BuildKit finds Dockerfile.dockerignore beside the Dockerfile by itself; podman is told.
        args+=(--ignorefile "$ROOT/docker/Dockerfile.dockerignore")
        # A base that exists only here (e.g. made by base-image) is not looked for in a registry.
        if [ -n "${BASE_IMAGE:-}" ] && image_exists "$BASE_IMAGE"; then args+=(--pull=never); fi
    fi
    engine "${args[@]}" "$ROOT"
    say "built $IMAGE"
}

cmd_up() {
    if [ $# -ne 1 ] || ! is_positive_int "$1"; then die "usage: up N (N compute nodes, at least 1)"; fi
    require_image
    local i nodes=(headnode)
    for ((i = 1; i <= $1; i++)); do nodes+=("computenode$i"); done
    make_keys "${nodes[@]}"
    # Whatever fails from here on, leave nothing half started.
    trap 'say "up failed; removing what it started"; cmd_down >/dev/null 2>&1 || true' EXIT
    engine network create --label "fedml.cluster=$CLUSTER" "$NETWORK" >/dev/null
    for node in "${nodes[@]}"; do
        start_node "$node" --hostname "$node" --network "$NETWORK" --network-alias "$node"
    done
    wait_for_ssh
    write_hostfile "$1"
    trap - EXIT
    say "cluster '$CLUSTER' is up: ${nodes[*]} (containers $CLUSTER-<node>, network $NETWORK); /data is $DATA_DIR, /runs is $RUNS_DIR"
}

cmd_hostfile() {
    if [ $# -ne 1 ] || ! is_positive_int "$1"; then die "usage: hostfile CLIENT_NUM"; fi
    require_cluster
    write_hostfile "$1"
    cat "$STATE/mpi_host_file"
}

cmd_run() {
    [ $# -ge 4 ] || die "usage: run EXPERIMENT CLIENT_NUM WORKER_NUM ROUND [main_fedavg.py options...]"
    local experiment=$1 head arg flags=() extra=()
    shift
    is_positive_int "$1" || die "CLIENT_NUM must be a positive integer, got '$1'"
    require_cluster
    head=$(container_of "$(head_node)")
    is_running "$head" || die "the head node's container $head is not running here (run 'up N', or on a multi-server cluster run this on the head node's server)"
    local script="$PROJECT/fedml_experiments/distributed/$experiment/run_fedavg_distributed_pytorch.sh"
    engine exec "$head" test -f "$script" || die "no experiment '$experiment' in the image ($script missing)"
    write_hostfile "$1"
    for arg in "$@"; do case "$arg" in --run_dir|--run_dir=*) extra=(none) ;; esac; done
    if [ ${#extra[@]} -eq 0 ]; then
        extra=(--run_dir "/runs/$experiment-$(date +%Y%m%d-%H%M%S)")
        say "run directory: $RUNS_DIR/${extra[1]#/runs/} (/runs in the head node)"
    else
        extra=()
    fi
    flags=(-e "MPI_HOST_FILE=$HEAD_HOSTFILE")
    for var in MPIRUN_ARGS FEDML_EXIT_GRACE WANDB_API_KEY WANDB_MODE; do
        [ -z "${!var:-}" ] || flags+=(-e "$var")
    done
    # A terminal makes Ctrl-C reach the launcher, which then stops mpirun.
    if [ -t 0 ] && [ -t 1 ]; then flags+=(-it); fi
    engine exec "${flags[@]}" "$head" sh "$script" "$@" "${extra[@]}"
}

cmd_exec() {
    [ $# -ge 2 ] || die "usage: exec NODE COMMAND..."
    local node=$1 flags=()
    shift
    if [ -t 0 ] && [ -t 1 ]; then flags+=(-it); fi
    engine exec "${flags[@]}" "$(container_of "$node")" "$@"
}

cmd_down() {
    [ $# -eq 0 ] || die "down takes no arguments"
    local names
    names=$(cluster_containers)
    # shellcheck disable=SC2086  # one container name per word
    [ -z "$names" ] || engine rm -f $names >/dev/null
    if engine network inspect "$NETWORK" >/dev/null 2>&1; then engine network rm "$NETWORK" >/dev/null; fi
    remove_state
    say "cluster '$CLUSTER' removed (${names:+containers $(paste -sd' ' <<< "$names"), }network, keys); kept $DATA_DIR and $RUNS_DIR"
}

cmd_keys() {
    [ $# -ge 2 ] || die "usage: keys HEAD_NODE COMPUTE_NODE... (the names the nodes reach each other by)"
    require_image
    make_keys "$@"
    say "keys for $* in $STATE (ssh port $(ssh_port)): start the nodes with docker/docker-compose.yml, or copy this folder to the same path on every server and run 'node NAME' there"
}

cmd_node() {
    require_cluster
    [ $# -eq 1 ] || die "usage: node NODE (this server's name, one of: $(nodes | tr '\n' ' '))"
    local node=$1 container deadline
    nodes | grep -qxF "$node" || die "'$node' is not a node of cluster '$CLUSTER' ($(nodes | tr '\n' ' ')); see $STATE/nodes"
    [ -d "$STATE/hosts/$node" ] || die "no host key for $node in $STATE/hosts: copy the whole folder made by 'keys'"
    require_image
    container=$(container_of "$node")
    ! engine inspect "$container" >/dev/null 2>&1 || die "container $container exists already; 'down' first"
    # The host's network: MPI opens ports of its own between nodes; sshd listens on the
    # cluster's ssh port (not 22 when the server runs its own sshd).
    start_node "$node" --network host
    deadline=$((SECONDS + SSH_WAIT_SECONDS))
    until engine exec "$container" ssh -o ConnectTimeout=2 -o "HostKeyAlias=$node" 127.0.0.1 true 2>/dev/null; do
        if ! is_running "$container" || [ "$SECONDS" -ge "$deadline" ]; then
            engine logs "$container" >&2 || true
            die "node $node's sshd did not come up on port $(ssh_port) (its log is above)"
        fi
        sleep 1
    done
    say "node $node is up (container $container, sshd on port $(ssh_port) of this server)"
}

# The apt mirror this machine uses (first Debian archive in its sources), for debootstrap.
debian_mirror() {
    local sources=(/etc/apt/sources.list /etc/apt/sources.list.d/*)
    grep -hoE 'https?://[^ ]*/debian/?( |$)' "${sources[@]}" 2>/dev/null | head -n 1 | tr -d ' ' \
        || true
}

cmd_base_image() {
    [ $# -le 1 ] || die "usage: base-image [IMAGE]"
    local image=${1:-fedml-debian:bookworm}
    local suite=${FEDML_DEBIAN_SUITE:-bookworm}
    local cache=${FEDML_DOCKER_CACHE:-/var/tmp/fedml-docker-cache}
    local tarball=$cache/debian-$suite-minbase.tar
    if [ ! -f "$tarball" ]; then
        [ "$(id -u)" = 0 ] || die "debootstrap needs root"
        command -v debootstrap >/dev/null 2>&1 || die "debootstrap not found (apt-get install debootstrap)"
        local mirror=${FEDML_DEBIAN_MIRROR:-$(debian_mirror)}
        mirror=${mirror:-http://deb.debian.org/debian}
        mkdir -p "$cache"
        local rootfs
        rootfs=$(mktemp -d "$cache/rootfs.XXXXXX")
        say "debootstrap $suite from $mirror (a few minutes; cached in $tarball)"
        if ! debootstrap --variant=minbase \
                --include=python3,python3-venv,openssh-server,openssh-client,ca-certificates \
                "$suite" "$rootfs" "$mirror" > "$cache/debootstrap.log" 2>&1; then
            tail -n 20 "$cache/debootstrap.log" >&2
            rm -rf "$rootfs"
            die "debootstrap failed (log: $cache/debootstrap.log)"
        fi
        # Nothing of this machine's and no secret goes into the image: openssh-server's
        # install generated host keys; debootstrap copied this machine's resolv.conf and
        # hostname; apt's lists and packages are caches.
        rm -rf "$rootfs"/etc/ssh/ssh_host_* "$rootfs"/etc/resolv.conf "$rootfs"/etc/hostname \
               "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb
        tar --numeric-owner -C "$rootfs" -cf "$tarball.tmp" .
        mv "$tarball.tmp" "$tarball"
        rm -rf "$rootfs"
    fi
    engine import --change 'CMD ["/bin/bash"]' "$tarball" "$image" >/dev/null
    say "imported $image from $tarball"
}

# -- main ------------------------------------------------------------------------------------

[ $# -ge 1 ] || usage
COMMAND=$1
shift
case "$COMMAND" in
    -h|--help|help) usage 0 ;;
    build|up|run|hostfile|exec|down|keys|node|base-image) ;;
    *) echo "docker_cluster: unknown command '$COMMAND'" >&2; usage ;;
esac
detect_engine
DATA_DIR=${FEDML_DATA_DIR:-$ROOT/data}
RUNS_DIR=${FEDML_RUNS_DIR:-$ROOT/runs}
"cmd_${COMMAND//-/_}" "$@"
