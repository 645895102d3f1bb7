"""Per-client state kept on disk, so that memory does not grow with CLIENT_NUM.

An algorithm that remembers something per client between rounds (SCAFFOLD's control
variates, a client's optimizer state, personalised layers) keeps it in a
:class:`ClientStateStore` instead of a dict: one file per client and version under the
run directory, only the version numbers in memory (a few bytes per client).

Checkpoints: a version is the round that wrote it, and files are never overwritten, so
the store's :meth:`~ClientStateStore.snapshot` (the client -> version map, saved in the
strategy's checkpoint state) names files that stay as they are while later rounds write
newer versions. The versions the last two snapshots name are kept (a checkpoint and its
spare, which a damaged checkpoint falls back on); older ones are deleted as newer ones
are written. A resumed run :meth:`~ClientStateStore.restore`\\ s the snapshot and goes on
from links to those files in its own directory, so it continues bit-exactly and the
checkpoint it came from stays resumable.
"""
from __future__ import annotations

import contextlib
import os
import shutil
from typing import Any, Dict, List, Mapping, Optional, Sequence, Set, Tuple

import torch


#: Clients per subdirectory (a directory of 100,000 files is slow to work in).
CLIENTS_PER_FOLDER = 1000


class ClientStateWriteError(OSError):
    """A client's state could not be written to the run directory (a full disk, say).

    ``filename`` is the state's file, ``errno`` and ``strerror`` say why, e.g.
    ``ENOSPC``, "No space left on device". Nothing is left half written, and the files
    that the last checkpoint names are still there.
    """


