#!/bin/sh
# Entry point of a fedml-mpi node. Without arguments: check that the cluster's keys are
# mounted, then run sshd (key-only, docker/sshd_config) in the foreground. With
# arguments: run them instead (e.g. a shell, or docker/cluster_keys.sh).
#
# Mounted at start, never in the image (scripts/docker_cluster.sh does this):
#   /etc/fedml/ssh/        id_ed25519 (the cluster key), authorized_keys, known_hosts
#   /etc/fedml/host-keys/  ssh_host_ed25519_key(.pub): this node's sshd host key
# FEDML_SSH_PORT (default 22): the port every node's sshd listens on and ssh connects to.
set -eu

[ $# -eq 0 ] || exec "$@"

PORT=${FEDML_SSH_PORT:-22}
fail() {
    echo "fedml node: $*" >&2
    echo "fedml node: start nodes with scripts/docker_cluster.sh (up, or keys + node), which generates and mounts the keys; see docs/DEPLOYMENT.md" >&2
    exit 1
}
case "$PORT" in ''|*[!0-9]*) fail "FEDML_SSH_PORT must be a port number, got '$PORT'" ;; esac
for file in /etc/fedml/host-keys/ssh_host_ed25519_key /etc/fedml/ssh/id_ed25519 \
            /etc/fedml/ssh/authorized_keys /etc/fedml/ssh/known_hosts; do
    [ -s "$file" ] || fail "$file is missing"
done

# ssh from this node (mpirun, and Open MPI's daemons as they spread the job) uses the
# cluster key and trusts exactly the cluster's host keys: no prompt, no trust on first use.
mkdir -p /root/.ssh
chmod 700 /root/.ssh
cat > /root/.ssh/config <<CONFIG
Host *
    User root
    Port $PORT
    IdentityFile /etc/fedml/ssh/id_ed25519
    IdentitiesOnly yes
    UserKnownHostsFile /etc/fedml/ssh/known_hosts
    GlobalKnownHostsFile /dev/null
    StrictHostKeyChecking yes
    BatchMode yes
    ConnectTimeout 10
    LogLevel ERROR
CONFIG

# sshd's privilege-separation directory; Debian creates it only when its service starts.
mkdir -p /run/sshd
exec /usr/sbin/sshd -D -e -f /etc/fedml/sshd_config -o "Port=$PORT"
