"""The server's checkpoint: everything needed to continue a run after its last round.

Written after every round (every ``--checkpoint_every`` rounds) as
``<run_dir>/checkpoint.pt``, atomically (written to a temporary file, flushed to disk,
then renamed over the old one), so a crash at any moment leaves either the previous or
the new checkpoint, never a partial file. The server writes them in the background
(:class:`CheckpointWriter`): the next round does not wait for the disk.
"""
from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional

import torch
from torch.utils.serialization import config as serialization_config

from fedml_api.utils.durable_file import PAGE_BYTES, durable_file
from fedml_core.distributed.communication.packed_tensors import PackedTensors, byte_view, dtype_from_name, dtype_name, plan_layout

CHECKPOINT_NAME = "checkpoint.pt"
# The checkpoint before the last, whose disk space the next checkpoint reuses.
SPARE_SUFFIX = ".spare"
# 2: the global model is stored packed (see _packed_model).
FORMAT_VERSION = 2
# Niceness of the checkpoint writer thread: it yields the CPU to the round's work.
WRITER_NICENESS = 10


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
    """

    round_idx: int
    global_model: Dict[str, torch.Tensor]
    failed_clients: Dict[int, str] = field(default_factory=dict)
    records: List[Dict[str, Any]] = field(default_factory=list)
    seed: int = 0
    strategy_state: Dict[str, Any] = field(default_factory=dict)


def save_checkpoint(run_dir: str, checkpoint: ServerCheckpoint) -> str:
    """Atomically write ``checkpoint`` to ``<run_dir>/checkpoint.pt``; returns the path."""
    path = os.path.join(run_dir, CHECKPOINT_NAME)
    temporary, spare = path + ".partial", path + SPARE_SUFFIX
    # The previous checkpoint's file becomes the next one's: overwriting its blocks
    # costs less than freeing one file and allocating another every round. (A crash
    # between the link and the rename below leaves the spare a second name of the
    # checkpoint itself, which must then not be overwritten.)
    if os.path.exists(spare):
        if os.path.exists(path) and os.path.samefile(spare, path):
            os.unlink(spare)
        else:
            os.replace(spare, temporary)
    fields = {**vars(checkpoint), "global_model": _packed_model(checkpoint.global_model)}
    # No zip CRC32: it would double the CPU time of every checkpoint, and the atomic
    # write + fsync + rename already guarantees a whole file. Records on page
    # boundaries: the model then goes to the disk from its own memory, not copied.
    settings = {"save.compute_crc32": False, "save.storage_alignment": PAGE_BYTES}
    with durable_file(temporary) as f, serialization_config.patch(settings):
        torch.save({"format": FORMAT_VERSION, **fields}, f)
    if os.path.exists(path):
        os.link(path, spare)
    os.replace(temporary, path)
    directory = os.open(run_dir, os.O_RDONLY)
    try:
        os.fsync(directory)  # make the rename itself durable
    finally:
        os.close(directory)
    return path


def _packed_model(state: Mapping[str, torch.Tensor]) -> Dict[str, Any]:
    """The model as its layout plus one byte buffer per dtype. Views of packed buffers
    (the server's aggregate) are written from where they are, with no copy; torch.save
    could not take them as typed tensors when several dtypes share one buffer."""
    packed = PackedTensors.from_views(state) or PackedTensors.from_tensors(state)
    return {
        "tensors": [(spec.name, dtype_name(spec.dtype), spec.shape) for spec in packed.specs],
        "groups": {dtype_name(dtype): byte_view(group) for dtype, group in packed.groups.items()},
    }


def _unpacked_model(stored: Mapping[str, Any], path: str) -> Dict[str, torch.Tensor]:
    specs, sizes = plan_layout([(name, dtype_from_name(dtype), tuple(shape)) for name, dtype, shape in stored["tensors"]])
    groups = {dtype_from_name(name): raw.view(dtype_from_name(name)) for name, raw in stored["groups"].items()}
    if {dtype: group.numel() for dtype, group in groups.items()} != sizes:
        raise ValueError(f"--resume: {path} is damaged: its model's buffers do not match its tensor list")
    return PackedTensors(specs, groups).tensors()


class CheckpointWriter:
    """Writes checkpoints with :func:`save_checkpoint` in a background thread.

    :meth:`submit` takes a function that builds the checkpoint (it runs in the
    background too, and must only read state that nobody changes afterwards: the
    model is written from its own memory, not copied first). The thread runs at a low
    scheduling priority, in the CPU time the round leaves idle. If checkpoints come faster than the disk
    takes them, a waiting one is replaced by the newer one: each supersedes the last.
    A failed write is raised by the next :meth:`submit` or by :meth:`close`.

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
            raise RuntimeError(f"could not write the checkpoint in {self.run_dir}: {error}") from error

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
                save_checkpoint(self.run_dir, make_checkpoint())
            except BaseException as error:  # reported to the server's thread
                logging.error("could not write the checkpoint in %s: %s", self.run_dir, error)
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
    """Load a checkpoint from a file or a run directory (its ``checkpoint.pt``)."""
    if os.path.isdir(path):
        path = os.path.join(path, CHECKPOINT_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--resume: no checkpoint at {path} (expected a run directory holding {CHECKPOINT_NAME}, or the file itself)")
    raw = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(raw, dict) or "format" not in raw:
        raise ValueError(f"--resume: {path} is not a checkpoint of this framework")
    if raw["format"] != FORMAT_VERSION:
        raise ValueError(f"--resume: {path} has checkpoint format {raw['format']}; this version reads format {FORMAT_VERSION}")
    raw.pop("format")
    raw["global_model"] = _unpacked_model(raw["global_model"], path)
    return ServerCheckpoint(**raw)


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
