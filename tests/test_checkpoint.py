"""The server's checkpoint: bit-exact on disk, written in the background, never lost,
and never trusted when damaged."""
import errno
import fcntl
import logging
import os
import pickle
import re
import time

import numpy as np
import pytest
import torch

import fedml_api.utils.durable_file as durable_file_module
from fedml_api.utils.durable_file import DirectFile, durable_file

from conftest import fill_filesystem
from fedml_api.distributed.fedavg.checkpoint import (
    CheckpointWriter, DamagedCheckpoint, ServerCheckpoint, load_checkpoint, resolve_resume, save_checkpoint,
)
from fedml_api.utils.durable_file import FileWriteError
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
    with pytest.raises(FileWriteError, match="could not write the checkpoint .*missing/run/checkpoint.pt: ENOENT "):
        writer.close()


def test_a_file_that_is_not_a_checkpoint_or_of_another_format_is_refused_by_name(tmp_path):
    torch.save({"w": torch.zeros(2)}, tmp_path / "weights.pt")
    with pytest.raises(ValueError, match="weights.pt is not a checkpoint of this framework"):
        load_checkpoint(str(tmp_path / "weights.pt"))
    for old_format in (1, 2):
        torch.save({"format": old_format, "round_idx": 0}, tmp_path / "old.pt")
        with pytest.raises(ValueError, match=f"old.pt has checkpoint format {old_format}, written by an older version; this version reads format 3"):
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


# -- damaged checkpoints --------------------------------------------------------------

def _model_sized_state() -> dict:
    """A 1 MiB model: the middle of its checkpoint is the model's bytes, as for any real model."""
    g = torch.Generator().manual_seed(1)
    return {"w": torch.randn(256, 1024, generator=g), "bn.num_batches_tracked": torch.tensor(3)}


def _flip_64_bytes(path, at=None) -> None:
    """Invert 64 bytes of ``path``, in its middle unless ``at`` says where."""
    data = bytearray(path.read_bytes())
    at = len(data) // 2 if at is None else at
    data[at:at + 64] = bytes(b ^ 0xFF for b in data[at:at + 64])
    path.write_bytes(bytes(data))