class ClientStateStore:
    """Named tensors per client, on disk under ``directory`` (None: in memory, for a
    strategy used outside a run, e.g. in a test or a benchmark).

    Args:
        directory: where the files go, e.g. ``<run_dir>/client_state/scaffold``.
    """

    def __init__(self, directory: Optional[str]) -> None:
        self.directory = os.path.abspath(directory) if directory is not None else None
        self._versions: Dict[int, int] = {}  # client -> its latest version
        self._snapshots: List[Dict[int, int]] = [{}, {}]  # the last two snapshots' versions (newest last)
        self._in_memory: Dict[int, Dict[str, torch.Tensor]] = {}
        self._read_from: Optional[str] = None  # without a directory: the restored run's, read (never written) on demand
        self._unsynced: Set[str] = set()  # files written since the last snapshot

    def __len__(self) -> int:
        return len(self._versions)

    def __contains__(self, client: int) -> bool:
        return client in self._versions

    def clients(self) -> List[int]:
        return sorted(self._versions)

    def _path(self, client: int, version: int, directory: Optional[str] = None) -> str:
        return os.path.join(directory or self.directory, str(client // CLIENTS_PER_FOLDER), f"{client}-{version}.pt")

    def get(self, client: int) -> Optional[Dict[str, torch.Tensor]]:
        """The latest state of ``client`` (name -> CPU tensor), or None if it has none."""
        if client in self._in_memory:
            return self._in_memory[client]
        version = self._versions.get(client)
        if version is None:
            return None
        # On disk: this store's own files or, for a store without a directory, the restored run's.
        return torch.load(self._path(client, version, self._read_from), map_location="cpu", weights_only=True)

    def put(self, client: int, version: int, tensors: Mapping[str, torch.Tensor]) -> None:
        """Store ``tensors`` as ``client``'s state of ``version`` (the round writing it;
        increasing per client). The tensors are copied (in memory) or written out;
        :class:`ClientStateWriteError` if they cannot be (the store is then unchanged)."""
        if self.directory is None:
            self._in_memory[client] = {name: t.detach().clone() for name, t in tensors.items()}
            self._versions[client] = version
            return
        path = self._path(client, version)
        partial = path + ".partial"
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            # Through a Python file: torch's own file writer reports a failed write only as
            # "basic_ios::clear: iostream error", without the errno.
            with open(partial, "wb") as f:
                torch.save({name: t.detach().cpu() for name, t in tensors.items()}, f)
            os.replace(partial, path)
        except (OSError, RuntimeError) as error:
            with contextlib.suppress(FileNotFoundError):
                os.remove(partial)  # on a full disk, its blocks are what the run's log and metrics need now
            raise _write_error(error, path) from None
        self._unsynced.add(path)
        previous = self._versions.get(client)
        self._versions[client] = version
        if previous is not None and previous != version and all(snap.get(client) != previous for snap in self._snapshots):
            self._remove(self._path(client, previous))

    def snapshot(self) -> Dict[str, Any]:
        """The state to save with a checkpoint: the files written so far are made
        durable, and the ones it names are kept until two later snapshots replace it."""
        if self.directory is None:
            return {"directory": None, "tensors": {str(c): dict(self.get(c)) for c in self._versions}}
        for path in self._unsynced:
            try:
                with open(path, "rb") as written:
                    os.fsync(written.fileno())
            except OSError as error:
                raise _write_error(error, path) from None
        self._unsynced = set()
        oldest = self._snapshots[0]
        self._snapshots = [self._snapshots[1], dict(self._versions)]
        for client, version in oldest.items():  # no longer named by a kept snapshot, nor the latest
            if version != self._versions.get(client) and all(snap.get(client) != version for snap in self._snapshots):
                self._remove(self._path(client, version))
        return {"directory": self.directory, "versions": {str(c): v for c, v in self._versions.items()}}

    def _remove(self, path: str) -> None:
        self._unsynced.discard(path)
        try:
            os.remove(path)
        except FileNotFoundError:  # e.g. removed by an earlier run resumed from the same checkpoint
            pass

    def restore(self, snapshot: Mapping[str, Any]) -> None:
        """Continue from a :meth:`snapshot` (the run it was taken in wrote the files), or
        from a plain ``{client: tensors}`` map (what checkpoints held before this store).

        The snapshot's files are linked (or, across file systems, copied) into this
        store's directory, and only those copies are ever replaced or removed: the
        checkpoint's run keeps its own, so each of its checkpoints can be resumed again.
        A store without a directory reads them where they are, one at a time when asked
        (:meth:`get`), and keeps what is :meth:`put` later in memory.
        :class:`ClientStateWriteError` if a file cannot be linked or copied."""
        if "directory" not in snapshot:
            for client, tensors in snapshot.items():
                self.put(int(client), -1, tensors)
            return
        source = snapshot["directory"]
        if source is None:
            self._in_memory = {int(c): dict(t) for c, t in snapshot.get("tensors", {}).items()}
            self._versions = {c: 0 for c in self._in_memory}
            return
        versions = {int(c): int(v) for c, v in snapshot["versions"].items()}
        missing = [c for c, v in versions.items() if not os.path.exists(self._path(c, v, source))]
        if missing:
            raise ValueError(f"the client states of clients {missing[:5]} are missing from {source} "
                             f"(expected files such as {self._path(missing[0], versions[missing[0]], source)})")
        if self.directory is None:
            self._read_from = source
        elif os.path.realpath(source) != os.path.realpath(self.directory):
            for client, version in versions.items():
                self._adopt(self._path(client, version, source), self._path(client, version))
        self._versions = versions
        self._snapshots = [dict(versions), dict(versions)]

    def _adopt(self, source: str, path: str) -> None:
        """Make ``path`` a copy of ``source``: a hard link where the file system allows."""
        partial = path + ".partial"
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                os.remove(partial)
            try:
                os.link(source, partial)
            except OSError:  # another file system, or one without hard links
                shutil.copyfile(source, partial)
            os.replace(partial, path)
        except OSError as error:
            with contextlib.suppress(FileNotFoundError):
                os.remove(partial)  # a half-copied file holds space the run needs
            raise _write_error(error, path) from None
        self._unsynced.add(path)

    def check_layout(self, expected: Sequence[Tuple[str, torch.dtype, Tuple[int, ...]]], what: str) -> None:
        """Raise ValueError unless the stored states hold the tensors ``expected``
        (``(name, dtype, shape)``, in any order): one state is read, so that a checkpoint
        of another model is refused before a run resumes from it. ``what`` names the
        states in the message (e.g. ``"SCAFFOLD's control variates"``)."""
        want = {name: (dtype, tuple(shape)) for name, dtype, shape in expected}
        for client in self.clients()[:1]:  # written by one run, of one model: one will do
            got = {name: (t.dtype, tuple(t.shape)) for name, t in self.get(client).items()}
            if got != want:
                raise ValueError(f"{what} in the checkpoint are for another model: client {client}'s hold "
                                 f"{sorted(got)[:5]}, this model's are {sorted(want)[:5]} (or other dtypes or shapes)")


def _write_error(error: BaseException, path: str) -> ClientStateWriteError:
    """``error``, raised while writing ``path``, as a :class:`ClientStateWriteError`
    naming ``path``; re-raises ``error`` when it is not a failed write (a bug)."""
    # torch.save's zip writer, closing after a failed write, replaces the OSError with a
    # RuntimeError of its own ("unexpected pos ...").
    cause = error if isinstance(error, OSError) else error.__context__
    if not isinstance(cause, OSError) or cause.errno is None:
        raise error
    return ClientStateWriteError(cause.errno, cause.strerror or os.strerror(cause.errno), path)
