"""launch_fedavg.sh's own logic (options, grace period, exit status), against a fake
mpirun: quick, and no MPI needed."""
import os
import shutil
import subprocess
import time

import pytest

from launched_jobs import LAUNCHER

# The fake "mpirun": the server reports FAKE_STATUS, then one rank never exits (frozen).
FAKE_MPIRUN = """#!/bin/sh
echo started > "$FAKE_MARK"
printf '%s\\n' "${FAKE_STATUS:-0}" > "$FEDML_STATUS_FILE"
exec sleep 60
"""


@pytest.fixture
def fake(tmp_path):
    mpirun = tmp_path / "mpirun"
    mpirun.write_text(FAKE_MPIRUN)
    mpirun.chmod(0o755)
    experiment = tmp_path / "exp"
    experiment.mkdir()
    (experiment / "mpi_host_file").write_text("localhost\n")
    return mpirun, experiment, tmp_path / "started"


def run_launcher(fake, **env):
    mpirun, experiment, mark = fake
    environment = {**os.environ, "FEDML_PREFLIGHT": "0", "MPIRUN": str(mpirun), "FAKE_MARK": str(mark), **env}
    start = time.monotonic()
    result = subprocess.run(["sh", str(LAUNCHER), str(experiment), "2", "2", "1"], env=environment, stdin=subprocess.DEVNULL,
                            capture_output=True, text=True, timeout=120, start_new_session=True)
    return result, time.monotonic() - start


@pytest.mark.parametrize("grace", ["1.5", "abc", "-1", "2 "])
def test_a_bad_exit_grace_is_rejected_before_anything_is_launched(fake, grace):
    result, _ = run_launcher(fake, FEDML_EXIT_GRACE=grace)
    assert result.returncode == 2, result.stderr
    assert "FEDML_EXIT_GRACE" in result.stderr and "whole number of seconds" in result.stderr, result.stderr
    assert not fake[2].exists()  # mpirun never started


@pytest.mark.parametrize("grace", ["1", "01"])
def test_ranks_left_after_the_server_reported_are_stopped_after_the_grace_and_the_status_is_the_servers(fake, grace):
    result, seconds = run_launcher(fake, FEDML_EXIT_GRACE=grace, FAKE_STATUS="3")
    assert result.returncode == 3, result.stderr
    assert "the server finished 1 s ago" in result.stderr
    assert 1 <= seconds < 30


def test_the_grace_is_wall_time_even_when_every_poll_runs_long(fake, tmp_path):
    # On a loaded machine the launcher's 20 ms sleeps run long: here each takes 0.5 s (a
    # "sleep" first on PATH). Counted in polls, a 2 s grace would last 50 s.
    slow = tmp_path / "bin"
    slow.mkdir()
    (slow / "sleep").write_text(f'#!/bin/sh\ncase "$1" in 0.*) exec {shutil.which("sleep")} 0.5 ;; esac\n'
                                f'exec {shutil.which("sleep")} "$@"\n')
    (slow / "sleep").chmod(0o755)
    result, seconds = run_launcher(fake, FEDML_EXIT_GRACE="2", FAKE_STATUS="0", PATH=f"{slow}:{os.environ['PATH']}")
    assert result.returncode == 0, result.stderr
    assert "the server finished 2 s ago" in result.stderr
    assert 2 <= seconds < 20


@pytest.mark.parametrize("positionals", [["08", "2", "1"], ["010", "2", "1"], ["2", "2", "09"], ["0", "1", "1"]])
def test_a_positional_with_a_leading_zero_is_refused_not_read_as_octal(fake, positionals):
    mpirun, experiment, mark = fake
    environment = {**os.environ, "FEDML_PREFLIGHT": "0", "MPIRUN": str(mpirun), "FAKE_MARK": str(mark)}
    result = subprocess.run(["sh", str(LAUNCHER), str(experiment), *positionals], env=environment, stdin=subprocess.DEVNULL,
                            capture_output=True, text=True, timeout=60, start_new_session=True)
    assert result.returncode == 2 and "must be a positive integer" in result.stderr, result.stderr
    assert not mark.exists()


