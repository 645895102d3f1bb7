"""The server's checkpoint: everything needed to continue a run after its last round.

Written after every round (every ``--checkpoint_every`` rounds) as
``<run_dir>/checkpoint.pt``, atomically (written to a temporary file, flushed to disk,
then renamed over the old one), so a crash at any moment leaves either the previous or
the new checkpoint, never a partial file. The server writes them in the background
(:class:`CheckpointWriter`): the next round does not wait for the disk.

Every record of the file carries a checksum (xxh3_64): the model's byte buffers, one
per dtype, the strategy's state tensors (SCAFFOLD's control variates, an optimizer's
moments), one byte buffer each, and the rest of the checkpoint, stored as one pickled
``bytes`` record that names those tensors by their place in the file. So a
file damaged later (a bad disk, a bad copy) or cut short is named as such when it is
loaded, instead of resuming from garbage; :func:`resolve_resume` then falls back to
``checkpoint.pt.spare``, the checkpoint before the last.
"""
from __future__ import annotations

import errno
import io
import logging
import os
import pickle
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import torch
import xxhash
from torch.utils.serialization import config as serialization_config

from fedml_api.utils.durable_file import PAGE_BYTES, FileWriteError, describe_error, durable_file
from fedml_core.distributed.communication.packed_tensors import PackedTensors, byte_view, dtype_from_name, dtype_name, plan_layout

CHECKPOINT_NAME = "checkpoint.pt"
# The checkpoint before the last, whose disk space the next checkpoint reuses.
SPARE_SUFFIX = ".spare"
# 2: the global model is stored packed (see _packed_model).
# 3: every record has an xxh3_64 checksum; the fields other than the model's buffers are
#    one pickled bytes record (see save_checkpoint), the tensors in them (the strategy's
#    state) records of their own ("tensors"; a file without them has none).
FORMAT_VERSION = 3
# Niceness of the checkpoint writer thread: it yields the CPU to the round's work.
WRITER_NICENESS = 10
# torch.save writes a zip archive: it starts with a local file header and ends with the
# end-of-central-directory record (22 bytes, no comment), which a truncated file lacks.
_ZIP_START, _ZIP_END, _ZIP_END_BYTES = b"PK\x03\x04", b"PK\x05\x06", 22


# The keys of a checkpoint's table of records (torch.save's pickle): a file with none of
# them is something else, one with only some of them is damaged.
_TABLE_KEYS = {"format", "fields", "groups", "tensors", "checksums"}


class DamagedCheckpoint(ValueError):
    """A checkpoint file is damaged or truncated (its message names the file and how)."""


@dataclass
class ServerCheckpoint:
    """State of the server after round ``round_idx`` (0-based) completed.

    Attributes:
        round_idx: the last completed round.
        global_model: the global model's state_dict after that round.
        failed_clients: ``{client_id: reason}`` of the clients out of the run.
        records: the per-round records so far (``metrics.jsonl``'s lines).
        seed: the run's seed (the client sampling is a function of seed and round).
        strategy_state: the aggregation strategy's state between rounds (FedAvg: none).
        client_states: the snapshot of the store of the trainer's own client states
            (``ModelTrainer.get_client_state``; empty when the trainer keeps none).
    """

    round_idx: int
    global_model: Dict[str, torch.Tensor]
    failed_clients: Dict[int, str] = field(default_factory=dict)
    records: List[Dict[str, Any]] = field(default_factory=list)
    seed: int = 0
    strategy_state: Dict[str, Any] = field(default_factory=dict)
    client_states: Dict[str, Any] = field(default_factory=dict)


