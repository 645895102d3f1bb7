"""A full disk (a small tmpfs that fills up for real) stops a run with an error naming
ENOSPC and the file that could not be written, never with a traceback."""
import errno
import json
import os
import re
import threading
import time

import pytest
import torch

import fedml_api.utils.run_recorder as run_recorder
from conftest import fill_filesystem
from fedml_api.distributed.fedavg.checkpoint import load_checkpoint
from fedml_api.utils.durable_file import FileWriteError
from fedml_api.utils.run_recorder import RunRecorder
from test_fedavg_protocol import run_federation
from tiny_federation import TinyTrainer


def test_a_round_record_that_does_not_fit_raises_an_error_naming_metrics_jsonl(small_tmpfs):
    run_dir = small_tmpfs("1m")
    recorder = RunRecorder(str(run_dir))
    fill_filesystem(run_dir)
    metrics = run_dir / "metrics.jsonl"
    with pytest.raises(FileWriteError, match=rf"^could not write {re.escape(str(metrics))}: ENOSPC \(No space left on device\)$"):
        recorder.log_round({"round": 0, "sampled_clients": [1]})
    recorder.close()  # quietly: the record it still holds already stopped the run


def test_a_resumed_runs_records_that_do_not_fit_raise_an_error_naming_metrics_jsonl_and_close_it(small_tmpfs):
    run_dir = small_tmpfs("1m")
    fill_filesystem(run_dir)
    metrics = run_dir / "metrics.jsonl"
    with pytest.raises(FileWriteError, match=rf"^could not write {re.escape(str(metrics))}: ENOSPC \(No space left on device\)$") as raised:
        RunRecorder(str(run_dir), previous_records=[{"round": r} for r in range(1000)])
    # Closed at once, though the error (``raised``, which stops the run) still refers to the recorder.
    assert raised.value.__traceback__ is not None and str(metrics) not in open_files()


def open_files() -> list:
    """The files this process has open."""
    paths = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            paths.append(os.readlink(f"/proc/self/fd/{fd}"))
        except FileNotFoundError:  # listdir's own descriptor, closed since
            pass
    return paths


def test_final_files_that_do_not_fit_raise_an_error_naming_them(small_tmpfs, monkeypatch):
    run_dir = small_tmpfs("1m")
    recorder = RunRecorder(str(run_dir))
    filler = fill_filesystem(run_dir)
    with pytest.raises(FileWriteError, match=rf"^could not write {re.escape(str(run_dir / 'final_model.pt'))}: ENOSPC "):
        recorder.finish({"w": torch.zeros(10_000)}, wall_seconds=1.0)
    filler.unlink()

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(run_recorder.json, "dump", full_disk)
    with pytest.raises(FileWriteError, match=rf"^could not write {re.escape(str(run_dir / 'summary.json'))}: ENOSPC "):
        RunRecorder(str(run_dir)).finish({"w": torch.zeros(10)}, wall_seconds=1.0)


def test_a_full_disk_during_a_round_stops_the_server_cleanly_and_releases_every_client(small_tmpfs, capfd):
    root = small_tmpfs("3m")
    filling = threading.Lock()  # taken by the first client to train, never released

    class DiskFillingTrainer(TinyTrainer):
        """The first local training fills the run's filesystem (as another program would)."""

        def train(self, device, args, train_path):
            if filling.acquire(blocking=False):  # once: a second filler would truncate the first
                fill_filesystem(root)
            super().train(device, args, train_path)

    # No checkpoint before the last round: round 0's record is the first write that needs space.
    _, run_dir, errors = run_federation(root, clients=2, per_round=2, rounds=3, extra=["--checkpoint_every", "100"],
                                        trainer_factory=DiskFillingTrainer)
    assert list(errors) == [0], errors  # the clients were released and ended normally
    assert isinstance(errors[0], SystemExit)
    assert re.fullmatch(rf"FedAvg stopped: could not write {re.escape(str(run_dir / 'metrics.jsonl'))}: "
                        r"ENOSPC \(No space left on device\)", str(errors[0].code))
    stderr = capfd.readouterr().err
    assert "Traceback" not in stderr, stderr  # server.log's failed lines are reported in one line
    assert f"could not write {run_dir / 'server.log'}: ENOSPC (No space left on device); some lines will be missing from it" in stderr


