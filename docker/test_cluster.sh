#!/usr/bin/env bash
# End-to-end test of the container deployment, for real, on this machine:
#   1. a base image (unless BASE_IMAGE is given: a Debian made with debootstrap, cached),
#   2. the image, built by scripts/docker_cluster.sh build, and checked in every layer for
#      private keys and a root password (docker/scan_image.py),
#   3. a cluster: 1 head + 3 compute containers (docker_cluster.sh up 3),
#   4. ssh: sshd's effective settings; a password login is refused even with root's right
#      password (which an sshd allowing passwords accepts: the control); a foreign key is
#      refused; the cluster key logs in, from this machine and between all nodes,
#   5. a 3-client FedAvg run (fedResNet18 on scikit-learn's digits) launched from the head
#      node with mpirun over ssh: exit 0, every round in metrics.jsonl, each client on its
#      own compute container,
#   6. everything removed (containers, network, keys, images, files), on failure too.
#
#   bash docker/test_cluster.sh          (as root; prints PASS and exits 0, or names the failed check)
#
# Heavy (an image build, four containers), so opt-in: not part of scripts/run_tests.sh.
# Recorded output and timings: docs/DEPLOYMENT.md. Needs root (debootstrap, and ssh from
# here to the containers' addresses), podman or docker, ssh, ssh-keygen, sshpass, python3.
# Environment: scripts/docker_cluster.sh's (FEDML_ENGINE, PODMAN_RUNTIME, ...), and
#   BASE_IMAGE             build on this image instead of the debootstrap one
#   FEDML_TEST_TORCH       torch requirements installed first (TORCH_REQUIREMENTS; default: none,
#                          requirements.txt decides). For a smaller CPU-only image where PyTorch's
#                          CPU index is reachable: FEDML_TEST_TORCH="torch torchvision" and
#                          PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu
#   FEDML_TEST_WHEELHOUSE  folder of wheels to build from (default: made once with pip download
#                          into FEDML_DOCKER_CACHE); "none": the build installs from PyPI itself
#   FEDML_TEST_KEEP_IMAGE  1: keep the built image (and base) for faster re-runs
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CLUSTER_SH=$ROOT/scripts/docker_cluster.sh
CACHE=${FEDML_DOCKER_CACHE:-/var/tmp/fedml-docker-cache}
TORCH=${FEDML_TEST_TORCH:-}
CLIENTS=3
ROUNDS=3

export FEDML_CLUSTER=fedml-e2e FEDML_IMAGE=localhost/fedml-mpi:e2e-test
WORK=$(mktemp -d /var/tmp/fedml-e2e.XXXXXX)
export FEDML_CLUSTER_DIR=$WORK/cluster FEDML_DATA_DIR=$WORK/data FEDML_RUNS_DIR=$WORK/runs
export FEDML_GPUS=none FEDML_SSH_PORT=22

START=$SECONDS
step() { echo "== [$((SECONDS - START)) s] $*"; }
fail() { echo "FAIL: $*" >&2; exit 1; }
ok() { echo "   ok: $*"; }

case "${FEDML_ENGINE:-}" in
    docker|podman) ENGINE=("$FEDML_ENGINE") ;;
    "") if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then ENGINE=(docker); else ENGINE=(podman); fi ;;
    *) fail "FEDML_ENGINE must be docker or podman" ;;
esac
[ -z "${PODMAN_RUNTIME:-}" ] || ENGINE+=(--runtime "$PODMAN_RUNTIME")
engine() { "${ENGINE[@]}" "$@"; }

BASE_IMPORTED=""
cleanup() {
    local status=$?
    trap - EXIT
    step "cleanup"
    bash "$CLUSTER_SH" down || status=1
    if [ "${FEDML_TEST_KEEP_IMAGE:-0}" != 1 ]; then
        engine rmi -f "$FEDML_IMAGE" >/dev/null 2>&1 || true
        [ -z "$BASE_IMPORTED" ] || engine rmi -f "$BASE_IMPORTED" >/dev/null 2>&1 || true
    fi
    local left
    left=$(engine ps -a --filter "label=fedml.cluster=$FEDML_CLUSTER" --format '{{.Names}}')
    [ -z "$left" ] || { echo "FAIL: containers left after cleanup: $left" >&2; status=1; }
    if engine network inspect "$FEDML_CLUSTER-net" >/dev/null 2>&1; then
        echo "FAIL: network $FEDML_CLUSTER-net left after cleanup" >&2
        status=1
    fi
    rm -rf "$WORK"
    if [ "$status" = 0 ]; then
        echo "PASS: docker/test_cluster.sh in $((SECONDS - START)) s; nothing left behind"
    else
        echo "FAILED (exit $status) after $((SECONDS - START)) s; cleaned up" >&2
    fi
    exit "$status"
}
trap cleanup EXIT