def save_checkpoint(run_dir: str, checkpoint: ServerCheckpoint, check_previous: bool = False) -> str:
    """Atomically write ``checkpoint`` to ``<run_dir>/checkpoint.pt``; returns the path.

    Raises OSError (its ``filename`` the file being written) if it cannot be written;
    the previous ``checkpoint.pt`` is then unchanged (the spare, whose file was being
    written over, is gone). A checkpoint that needs more space than the filesystem has
    left fails with ENOSPC before anything is written or moved.

    Args:
        run_dir: the run directory.
        checkpoint: what to write.
        check_previous: verify the ``checkpoint.pt`` already there first (for a run's first
            checkpoint: the run may have resumed from this directory's spare because that
            file is damaged). If it is damaged, the spare, the only intact checkpoint, is
            kept as it is instead of being written over, and the new checkpoint replaces
            the damaged one.
    """
    path = os.path.join(run_dir, CHECKPOINT_NAME)
    temporary, spare = path + ".partial", path + SPARE_SUFFIX
    layout, groups = _packed_model(checkpoint.global_model)
    fields, tensors = _pickle_fields({**vars(checkpoint), "global_model": layout})
    checksums = {"fields": _checksum(fields), **{f"groups/{name}": _checksum(group) for name, group in groups.items()},
                 **{f"tensors/{i}": _checksum(tensor) for i, tensor in enumerate(tensors)}}
    # The previous checkpoint's file becomes the next one's: overwriting its blocks
    # costs less than freeing one file and allocating another every round. (A crash
    # between the link and the rename below leaves the spare a second name of the
    # checkpoint itself, which must then not be overwritten.)
    reuse_spare = keep_spare = False
    if os.path.exists(spare):
        if os.path.exists(path) and os.path.samefile(spare, path):
            os.unlink(spare)
        elif check_previous and os.path.exists(path) and not _is_intact(path):
            keep_spare = True
        else:
            reuse_spare = True
    _check_free_space(temporary, spare if reuse_spare else temporary,
                      len(fields) + sum(group.numel() for group in [*groups.values(), *tensors]))
    if reuse_spare:
        os.replace(spare, temporary)
    try:
        # No zip CRC32: it would cost 5 times the checksums above. Records on page
        # boundaries: the model then goes to the disk from its own memory, not copied.
        settings = {"save.compute_crc32": False, "save.storage_alignment": PAGE_BYTES}
        with durable_file(temporary) as f, serialization_config.patch(settings):
            torch.save({"format": FORMAT_VERSION, "fields": fields, "groups": groups, "tensors": tensors, "checksums": checksums}, f)
    except (OSError, RuntimeError) as error:
        # Half written, the file is of no use, and on a full disk its blocks are what
        # the run's log and metrics need now.
        if os.path.exists(temporary):
            os.unlink(temporary)
        # torch.save's zip writer, closing after a failed write, replaces the OSError
        # with a RuntimeError of its own ("unexpected pos ...").
        cause = error if isinstance(error, OSError) else error.__context__
        if not isinstance(cause, OSError):
            raise
        if cause.filename is None:  # os.write's errors name no file
            cause.filename = temporary
        raise cause from None
    if os.path.exists(path) and not keep_spare:
        os.link(path, spare)
    os.replace(temporary, path)
    directory = os.open(run_dir, os.O_RDONLY)
    try:
        os.fsync(directory)  # make the rename itself durable
    finally:
        os.close(directory)
    return path


def _is_intact(path: str) -> bool:
    try:
        load_checkpoint(path)
    except ValueError:  # damaged, truncated, or not a checkpoint this version reads
        return False
    return True


def _check_free_space(path: str, reused: str, needed: int) -> None:
    """Raise ENOSPC for ``path`` if its filesystem cannot take ``needed`` bytes beyond
    those of ``reused``, the existing file that will be written over (if any): writing
    until the disk is full would first take the last blocks that the run's log and
    metrics (and everything else on that disk) need."""
    stats = os.statvfs(os.path.dirname(path))
    available = stats.f_bavail * stats.f_frsize + (os.stat(reused).st_blocks * 512 if os.path.exists(reused) else 0)
    if needed > available:
        raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)}: the checkpoint needs {needed:,} bytes, "
                                    f"{available:,} are free", path)


def _checksum(buffer: Any) -> int:
    """xxh3_64 of a bytes object or of a uint8 tensor's memory: 25 GB/s here, against
    5 for zlib.crc32 and 0.7 for blake2b (see docs/BENCHMARKS.md); it releases the GIL."""
    return xxhash.xxh3_64_intdigest(buffer.numpy() if isinstance(buffer, torch.Tensor) else buffer)


