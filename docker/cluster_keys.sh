#!/bin/sh
# Generates a cluster's ssh keys: run by scripts/docker_cluster.sh in a throwaway
# container from the image, so the files belong to the nodes' root user and the host
# needs no ssh-keygen.
#
#   sh cluster_keys.sh DIR PORT NODE...
#
# writes (everything private is 0600 in 0700 folders):
#   DIR/ssh/id_ed25519, id_ed25519.pub   the cluster key: every node logs in to every node with it
#   DIR/ssh/authorized_keys              its public half
#   DIR/ssh/known_hosts                  every node's host key under its name ([NAME]:PORT too when PORT is not 22)
#   DIR/hosts/NODE/ssh_host_ed25519_key  each node's sshd host key (and .pub)
set -eu
[ $# -ge 3 ] || { echo "usage: sh cluster_keys.sh DIR PORT NODE..." >&2; exit 2; }
DIR=$1 PORT=$2
shift 2
if [ -e "$DIR/ssh" ] || [ -e "$DIR/hosts" ]; then echo "error: $DIR already holds keys" >&2; exit 1; fi

umask 077
mkdir -p "$DIR/ssh" "$DIR/hosts"
ssh-keygen -q -t ed25519 -N "" -C "fedml-cluster" -f "$DIR/ssh/id_ed25519"
cp "$DIR/ssh/id_ed25519.pub" "$DIR/ssh/authorized_keys"
: > "$DIR/ssh/known_hosts"
for node in "$@"; do
    mkdir "$DIR/hosts/$node"
    ssh-keygen -q -t ed25519 -N "" -C "$node" -f "$DIR/hosts/$node/ssh_host_ed25519_key"
    names=$node
    [ "$PORT" = 22 ] || names="$node,[$node]:$PORT"
    echo "$names $(cut -d' ' -f1,2 "$DIR/hosts/$node/ssh_host_ed25519_key.pub")" >> "$DIR/ssh/known_hosts"
done