def test_a_last_checkpoint_that_cannot_be_written_stops_the_server_cleanly_after_the_run(tmp_path, monkeypatch):
    import fedml_api.distributed.fedavg.checkpoint as checkpoint_module

    def full_disk(run_dir, checkpoint, check_previous=False):
        raise OSError(errno.ENOSPC, "No space left on device", f"{run_dir}/checkpoint.pt.partial")

    # The only checkpoint is the last round's, so its error is raised when the run ends.
    monkeypatch.setattr(checkpoint_module, "save_checkpoint", full_disk)
    _, run_dir, errors = run_federation(tmp_path, clients=2, per_round=2, rounds=1)
    assert list(errors) == [0], errors
    assert str(errors[0].code) == (f"FedAvg stopped: could not write the checkpoint {run_dir / 'checkpoint.pt'}: ENOSPC (No space left "
                                   f"on device): {run_dir / 'checkpoint.pt.partial'}; no checkpoint was written before")
    assert (run_dir / "server.log").read_text().splitlines()[-1].endswith(f"ERROR {errors[0].code}")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["status"], "FedAvg stopped: " + summary["stopped"]) == ("stopped", errors[0].code)


SCAFFOLD = ["--federated_optimizer", "SCAFFOLD"]


def test_a_client_state_that_does_not_fit_stops_the_server_naming_the_file_and_the_run_resumes_bit_exactly(small_tmpfs, tmp_path, capfd):
    _, full_dir, errors = run_federation(tmp_path / "full", clients=2, per_round=2, rounds=3, extra=SCAFFOLD, lr=0.1)
    assert not errors
    root = small_tmpfs("3m")
    run_dir = root / "run"
    filling = threading.Lock()  # taken by the first client to start round 1, never released

    class DiskFillingTrainer(TinyTrainer):
        """Round 1's first local training fills the run's filesystem, once round 0's
        checkpoint is on it: SCAFFOLD's control variate of round 1 is the first write
        that needs space."""

        trained = 0

        def train(self, device, args, train_path):
            self.trained += 1
            if self.trained == 2 and filling.acquire(blocking=False):
                deadline = time.monotonic() + 600
                while not (run_dir / "checkpoint.pt").exists() and time.monotonic() < deadline:
                    time.sleep(0.05)
                fill_filesystem(root)
            super().train(device, args, train_path)

    _, _, errors = run_federation(root, clients=2, per_round=2, rounds=3, extra=SCAFFOLD, trainer_factory=DiskFillingTrainer, lr=0.1)
    assert list(errors) == [0], errors  # the clients were released and ended normally
    state = run_dir / "client_state" / "scaffold" / "0"
    assert re.fullmatch(rf"FedAvg stopped: could not write {re.escape(str(state))}/[12]-1\.pt: ENOSPC \(No space left on device\)",
                        str(errors[0].code))
    assert "Traceback" not in capfd.readouterr().err
    assert not list(state.glob("*.partial"))  # a half-written file would hold space the log needs
    assert load_checkpoint(str(run_dir)).round_idx == 0

    (root / "filler").unlink()
    _, resumed_dir, errors = run_federation(tmp_path / "resumed", clients=2, per_round=2, rounds=3,
                                            extra=[*SCAFFOLD, "--resume", str(run_dir)], lr=0.1)
    assert not errors
    full, resumed = torch.load(full_dir / "final_model.pt"), torch.load(resumed_dir / "final_model.pt")
    assert all(torch.equal(full[key], resumed[key]) for key in full)


def test_a_resume_whose_client_states_do_not_fit_in_the_new_run_directory_stops_naming_the_file(small_tmpfs, tmp_path, capfd):
    _, first_dir, errors = run_federation(tmp_path / "first", clients=2, per_round=2, rounds=1, extra=SCAFFOLD, lr=0.1)
    assert not errors
    root = small_tmpfs("1m")  # another filesystem: the states are copied, not linked
    fill_filesystem(root)
    run_dir = tmp_path / "resumed" / "run"
    os.makedirs(run_dir.parent)
    os.symlink(root, run_dir)
    _, _, errors = run_federation(tmp_path / "resumed", clients=2, per_round=2, rounds=2,
                                  extra=[*SCAFFOLD, "--resume", str(first_dir)], lr=0.1)
    assert list(errors) == [0], errors
    assert re.fullmatch(rf"FedAvg stopped: could not write {re.escape(str(run_dir))}/client_state/scaffold/0/[12]-0\.pt: "
                        r"ENOSPC \(No space left on device\)", str(errors[0].code))
    assert "Traceback" not in capfd.readouterr().err
    assert not list(root.glob("client_state/scaffold/0/*.partial"))
    assert sorted(p.name for p in (first_dir / "client_state" / "scaffold" / "0").iterdir()) == ["1-0.pt", "2-0.pt"]
