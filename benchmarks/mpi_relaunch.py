"""How an MPI benchmark runs itself: re-executed under mpirun with a real run's flags."""
from __future__ import annotations

import os
import subprocess
import sys

CHILD_ENV = "FEDML_BENCH_MPI_CHILD"


def is_mpi_child() -> bool:
    """True inside the ranks that :func:`relaunch_under_mpirun` started."""
    return os.environ.get(CHILD_ENV) == "1"


def relaunch_under_mpirun(num_ranks: int, script: str) -> int:
    """Run ``script`` (with this process's arguments) on ``num_ranks`` local ranks, with the
    flags and environment launch_fedavg.sh gives a real run; returns mpirun's exit status."""
    mpirun = os.path.join(os.path.dirname(sys.executable), "mpirun")
    command = [mpirun, "-np", str(num_ranks), "--oversubscribe", "--bind-to", "none", "--with-ft", "ulfm",
               "-x", "THP_MEM_ALLOC_ENABLE", "-x", CHILD_ENV]
    if os.geteuid() == 0:
        command.append("--allow-run-as-root")
    command += [sys.executable, os.path.abspath(script), *sys.argv[1:]]
    env = {**os.environ, CHILD_ENV: "1", "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE", "1")}
    return subprocess.call(command, env=env)