class _TensorsApart(pickle.Pickler):
    """Pickles every tensor as a reference to a byte buffer of its own (in
    :attr:`tensors`), which torch.save then writes from its memory: pickled inline, a
    tensor would be copied into the fields' bytes, which torch.save copies again (a
    model-sized state cost several times its size in memory, and seconds)."""

    def __init__(self, file: io.BytesIO) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.tensors: List[torch.Tensor] = []

    def persistent_id(self, obj: Any) -> Any:
        if not isinstance(obj, torch.Tensor):
            return None
        tensor = obj.detach().cpu()
        # A view of a larger buffer (or a strided one) gets a buffer of its own: torch.save
        # writes the whole storage of what it is given.
        if not tensor.is_contiguous() or tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
            tensor = tensor.clone(memory_format=torch.contiguous_format)
        self.tensors.append(byte_view(tensor))
        return ("tensor", len(self.tensors) - 1, dtype_name(tensor.dtype), tuple(tensor.shape))


def _pickle_fields(fields: Mapping[str, Any]) -> Tuple[bytes, List[torch.Tensor]]:
    """``fields`` pickled, and the byte buffers of the tensors in them."""
    buffer = io.BytesIO()
    pickler = _TensorsApart(buffer)
    pickler.dump(dict(fields))
    return buffer.getvalue(), pickler.tensors


def _unpickle_fields(data: bytes, tensors: List[torch.Tensor], path: str) -> Dict[str, Any]:
    """The inverse of :func:`_pickle_fields` (the tensors: views of ``tensors``)."""
    unpickler = pickle.Unpickler(io.BytesIO(data))

    def persistent_load(pid: Any) -> torch.Tensor:
        try:
            kind, index, dtype, shape = pid
            if kind != "tensor":
                raise ValueError(kind)
            return tensors[index].view(dtype_from_name(dtype)).reshape(shape)
        except (ValueError, TypeError, IndexError, KeyError, RuntimeError):
            raise DamagedCheckpoint(f"--resume: {path} is damaged: its fields name a tensor record {pid!r} it does not hold") from None

    unpickler.persistent_load = persistent_load
    return unpickler.load()


def _packed_model(state: Mapping[str, torch.Tensor]) -> Tuple[List[Tuple[str, str, Tuple[int, ...]]], Dict[str, torch.Tensor]]:
    """The model as its layout (name, dtype, shape of each tensor) plus one byte buffer
    per dtype. Views of packed buffers (the server's aggregate) are written from where
    they are, with no copy; torch.save could not take them as typed tensors when several
    dtypes share one buffer."""
    packed = PackedTensors.from_views(state) or PackedTensors.from_tensors(state)
    layout = [(spec.name, dtype_name(spec.dtype), spec.shape) for spec in packed.specs]
    return layout, {dtype_name(dtype): byte_view(group) for dtype, group in packed.groups.items()}


def _unpacked_model(layout: List[Tuple[str, str, Tuple[int, ...]]], raw_groups: Mapping[str, torch.Tensor], path: str) -> Dict[str, torch.Tensor]:
    specs, sizes = plan_layout([(name, dtype_from_name(dtype), tuple(shape)) for name, dtype, shape in layout])
    groups = {dtype_from_name(name): raw.view(dtype_from_name(name)) for name, raw in raw_groups.items()}
    if {dtype: group.numel() for dtype, group in groups.items()} != sizes:
        raise DamagedCheckpoint(f"--resume: {path} is damaged: its model's buffers do not match its tensor list")
    return PackedTensors(specs, groups).tensors()


