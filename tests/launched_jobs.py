"""Runs of the real launcher (launch_fedavg.sh) on the tiny federation, and what tests
look at while and after they run."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Union

from conftest import REPO_ROOT, descendant_pids, mpi_env, mpirun_path

LAUNCHER = REPO_ROOT / "fedml_experiments" / "distributed" / "launch_fedavg.sh"
TINY_MAIN = REPO_ROOT / "tests" / "programs" / "tiny_main.py"


def launch(experiment: Path, clients: int, per_round: int, rounds: int, run_dir: Path, *extra: str,
           grace: int = 15, background: bool = False, env: Optional[Dict[str, str]] = None,
           timeout: float = 600) -> Union[subprocess.Popen, subprocess.CompletedProcess]:
    """``sh launch_fedavg.sh EXPERIMENT CLIENTS PER_ROUND ROUNDS --data_path ... --run_dir RUN_DIR *extra``,
    as scripts and CI run it: under ``sh``, with no terminal (a session of its own), no stdin.

    background: return the Popen (stdout and stderr merged) instead of waiting.
    """
    environment = mpi_env()
    environment.update(PYTHON=sys.executable, MPIRUN=mpirun_path(), FEDML_EXIT_GRACE=str(grace), **(env or {}))
    cmd = ["sh", str(LAUNCHER), str(experiment), str(clients), str(per_round), str(rounds),
           "--data_path", str(experiment / "data"), "--run_dir", str(run_dir), "--wandb_mode", "disabled", *extra]
    if background:
        return subprocess.Popen(cmd, env=environment, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
    return subprocess.run(cmd, env=environment, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=timeout, start_new_session=True)


def records(run_dir: Path) -> List[dict]:
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


def wait_for_rounds(job: subprocess.Popen, run_dir: Path, count: int, timeout: float = 600) -> None:
    """Wait until ``count`` rounds are in ``metrics.jsonl`` (the job must still be running)."""
    deadline = time.monotonic() + timeout
    while len(records(run_dir)) < count:
        assert job.poll() is None, f"the job ended before round {count}: {job.communicate()[0][-3000:]}"
        assert time.monotonic() < deadline, f"{count} rounds not done in {timeout} s"
        time.sleep(0.05)
