"""The server's checkpoint: bit-exact on disk, written in the background, never lost."""
import errno
import fcntl
import time

import numpy as np
import pytest
import torch

import fedml_api.utils.durable_file as durable_file_module
from fedml_api.utils.durable_file import DirectFile, durable_file

from fedml_api.distributed.fedavg.checkpoint import CheckpointWriter, ServerCheckpoint, load_checkpoint, save_checkpoint
from fedml_core.distributed.communication.packed_tensors import PackedTensors


def _state() -> dict:
    g = torch.Generator().manual_seed(0)
    return {
        "w": torch.randn(3, 4, generator=g),
        "bn.num_batches_tracked": torch.tensor(7),
        "half": torch.randn(5, generator=g).half(),
        "mask": torch.tensor([True, False]),
    }


def _checkpoint(round_idx: int, model: dict) -> ServerCheckpoint:
    return ServerCheckpoint(round_idx=round_idx, global_model=model, failed_clients={3: "its process died"},
                            records=[{"round": round_idx}], seed=5)


@pytest.mark.parametrize("layout", ["separate tensors", "views of one packed buffer"])
def test_a_checkpoint_reloads_bit_exactly(tmp_path, layout):
    state = _state()
    # A received model: every dtype's tensors are views into one shared buffer.
    model = state if layout == "separate tensors" else PackedTensors.from_tensors(state).tensors()
    save_checkpoint(str(tmp_path), _checkpoint(4, model))
    loaded = load_checkpoint(str(tmp_path))
    assert (loaded.round_idx, loaded.failed_clients, loaded.records, loaded.seed) == (4, {3: "its process died"}, [{"round": 4}], 5)
    assert list(loaded.global_model) == list(state)
    for key, value in state.items():
        assert loaded.global_model[key].dtype == value.dtype and torch.equal(loaded.global_model[key], value), key


def test_the_writer_puts_the_last_submitted_checkpoint_on_disk_and_skips_superseded_ones(tmp_path):
    built = []

    def builder(round_idx: int, delay: float = 0.0):
        def build() -> ServerCheckpoint:
            time.sleep(delay)
            built.append(round_idx)
            return _checkpoint(round_idx, _state())
        return build

    writer = CheckpointWriter(str(tmp_path))
    writer.submit(builder(0, delay=0.5))
    time.sleep(0.1)  # round 0 is being built
    for round_idx in (1, 2, 3):  # each replaces the one still waiting
        writer.submit(builder(round_idx))
    writer.close()
    assert built == [0, 3]
    assert load_checkpoint(str(tmp_path)).round_idx == 3
    assert not list(tmp_path.glob("*.partial"))


def test_a_failed_write_is_raised_to_the_caller(tmp_path):
    writer = CheckpointWriter(str(tmp_path / "missing" / "run"))
    writer.submit(lambda: _checkpoint(0, _state()))
    with pytest.raises(RuntimeError, match="could not write the checkpoint in .*missing/run: .*No such file"):
        writer.close()


def test_a_file_that_is_not_a_checkpoint_or_of_another_format_is_refused_by_name(tmp_path):
    torch.save({"w": torch.zeros(2)}, tmp_path / "weights.pt")
    with pytest.raises(ValueError, match="weights.pt is not a checkpoint of this framework"):
        load_checkpoint(str(tmp_path / "weights.pt"))
    torch.save({"format": 1, "round_idx": 0}, tmp_path / "old.pt")
    with pytest.raises(ValueError, match="old.pt has checkpoint format 1; this version reads format 2"):
        load_checkpoint(str(tmp_path / "old.pt"))


@pytest.mark.parametrize("direct", [True, False], ids=["O_DIRECT", "page cache"])
def test_a_durable_file_holds_exactly_the_bytes_written(tmp_path, monkeypatch, direct):
    if not direct:
        monkeypatch.setattr(durable_file_module, "_O_DIRECT", 0)  # as on a platform without it
    # Pieces of awkward sizes: more than one staging buffer, and an unaligned tail.
    pieces = [b"header", bytes(range(256)) * 8193, np.arange(300_001, dtype=np.float32).tobytes(), b"", b"tail"]
    path = tmp_path / "file.bin"
    with durable_file(str(path)) as f:
        if direct and not isinstance(f, DirectFile):
            pytest.skip(f"{tmp_path}'s filesystem has no O_DIRECT")
        for piece in pieces:
            assert f.write(memoryview(piece)) == len(piece)
    assert path.read_bytes() == b"".join(pieces)


def test_a_filesystem_refusing_a_direct_write_gets_the_file_through_the_page_cache(tmp_path, monkeypatch):
    refused = []
    write = durable_file_module.os.write

    def refuse_direct_writes(fd, data):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & durable_file_module._O_DIRECT:
            refused.append(len(data))
            raise OSError(errno.EINVAL, "Invalid argument")
        return write(fd, data)

    monkeypatch.setattr(durable_file_module.os, "write", refuse_direct_writes)
    data = bytes(range(256)) * 5000
    with durable_file(str(tmp_path / "file.bin")) as f:
        if not isinstance(f, DirectFile):
            pytest.skip(f"{tmp_path}'s filesystem has no O_DIRECT")
        f.write(data)
    assert refused and (tmp_path / "file.bin").read_bytes() == data


def _failing_midway(monkeypatch):
    """Make the next checkpoint write fail after 2 MiB of it reached the file."""
    save = torch.save

    def save_half_then_fail(obj, f, *args, **kwargs):
        f.write(bytes(2 << 20))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", save_half_then_fail)
    return lambda: monkeypatch.setattr(torch, "save", save)


def test_each_checkpoint_reuses_the_file_of_the_one_before_and_a_failed_write_leaves_the_last_intact(tmp_path, monkeypatch):
    for round_idx in range(3):
        save_checkpoint(str(tmp_path), _checkpoint(round_idx, _state()))
    # The one before the last is kept as the next one's disk space.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt", "checkpoint.pt.spare"]
    assert load_checkpoint(str(tmp_path / "checkpoint.pt.spare")).round_idx == 1
    restore = _failing_midway(monkeypatch)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(str(tmp_path), _checkpoint(3, _state()))
    assert load_checkpoint(str(tmp_path)).round_idx == 2
    restore()
    save_checkpoint(str(tmp_path), _checkpoint(4, _state()))
    assert load_checkpoint(str(tmp_path)).round_idx == 4


def test_a_crash_that_left_the_spare_a_second_name_of_the_checkpoint_does_not_let_it_be_overwritten(tmp_path, monkeypatch):
    save_checkpoint(str(tmp_path), _checkpoint(0, _state()))
    # As after a crash between linking the old checkpoint as the spare and the rename.
    (tmp_path / "checkpoint.pt.spare").hardlink_to(tmp_path / "checkpoint.pt")
    restore = _failing_midway(monkeypatch)
    with pytest.raises(OSError):
        save_checkpoint(str(tmp_path), _checkpoint(1, _state()))
    assert load_checkpoint(str(tmp_path)).round_idx == 0
    restore()
    save_checkpoint(str(tmp_path), _checkpoint(1, _state()))
    assert load_checkpoint(str(tmp_path)).round_idx == 1