def _truncate(path, keep: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


def _same(a: ServerCheckpoint, b: ServerCheckpoint) -> bool:
    return ((a.round_idx, a.failed_clients, a.records, a.seed, a.strategy_state) == (b.round_idx, b.failed_clients, b.records, b.seed, b.strategy_state)
            and list(a.global_model) == list(b.global_model)
            and all(torch.equal(a.global_model[k], b.global_model[k]) for k in a.global_model))


def test_64_bytes_flipped_in_the_middle_of_a_checkpoint_are_found_and_the_file_named_as_damaged(tmp_path):
    save_checkpoint(str(tmp_path), _checkpoint(0, _model_sized_state()))
    path = tmp_path / "checkpoint.pt"
    _flip_64_bytes(path)
    with pytest.raises(DamagedCheckpoint, match=rf"^--resume: {re.escape(str(path))} is damaged: its record 'groups/float32' fails its checksum$"):
        load_checkpoint(str(tmp_path))


def test_64_bytes_flipped_anywhere_in_a_checkpoint_are_found_or_change_nothing_it_holds(tmp_path):
    save_checkpoint(str(tmp_path), _checkpoint(3, _state()))
    original = load_checkpoint(str(tmp_path))
    intact = (tmp_path / "checkpoint.pt").read_bytes()
    damaged = tmp_path / "damaged.pt"
    found = 0
    for at in range(0, len(intact), 64):  # the records, their zip headers, padding, the central directory
        damaged.write_bytes(intact)
        _flip_64_bytes(damaged, at)
        try:
            loaded = load_checkpoint(str(damaged))
        except DamagedCheckpoint as error:
            assert str(damaged) in str(error) and ("is damaged" in str(error) or "is truncated" in str(error)), error
            found += 1
        else:  # only the zip's alignment padding may be flipped unnoticed: nothing read from it
            assert _same(loaded, original), f"a flip at byte {at} went unnoticed and changed the checkpoint"
    assert found > 0


@pytest.mark.parametrize("keep", [0.5, 0.999, 10 / 30_000], ids=["half", "all but its end", "10 bytes"])
def test_a_truncated_checkpoint_is_named_as_truncated(tmp_path, keep):
    save_checkpoint(str(tmp_path), _checkpoint(0, _state()))
    path = tmp_path / "checkpoint.pt"
    _truncate(path, keep)
    with pytest.raises(DamagedCheckpoint, match=rf"^--resume: {re.escape(str(path))} is truncated: it ends after [\d,]+ bytes"):
        load_checkpoint(str(path))


def test_an_empty_or_garbled_file_is_named_as_such(tmp_path):
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(DamagedCheckpoint, match=r"empty.pt is truncated: it is empty"):
        load_checkpoint(str(tmp_path / "empty.pt"))
    (tmp_path / "noise.pt").write_bytes(np.random.default_rng(0).bytes(10_000))
    with pytest.raises(DamagedCheckpoint, match=r"noise.pt is damaged or not a checkpoint: it is not a zip archive"):
        load_checkpoint(str(tmp_path / "noise.pt"))


def test_a_checkpoint_damaged_in_its_table_of_records_is_named_as_damaged(tmp_path):
    # As if a flip in torch.save's pickle had hit the checksums' table itself.
    save_checkpoint(str(tmp_path), _checkpoint(0, _state()))
    raw = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    raw["checksums"]["fields"] ^= 1
    torch.save(raw, tmp_path / "checkpoint.pt")
    with pytest.raises(DamagedCheckpoint, match=r"checkpoint.pt is damaged: its record 'fields' fails its checksum"):
        load_checkpoint(str(tmp_path))
    del raw["checksums"]
    torch.save(raw, tmp_path / "checkpoint.pt")
    with pytest.raises(DamagedCheckpoint, match=r"checkpoint.pt is damaged: its table of records is garbled"):
        load_checkpoint(str(tmp_path))
    assert pickle.loads(raw["fields"])["round_idx"] == 0  # the rest of the checkpoint is one checksummed record


def test_resuming_an_intact_checkpoint_uses_it(tmp_path, caplog):
    for round_idx in range(2):
        save_checkpoint(str(tmp_path), _checkpoint(round_idx, _state()))
    for given in (tmp_path, tmp_path / "checkpoint.pt"):
        checkpoint, used = resolve_resume(str(given))
        assert (checkpoint.round_idx, used) == (1, str(tmp_path / "checkpoint.pt"))
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize("damage", ["64 bytes flipped", "truncated"])
def test_a_damaged_checkpoint_with_an_intact_spare_resumes_from_the_spare_and_says_so(tmp_path, caplog, damage):
    for round_idx in range(2):  # the spare holds round 0
        save_checkpoint(str(tmp_path), _checkpoint(round_idx, _model_sized_state()))
    path, spare = tmp_path / "checkpoint.pt", tmp_path / "checkpoint.pt.spare"
    _flip_64_bytes(path) if damage == "64 bytes flipped" else _truncate(path, 0.5)
    with caplog.at_level(logging.WARNING):
        checkpoint, used = resolve_resume(str(tmp_path))
    assert (checkpoint.round_idx, used) == (0, str(spare))
    [warning] = [r for r in caplog.records if r.levelno == logging.WARNING]
    message = warning.getMessage()
    assert f"{path} is {'damaged' if damage == '64 bytes flipped' else 'truncated'}" in message
    assert f"resuming from its spare {spare} instead, which holds the run up to round 0" in message


def test_a_run_resumed_from_the_spare_in_its_own_directory_never_writes_over_that_spare(tmp_path, monkeypatch):
    for round_idx in range(2):
        save_checkpoint(str(tmp_path), _checkpoint(round_idx, _model_sized_state()))
    _flip_64_bytes(tmp_path / "checkpoint.pt")
    assert resolve_resume(str(tmp_path))[1] == str(tmp_path / "checkpoint.pt.spare")
    spare = (tmp_path / "checkpoint.pt.spare").read_bytes()
    # The resumed run's first checkpoint fails half-way: the spare is still the run's way back.
    restore = _failing_midway(monkeypatch)
    writer = CheckpointWriter(str(tmp_path))
    writer.submit(lambda: _checkpoint(1, _model_sized_state()))
    with pytest.raises(FileWriteError, match="ENOSPC"):
        writer.close()
    assert (tmp_path / "checkpoint.pt.spare").read_bytes() == spare
    restore()
    # Its first checkpoint that succeeds replaces the damaged file and keeps the spare.
    writer = CheckpointWriter(str(tmp_path))
    writer.submit(lambda: _checkpoint(1, _model_sized_state()))
    writer.close()
    assert load_checkpoint(str(tmp_path)).round_idx == 1
    assert (tmp_path / "checkpoint.pt.spare").read_bytes() == spare


def test_when_the_checkpoint_and_its_spare_are_both_damaged_the_error_names_both(tmp_path):
    for round_idx in range(2):
        save_checkpoint(str(tmp_path), _checkpoint(round_idx, _model_sized_state()))
    path, spare = tmp_path / "checkpoint.pt", tmp_path / "checkpoint.pt.spare"
    _flip_64_bytes(path)
    _truncate(spare, 0.5)
    with pytest.raises(DamagedCheckpoint) as raised:
        resolve_resume(str(tmp_path))
    assert re.fullmatch(rf"--resume: {re.escape(str(path))} is damaged: .*; and its spare cannot be used either: "
                        rf"--resume: {re.escape(str(spare))} is truncated: .*", str(raised.value))


def test_a_damaged_checkpoint_without_a_spare_is_named_as_damaged(tmp_path):
    save_checkpoint(str(tmp_path), _checkpoint(0, _model_sized_state()))
    _flip_64_bytes(tmp_path / "checkpoint.pt")
    with pytest.raises(DamagedCheckpoint, match="checkpoint.pt is damaged"):
        resolve_resume(str(tmp_path))


# -- a full disk ----------------------------------------------------------------------

def test_a_checkpoint_that_does_not_fit_fails_with_enospc_before_writing_or_moving_anything(small_tmpfs):
    run_dir = small_tmpfs("3m")
    for round_idx in range(2):  # 1 MiB each: the checkpoint and its spare
        save_checkpoint(str(run_dir), _checkpoint(round_idx, _model_sized_state()))
    fill_filesystem(run_dir, leave=256 << 10)
    free = os.statvfs(run_dir).f_bavail
    larger = {**_model_sized_state(), "w2": torch.zeros(256, 1024)}  # 2 MiB: more than the spare's file and the free space
    writer = CheckpointWriter(str(run_dir))
    writer.submit(lambda: _checkpoint(2, larger))
    path = run_dir / "checkpoint.pt"
    with pytest.raises(FileWriteError, match=rf"^could not write the checkpoint {re.escape(str(path))}: ENOSPC \(No space left on device: "
                                            rf"the checkpoint needs [\d,]+ bytes, [\d,]+ are free\): {re.escape(str(path))}.partial; "
                                            rf"the last checkpoint written, {re.escape(str(path))}, is unchanged$"):
        writer.close()
    assert os.statvfs(run_dir).f_bavail == free  # nothing was written
    assert load_checkpoint(str(run_dir)).round_idx == 1
    assert load_checkpoint(str(run_dir / "checkpoint.pt.spare")).round_idx == 0
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoint.pt", "checkpoint.pt.spare", "filler"]


def test_a_write_that_hits_a_full_disk_frees_what_it_wrote_and_leaves_the_last_checkpoint(small_tmpfs, monkeypatch):
    run_dir = small_tmpfs("3m")
    save_checkpoint(str(run_dir), _checkpoint(0, _model_sized_state()))
    fill_filesystem(run_dir, leave=512 << 10)
    free = os.statvfs(run_dir).f_bavail
    # As when the space runs out while the file is written (another program filled it).
    monkeypatch.setattr("fedml_api.distributed.fedavg.checkpoint._check_free_space", lambda path, reused, needed: None)
    with pytest.raises(OSError) as raised:
        save_checkpoint(str(run_dir), _checkpoint(1, _model_sized_state()))
    assert (raised.value.errno, raised.value.filename) == (errno.ENOSPC, str(run_dir / "checkpoint.pt.partial"))
    assert os.statvfs(run_dir).f_bavail == free
    assert load_checkpoint(str(run_dir)).round_idx == 0


# -- the server ------------------------------------------------------------------------

def test_a_server_resumed_from_a_damaged_checkpoint_continues_from_the_spare_and_its_log_says_so(tmp_path):
    from test_fedavg_protocol import run_federation

    _, first_dir, errors = run_federation(tmp_path / "first", clients=2, per_round=2, rounds=2)
    assert not errors and load_checkpoint(str(first_dir / "checkpoint.pt.spare")).round_idx == 0
    _truncate(first_dir / "checkpoint.pt", 0.5)
    _, run_dir, errors = run_federation(tmp_path / "resumed", clients=2, per_round=2, rounds=3,
                                        extra=["--resume", str(first_dir)])
    assert not errors
    assert [r["round"] for r in load_checkpoint(str(run_dir)).records] == [0, 1, 2]
    assert (f"WARNING server: resuming from the spare {first_dir / 'checkpoint.pt.spare'} after round 0: "
            f"{first_dir / 'checkpoint.pt'} is damaged or truncated") in (run_dir / "server.log").read_text()


def test_a_server_whose_checkpoint_and_spare_are_damaged_stops_before_any_round_naming_both(tmp_path):
    from test_fedavg_protocol import run_federation

    _, first_dir, errors = run_federation(tmp_path / "first", clients=2, per_round=2, rounds=2)
    _truncate(first_dir / "checkpoint.pt", 0.5)
    _truncate(first_dir / "checkpoint.pt.spare", 0.5)
    _, run_dir, errors = run_federation(tmp_path / "resumed", clients=2, per_round=2, rounds=3,
                                        extra=["--resume", str(first_dir)])
    assert list(errors) == [0]  # the clients were released
    message = str(errors[0].code)
    assert message.startswith(f"FedAvg stopped: --resume: {first_dir / 'checkpoint.pt'} is truncated")
    assert f"and its spare cannot be used either: --resume: {first_dir / 'checkpoint.pt.spare'} is truncated" in message
    assert not (run_dir / "metrics.jsonl").exists()


def test_the_strategys_state_tensors_reload_bit_exactly_whatever_their_layout(tmp_path):
    g = torch.Generator().manual_seed(1)
    packed = PackedTensors.from_tensors({"a": torch.randn(3, generator=g), "b": torch.randn(2, 2, generator=g)})
    state = {
        "control": {"float32": torch.randn(10, generator=g)},
        "client_controls": {2: {"float32": torch.randn(4, generator=g)}, 7: {"float64": torch.randn(3, generator=g).double()}},
        "view_of_a_larger_buffer": packed.tensors()["b"],
        "strided": torch.randn(3, 4, generator=g).t(),
        "scalar": torch.tensor(3.5), "empty": torch.zeros(0, 2), "mask": torch.tensor([True, False, True]),
        "half": torch.randn(3, generator=g).bfloat16(), "rounds": 4,
    }
    save_checkpoint(str(tmp_path), ServerCheckpoint(0, _state(), strategy_state=state))
    loaded = load_checkpoint(str(tmp_path)).strategy_state

    def same(a, b):
        if isinstance(a, dict):
            return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
        if isinstance(a, torch.Tensor):
            return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
        return a == b
    assert same(state, loaded)


def test_the_strategys_state_is_written_from_its_own_memory_not_pickled_into_a_copy(tmp_path):
    # SCAFFOLD keeps a control variate per client, an adaptive optimizer two moments: a
    # model-sized state each round. Pickled into the fields' bytes it was copied several
    # times over (3 GB of peak memory for a 0.46 GB state) and took seconds.
    import tracemalloc
    state = {"client_controls": {c: {"float32": torch.zeros(4 << 20)} for c in (1, 2)}}  # 2 x 16 MiB
    tracemalloc.start()
    try:
        save_checkpoint(str(tmp_path), ServerCheckpoint(0, _state(), strategy_state=state))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, f"{peak:,} bytes of Python objects while saving 32 MiB of tensors"
    loaded = load_checkpoint(str(tmp_path)).strategy_state["client_controls"]
    assert sorted(loaded) == [1, 2] and all(torch.equal(loaded[c]["float32"], state["client_controls"][c]["float32"]) for c in (1, 2))


def test_a_damaged_strategy_tensor_is_found_by_its_checksum(tmp_path):
    state = {"m": torch.randn(1 << 16)}
    save_checkpoint(str(tmp_path), ServerCheckpoint(0, _state(), strategy_state=state))
    raw = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    raw["tensors"][0][100] ^= 1
    torch.save(raw, tmp_path / "checkpoint.pt")
    with pytest.raises(DamagedCheckpoint, match=r"checkpoint.pt is damaged: its record 'tensors/0' fails its checksum"):
        load_checkpoint(str(tmp_path))