class CheckpointWriter:
    """Writes checkpoints with :func:`save_checkpoint` in a background thread.

    :meth:`submit` takes a function that builds the checkpoint (it runs in the
    background too, and must only read state that nobody changes afterwards: the
    model is written from its own memory, not copied first). The thread runs at a low
    scheduling priority, in the CPU time the round leaves idle. If checkpoints come faster than the disk
    takes them, a waiting one is replaced by the newer one: each supersedes the last.
    A failed write is raised by the next :meth:`submit` or by :meth:`close`, as a
    :class:`~fedml_api.utils.durable_file.FileWriteError` naming the file and the error
    (e.g. ENOSPC); the checkpoint written before it is still on disk. Its first write
    checks the checkpoint already in ``run_dir``, if any (``check_previous``), so that a
    run resumed from that directory's spare never writes over it.

    Args:
        run_dir: where ``checkpoint.pt`` goes.
    """

    def __init__(self, run_dir: str) -> None:
        self.run_dir = run_dir
        self._changed = threading.Condition()
        self._waiting: Optional[Callable[[], ServerCheckpoint]] = None
        self._writing = False
        self._closed = False
        self._error: Optional[BaseException] = None
        self._written = 0
        self._thread = threading.Thread(target=self._write_loop, name="checkpoint-writer", daemon=True)
        self._thread.start()

    def submit(self, make_checkpoint: Callable[[], ServerCheckpoint]) -> None:
        """Write ``make_checkpoint()`` soon (replacing any checkpoint still waiting)."""
        with self._changed:
            self._raise_error()
            if self._closed:
                raise RuntimeError("CheckpointWriter.submit() after close()")
            self._waiting = make_checkpoint
            self._changed.notify_all()

    def close(self) -> None:
        """Wait until the last submitted checkpoint is on disk, then stop the thread;
        raises the error of a failed write."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()
            while self._waiting is not None or self._writing:
                self._changed.wait()
        self._thread.join()
        with self._changed:
            self._raise_error()

    def _raise_error(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise FileWriteError(self._describe(error)) from error

    def _describe(self, error: BaseException) -> str:
        path = os.path.join(self.run_dir, CHECKPOINT_NAME)
        kept = f"the last checkpoint written, {path}, is unchanged" if os.path.exists(path) else "no checkpoint was written before"
        return f"could not write the checkpoint {path}: {describe_error(error)}; {kept}"

    def _write_loop(self) -> None:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WRITER_NICENESS)  # this thread only (Linux)
        while True:
            with self._changed:
                while self._waiting is None and not self._closed:
                    self._changed.wait()
                if self._waiting is None:
                    return
                make_checkpoint, self._waiting, self._writing = self._waiting, None, True
            try:
                save_checkpoint(self.run_dir, make_checkpoint(), check_previous=self._written == 0)
                self._written += 1
            except BaseException as error:  # reported to the server's thread
                logging.error("%s", self._describe(error))
                with self._changed:
                    self._error = error
            finally:
                # Let go of the written model now, not at the next checkpoint: the server
                # recycles a model's memory once nothing references it.
                make_checkpoint = None
                with self._changed:
                    self._writing = False
                    self._changed.notify_all()


def load_checkpoint(path: str) -> ServerCheckpoint:
    """Load and verify a checkpoint from a file or a run directory (its ``checkpoint.pt``).

    Raises FileNotFoundError if there is none; :class:`DamagedCheckpoint` (a ValueError
    naming the file) if it is truncated, damaged or fails a checksum; ValueError if it is
    not a checkpoint of this framework, or of another format version.
    """
    if os.path.isdir(path):
        path = os.path.join(path, CHECKPOINT_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--resume: no checkpoint at {path} (expected a run directory holding {CHECKPOINT_NAME}, or the file itself)")
    raw = _read_archive(path)
    if not isinstance(raw, dict) or not _TABLE_KEYS & set(raw):
        raise ValueError(f"--resume: {path} is not a checkpoint of this framework")
    version = raw.get("format")
    if isinstance(version, int) and 1 <= version < FORMAT_VERSION:
        raise ValueError(f"--resume: {path} has checkpoint format {version}, written by an older version; "
                         f"this version reads format {FORMAT_VERSION}")
    if version != FORMAT_VERSION:
        raise DamagedCheckpoint(f"--resume: {path} is damaged or from a newer version: its format is {version!r}; "
                                f"this version reads format {FORMAT_VERSION}")
    groups, tensors = raw.get("groups"), raw.get("tensors", [])
    if (not isinstance(raw.get("checksums"), dict) or not isinstance(raw.get("fields"), bytes) or not isinstance(groups, dict)
            or not isinstance(tensors, list)
            or not all(isinstance(group, torch.Tensor) and group.dtype == torch.uint8 for group in [*groups.values(), *tensors])):
        raise DamagedCheckpoint(f"--resume: {path} is damaged: its table of records is garbled")
    records = {"fields": raw["fields"], **{f"groups/{name}": group for name, group in groups.items()},
               **{f"tensors/{i}": tensor for i, tensor in enumerate(tensors)}}
    if set(records) != set(raw["checksums"]):
        raise DamagedCheckpoint(f"--resume: {path} is damaged: it holds the records {sorted(records)}, "
                                f"its checksums are for {sorted(raw['checksums'])}")
    for name, record in records.items():
        if _checksum(record) != raw["checksums"][name]:
            raise DamagedCheckpoint(f"--resume: {path} is damaged: its record {name!r} fails its checksum")
    fields = _unpickle_fields(raw["fields"], tensors, path)
    fields["global_model"] = _unpacked_model(fields["global_model"], groups, path)
    return ServerCheckpoint(**fields)


def _read_archive(path: str) -> Any:
    """``torch.load`` of ``path``, which must be a whole zip archive: a file cut short, or
    one that torch cannot read, raises :class:`DamagedCheckpoint` naming it."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        start = f.read(len(_ZIP_START))
        f.seek(max(0, size - _ZIP_END_BYTES))
        end = f.read(_ZIP_END_BYTES)
    if size == 0:
        raise DamagedCheckpoint(f"--resume: {path} is truncated: it is empty")
    if start != _ZIP_START:
        raise DamagedCheckpoint(f"--resume: {path} is damaged or not a checkpoint: it is not a zip archive (torch.save's format)")
    if not end.startswith(_ZIP_END):
        raise DamagedCheckpoint(f"--resume: {path} is truncated: it ends after {size:,} bytes, without the zip archive's "
                                f"end record (an interrupted copy or write?)")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # torch and pickle raise anything on garbage
        reason = str(error).splitlines()[0] if str(error) else ""
        raise DamagedCheckpoint(f"--resume: {path} is damaged: torch.load fails: {type(error).__name__}: {reason}") from None