ARGS_MPIRUN = """#!/bin/sh
printf '%s\\n' "$@" > "$FAKE_MARK"
printf '0\\n' > "$FEDML_STATUS_FILE"
"""


def launch_with_hostfile(tmp_path, hostfile, *options):
    """The launcher with CLIENT_NUM 10, against a fake mpirun that records its arguments."""
    mpirun = tmp_path / "mpirun"
    mpirun.write_text(ARGS_MPIRUN)
    mpirun.chmod(0o755)
    experiment = tmp_path / "exp"
    experiment.mkdir()
    (experiment / "mpi_host_file").write_text(hostfile)
    mark = tmp_path / "args"
    environment = {**os.environ, "FEDML_PREFLIGHT": "0", "MPIRUN": str(mpirun), "FAKE_MARK": str(mark)}
    result = subprocess.run(["sh", str(LAUNCHER), str(experiment), "10", "4", "1", *options], env=environment,
                            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60, start_new_session=True)
    return result, mark.read_text().splitlines() if mark.exists() else None


@pytest.mark.parametrize("option", [["--worker_processes", "auto"], ["--worker_processes=auto"]])
def test_worker_processes_auto_takes_the_workers_from_the_hostfile(tmp_path, option):
    result, mpirun_args = launch_with_hostfile(tmp_path, "localhost slots=4\n", *option)
    assert result.returncode == 0, result.stderr
    assert "--worker_processes auto: 3 workers" in result.stderr
    assert mpirun_args[mpirun_args.index("-np") + 1] == "4"
    given = mpirun_args[mpirun_args.index("./main_fedavg.py"):]
    assert ("--worker_processes" in given and given[given.index("--worker_processes") + 1] == "3") or "--worker_processes=3" in given
    assert "auto" not in given


def test_worker_processes_auto_needs_a_hostfile_that_sizes_the_job(tmp_path):
    result, mpirun_args = launch_with_hostfile(tmp_path, "localhost\n", "--worker_processes", "auto")
    assert result.returncode == 2 and "does not size the job" in result.stderr, result.stderr
    assert mpirun_args is None


def test_a_worker_count_above_client_num_is_refused_before_launch(tmp_path):
    result, mpirun_args = launch_with_hostfile(tmp_path, "localhost\n", "--worker_processes", "11")
    assert result.returncode == 2 and "between 1 and CLIENT_NUM (10) or auto, got '11'" in result.stderr, result.stderr
    assert mpirun_args is None


def test_sigterm_to_the_launcher_stops_the_job_and_exits_143(tmp_path):
    mpirun = tmp_path / "mpirun"
    mpirun.write_text('#!/bin/sh\necho $$ > "$FAKE_MARK"\nexec sleep 60\n')  # a job that never ends by itself
    mpirun.chmod(0o755)
    experiment = tmp_path / "exp"
    experiment.mkdir()
    (experiment / "mpi_host_file").write_text("localhost\n")
    mark = tmp_path / "pid"
    environment = {**os.environ, "FEDML_PREFLIGHT": "0", "MPIRUN": str(mpirun), "FAKE_MARK": str(mark)}
    launcher = subprocess.Popen(["sh", str(LAUNCHER), str(experiment), "2", "2", "1"], env=environment, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 60
    while not (mark.exists() and mark.read_text().strip()):
        assert time.monotonic() < deadline and launcher.poll() is None
        time.sleep(0.05)
    job = int(mark.read_text())
    launcher.send_signal(15)
    _, stderr = launcher.communicate(timeout=60)
    assert launcher.returncode == 143 and "interrupted; stopping the job" in stderr, stderr
    time.sleep(0.5)
    with pytest.raises(ProcessLookupError):
        os.kill(job, 0)