[ "$(id -u)" = 0 ] || fail "run as root (debootstrap, and ssh from here to the containers' addresses)"
for tool in ssh ssh-keygen sshpass python3; do
    command -v "$tool" >/dev/null 2>&1 || fail "'$tool' not found (Debian: apt-get install openssh-client sshpass python3)"
done
step "engine: ${ENGINE[*]} ($(engine --version))"

# -- 1. base image -----------------------------------------------------------------------
if [ -z "${BASE_IMAGE:-}" ]; then
    BASE_IMAGE=localhost/fedml-debian:e2e-test
    step "base image $BASE_IMAGE (debootstrap, cached in $CACHE)"
    bash "$CLUSTER_SH" base-image "$BASE_IMAGE"
    BASE_IMPORTED=$BASE_IMAGE
fi
export BASE_IMAGE

# -- 2. image ----------------------------------------------------------------------------
export TORCH_REQUIREMENTS=$TORCH
if [ "${FEDML_TEST_WHEELHOUSE:-}" != none ]; then
    if [ -z "${FEDML_TEST_WHEELHOUSE:-}" ]; then
        # The wheels must fit the image's python: pip here downloads for this python.
        image_py=$(engine run --rm --network none "$BASE_IMAGE" python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
        host_py=$(python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
        [ "$image_py" = "$host_py" ] || fail "the base image has python $image_py, python3 here is $host_py: set FEDML_TEST_WHEELHOUSE (or none)"
        key=$( (cat "$ROOT/requirements.txt"; echo "$TORCH $host_py") | sha256sum | cut -c1-12)
        FEDML_TEST_WHEELHOUSE=$CACHE/wheelhouse-py$host_py-$key
        if [ ! -d "$FEDML_TEST_WHEELHOUSE" ]; then
            step "wheelhouse $FEDML_TEST_WHEELHOUSE (pip download, once)"
            rm -rf "$FEDML_TEST_WHEELHOUSE.tmp"
            # shellcheck disable=SC2086  # TORCH is a list of requirements
            python3 -m pip download --quiet --only-binary=:all: -d "$FEDML_TEST_WHEELHOUSE.tmp" \
                $TORCH -r "$ROOT/requirements.txt"
            mv "$FEDML_TEST_WHEELHOUSE.tmp" "$FEDML_TEST_WHEELHOUSE"
        fi
    fi
    export FEDML_WHEELHOUSE=$FEDML_TEST_WHEELHOUSE
fi
step "build $FEDML_IMAGE on $BASE_IMAGE (torch: ${TORCH:-as requirements.txt says}; wheels: ${FEDML_WHEELHOUSE:-from the index})"
bash "$CLUSTER_SH" build > "$WORK/build.log" 2>&1 || { tail -n 40 "$WORK/build.log" >&2; fail "image build (log above)"; }
tail -n 3 "$WORK/build.log"
engine image inspect --format '   image size: {{.Size}} bytes' "$FEDML_IMAGE"

step "scan every layer of the image for private keys and a root password"
# The control: an archive in save's layout with each kind of secret must be rejected.
control=$WORK/scan-control
mkdir -p "$control/l1/etc/ssh" "$control/l1/root/.ssh" "$control/l2/etc"
ssh-keygen -q -t ed25519 -N "" -f "$control/l1/root/.ssh/id_ed25519"
: > "$control/l1/etc/ssh/ssh_host_ed25519_key"
# shellcheck disable=SC2016  # a literal crypt hash
echo 'root:$y$j9T$salt$hash:19000:0:99999:7:::' > "$control/l2/etc/shadow"
tar -C "$control/l1" -cf "$control/1.tar" . && tar -C "$control/l2" -cf "$control/2.tar" .
tar -C "$control" -cf "$control/image.tar" 1.tar 2.tar
if python3 "$ROOT/docker/scan_image.py" < "$control/image.tar" 2> "$control/findings"; then
    fail "control: scan_image.py passed an archive holding secrets"
fi
[ "$(grep -c FOUND "$control/findings")" = 3 ] || { cat "$control/findings" >&2; fail "control: expected 3 findings"; }
ok "control: an archive with a private key, a host key and a root password hash is rejected (3 findings)"
engine save "$FEDML_IMAGE" | python3 "$ROOT/docker/scan_image.py" || fail "the image holds a secret (findings above)"
ok "no private key, no ssh host key, no root password in any layer"

# -- 3. cluster --------------------------------------------------------------------------
step "up $CLIENTS: headnode + computenode1..$CLIENTS"
bash "$CLUSTER_SH" up "$CLIENTS"
engine ps --filter "label=fedml.cluster=$FEDML_CLUSTER" --format '   {{.Names}}  {{.Status}}'
KEY=$FEDML_CLUSTER_DIR/ssh/id_ed25519
KNOWN=$FEDML_CLUSTER_DIR/ssh/known_hosts
c() { echo "$FEDML_CLUSTER-$1"; }
ip_of() { engine inspect -f '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}' "$(c "$1")"; }

# -- 4. ssh ------------------------------------------------------------------------------
step "ssh: sshd's effective settings on every node"
for node in headnode $(seq -f 'computenode%g' 1 "$CLIENTS"); do
    settings=$(engine exec "$(c "$node")" /usr/sbin/sshd -T -f /etc/fedml/sshd_config)
    for want in "passwordauthentication no" "kbdinteractiveauthentication no" "permitemptypasswords no" \
                "permitrootlogin without-password" "pubkeyauthentication yes" "usepam no"; do
        grep -qx "$want" <<< "$settings" || fail "$node: sshd -T lacks '$want'"
    done
done
ok "PasswordAuthentication no, KbdInteractiveAuthentication no, PermitRootLogin prohibit-password, PubkeyAuthentication yes"

IP1=$(ip_of computenode1)
[ -n "$IP1" ] || fail "no address for computenode1"
PASSWORD=e2e-$RANDOM-$RANDOM
step "ssh: password login to computenode1 ($IP1) with root's right password"
# For this check only, root gets a real password in the running container (the image
# has none), and a second sshd that allows passwords serves as the control.
engine exec "$(c computenode1)" sh -c "echo 'root:$PASSWORD' | chpasswd"
engine exec -d "$(c computenode1)" /usr/sbin/sshd -D -f /etc/fedml/sshd_config -o Port=2200 \
    -o PasswordAuthentication=yes -o PermitRootLogin=yes -o PidFile=/run/sshd-control.pid >/dev/null
password_login() {  # PORT: exit status of a password-only login, its stderr in $WORK/password.err
    sshpass -p "$PASSWORD" ssh -p "$1" -o PreferredAuthentications=password,keyboard-interactive \
        -o PubkeyAuthentication=no -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null \
        -o NumberOfPasswordPrompts=1 -o ConnectTimeout=5 -o LogLevel=ERROR \
        "root@$IP1" true 2> "$WORK/password.err"
}
for _ in $(seq 20); do password_login 2200 && break; sleep 0.5; done
password_login 2200 || { cat "$WORK/password.err" >&2; fail "control: the password was refused by an sshd that allows passwords"; }
ok "control: that password logs in to an sshd that allows passwords (port 2200)"
if password_login 22; then fail "password login to the cluster's sshd succeeded"; fi
echo "   ssh said: $(cat "$WORK/password.err")"
grep -q "Permission denied (publickey)" "$WORK/password.err" || fail "expected 'Permission denied (publickey)', got: $(cat "$WORK/password.err")"
ok "the cluster's sshd refuses it: publickey is the only method it offers"
# shellcheck disable=SC2016  # expanded in the container
engine exec "$(c computenode1)" sh -c 'kill "$(cat /run/sshd-control.pid)" && usermod -p "*" root'

step "ssh: a key that is not the cluster's"
ssh-keygen -q -t ed25519 -N "" -f "$WORK/foreign_key"
if ssh -i "$WORK/foreign_key" -o IdentitiesOnly=yes -o BatchMode=yes -o UserKnownHostsFile="$KNOWN" \
        -o HostKeyAlias=computenode1 -o StrictHostKeyChecking=yes "root@$IP1" true 2> "$WORK/foreign.err"; then
    fail "a foreign key logged in"
fi
grep -q "Permission denied" "$WORK/foreign.err" || fail "expected 'Permission denied', got: $(cat "$WORK/foreign.err")"
ok "refused: $(cat "$WORK/foreign.err")"

step "ssh: the cluster key, from this machine (host key checked against the cluster's known_hosts)"
got=$(ssh -i "$KEY" -o IdentitiesOnly=yes -o BatchMode=yes -o UserKnownHostsFile="$KNOWN" \
        -o HostKeyAlias=computenode1 -o StrictHostKeyChecking=yes "root@$IP1" hostname)
[ "$got" = computenode1 ] || fail "ssh with the cluster key ran hostname and got '$got'"
ok "ssh root@$IP1 hostname -> $got"

step "ssh: the cluster key, between nodes (head -> every compute node, compute -> compute)"
for node in $(seq -f 'computenode%g' 1 "$CLIENTS"); do
    # shellcheck disable=SC2016  # expanded on the node, in the ssh session
    got=$(engine exec "$(c headnode)" ssh "$node" 'echo "$(hostname) $(command -v python3) $(command -v mpirun)"')
    [ "$got" = "$node /opt/venv/bin/python3 /opt/venv/bin/mpirun" ] || fail "headnode -> $node: got '$got'"
    ok "headnode -> ssh $node -> $got"
done
got=$(engine exec "$(c computenode1)" ssh computenode2 hostname)
[ "$got" = computenode2 ] || fail "computenode1 -> computenode2: got '$got'"
ok "computenode1 -> ssh computenode2 -> $got"

# -- 5. a federated run across the containers ---------------------------------------------
step "split scikit-learn's digits over $CLIENTS clients into /data (on the head node)"
bash "$CLUSTER_SH" exec headnode python scripts/split_dataset.py --dataset digits \
    --out /data/digits_${CLIENTS}clients --clients "$CLIENTS" --partition iid --seed 0 > "$WORK/split.log" 2>&1 \
    || { cat "$WORK/split.log" >&2; fail "split_dataset.py"; }

step "run fedResNet18 $CLIENTS $CLIENTS $ROUNDS from the head node (mpirun over ssh to the compute nodes)"
run_status=0
bash "$CLUSTER_SH" run fedResNet18 "$CLIENTS" "$CLIENTS" "$ROUNDS" --dataset digits \
    --data_path "/data/digits_${CLIENTS}clients" --resnet_width 8 --epochs 1 --batch_size 32 \
    --run_dir /runs/e2e --wandb_mode disabled > "$WORK/run.log" 2>&1 || run_status=$?
grep -E "wrote /var/lib/fedml|checked .* hosts|process [0-9]+ of|round [0-9]+/|run finished|Traceback|rror" "$WORK/run.log" | cut -c1-200 | head -n 40
[ "$run_status" = 0 ] || { tail -n 40 "$WORK/run.log" >&2; fail "the run exited $run_status"; }
ok "the run exited 0"
echo "   mpi_host_file:"
sed 's/^/     /' "$FEDML_CLUSTER_DIR/mpi_host_file"
for ((p = 0; p <= CLIENTS; p++)); do
    if [ "$p" = 0 ]; then host=headnode; else host=computenode$p; fi
    grep -q "process $p of $((CLIENTS + 1)) on host $host " "$WORK/run.log" || fail "no 'process $p of $((CLIENTS + 1)) on host $host' in the run's log"
done
ok "process 0 ran on headnode, process i on computenode i (i = 1..$CLIENTS)"
python3 - "$FEDML_RUNS_DIR/e2e" "$ROUNDS" <<'PY' || fail "the run's outputs"
import json, os, sys
run_dir, rounds = sys.argv[1], int(sys.argv[2])
records = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
assert [r["round"] for r in records] == list(range(rounds)), f"rounds in metrics.jsonl: {[r['round'] for r in records]}"
assert "test" in records[-1], "the last round has no test metrics"
for name in ("server.log", "summary.json", "final_model.pt"):
    assert os.path.exists(os.path.join(run_dir, name)), f"{name} missing"
print("   ok: metrics.jsonl has rounds", [r["round"] for r in records],
      "test accuracy", [round(r["test"]["accuracy"], 3) for r in records if "test" in r],
      "round seconds", [round(r["round_seconds"], 2) for r in records])
PY
# The EXIT trap (cleanup) now runs `down`, removes the images and checks nothing is left.