def resolve_resume(path: str) -> Tuple[ServerCheckpoint, str]:
    """The checkpoint that ``--resume path`` continues from, loaded and verified.

    Needs no MPI and is quick (it reads the file once, at disk speed, and checksums it),
    so a launcher can call it before starting any rank.

    Args:
        path: a run directory (its ``checkpoint.pt`` is used) or a checkpoint file.

    Returns:
        ``(checkpoint, used_path)``: ``used_path`` is the file loaded. When the
        checkpoint is damaged or truncated and its spare (``<file>.spare``, the one
        before it) is intact, that is the spare; a WARNING then names both files and
        the spare's round.

    Raises:
        FileNotFoundError: there is no checkpoint at ``path``.
        DamagedCheckpoint: the checkpoint is damaged or truncated and has no intact spare
            (the message names each file and what is wrong with it).
        ValueError: not a checkpoint of this framework, or of another format version.
    """
    checkpoint_path = os.path.join(path, CHECKPOINT_NAME) if os.path.isdir(path) else path
    try:
        return load_checkpoint(checkpoint_path), checkpoint_path
    except DamagedCheckpoint as damaged:
        spare = checkpoint_path + SPARE_SUFFIX
        if not os.path.isfile(spare):
            raise
        try:
            checkpoint = load_checkpoint(spare)
        except ValueError as spare_error:  # damaged too, or of another format
            raise DamagedCheckpoint(f"{damaged}; and its spare cannot be used either: {spare_error}") from None
        logging.warning("%s; resuming from its spare %s instead, which holds the run up to round %d "
                        "(0-based, as in metrics.jsonl)", damaged, spare, checkpoint.round_idx)
        return checkpoint, spare


def check_same_model(checkpoint: Mapping[str, torch.Tensor], model_state: Mapping[str, torch.Tensor], path: str) -> None:
    """Raise ValueError naming the first tensor where the checkpoint's model differs from ours."""
    for name, tensor in model_state.items():
        if name not in checkpoint:
            raise ValueError(f"--resume: {path} is from another model: it has no tensor {name!r}")
        theirs = checkpoint[name]
        if theirs.dtype != tensor.dtype or theirs.shape != tensor.shape:
            raise ValueError(
                f"--resume: {path} is from another model: tensor {name!r} is {theirs.dtype} {list(theirs.shape)} "
                f"there, {tensor.dtype} {list(tensor.shape)} here"
            )
    extra = sorted(set(checkpoint) - set(model_state))
    if extra:
        raise ValueError(f"--resume: {path} is from another model: unexpected tensors {extra[:5]}")
