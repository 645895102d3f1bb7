"""Message transport over MPI (mpi4py).

Wire format of one message from rank ``s`` to rank ``r``:

1. a small JSON header on ``HEADER_TAG``: type, sender, receiver, plain params, how
   the payload is cut, and the id of its tensor layout (the tensors' ``(name, dtype,
   shape)`` list). A layout's list travels only the first time the sender uses it with
   this receiver; later messages (every round's model) name it by id alone;
2. the payload as raw bytes on ``DATA_TAG``: either one buffer per tensor (when the
   sender's tensors are separate, e.g. a live ``state_dict``) or one buffer per dtype
   (when the sender already holds them packed, e.g. an aggregated global model).

The receiver allocates a :class:`PackedTensors` from the header and receives the bytes
straight into it, so a model arrives as flat per-dtype buffers with no extra copy. MPI
keeps messages of one (source, tag) in order, so payloads always follow their header.

Failures: under Open MPI's ULFM (``mpirun --with-ft ulfm``) a dead peer surfaces as
an MPI error; the transport acknowledges it and raises :class:`PeerFailure` naming
the dead ranks, and a send to a dead or frozen peer fails or times out without
blocking the sends to other peers (:meth:`MpiTransport.send_many`).

Waiting never spins a core for long: a wait spins for ``spin_seconds`` (20 ms by
default: echoes and large transfers land within it), yielding the core to any other
runnable process at each probe (ranks often outnumber cores), then probes with an
exponential sleep back-off capped at ``max_poll_interval`` (1 ms by default), which
bounds the added latency while keeping an idle rank near 0% CPU.
"""
from __future__ import annotations

import atexit
import logging
import os
import sys
import time
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
from mpi4py import MPI

from .message import Message, decode_header, encode_header
from .packed_tensors import BufferPool, PackedTensors, TensorSpec, byte_view, dtype_from_name, dtype_name, plan_layout
from .transport import PeerFailure, Transport, TransportTimeout

HEADER_TAG = 17
DATA_TAG = 18


class MpiTransport(Transport):
    """Point-to-point messages between the ranks of an MPI communicator.

    Args:
        comm: the communicator (``MPI.COMM_WORLD`` by default); its rank 0 is the server.
        max_poll_interval: longest sleep between two probes while idle, in seconds.
        spin_seconds: how long a wait polls without sleeping before it backs off.
        payload_timeout: seconds a message's tensors may take to arrive once its header
            has; a sender slower than that is reported as failed.
    """

    def __init__(self, comm: Optional[MPI.Comm] = None, max_poll_interval: float = 1e-3, spin_seconds: float = 0.02, payload_timeout: float = 120.0) -> None:
        self.comm = comm if comm is not None else MPI.COMM_WORLD
        self.rank = self.comm.Get_rank()
        self.world_size = self.comm.Get_size()
        self.max_poll_interval = max_poll_interval
        self.spin_seconds = spin_seconds
        self.payload_timeout = payload_timeout
        self.pool = BufferPool()
        self.failed_ranks: set = set()
        # Sends given up on (peer frozen) keep their buffers alive until MPI completes them.
        self._abandoned: List[Tuple[List[MPI.Request], List[torch.Tensor]]] = []
        # Layout ids: {receiver: {layout: id}} for sending, {sender: [layouts by id]} for receiving.
        self._layout_ids: Dict[int, Dict[Tuple, int]] = {}
        self._layouts: Dict[int, List[_Layout]] = {}

    # -- ending --------------------------------------------------------------------
    def abandon(self, rank: int) -> None:
        self.failed_ranks.add(rank)

    def close(self, exit_status: int = 0) -> None:
        """Finish with the job. MPI_Finalize waits for every process of the job, so after a
        peer died or was given up on it can wait forever: then the process exits with
        ``exit_status`` at interpreter shutdown without finalizing MPI (after the other
        exit handlers, e.g. wandb's, have run)."""
        if self.failed_ranks:
            atexit.register(_exit_without_mpi_finalize, exit_status)

    # -- sending -----------------------------------------------------------------
    def send(self, message: Message, timeout: Optional[float] = None) -> None:
        failure = self.send_many([message], timeout).get(message.receiver_id)
        if failure is not None:
            raise failure

    def send_many(self, messages: Sequence[Message], timeout: Optional[float] = None) -> Dict[int, Exception]:
        pending = {m.receiver_id: self._post(m) for m in messages}
        failures: Dict[int, Exception] = {}

        def all_done() -> bool:
            for dest in list(pending):
                try:
                    done = MPI.Request.Testall(pending[dest][0])
                except MPI.Exception as error:
                    failures[dest] = self._as_peer_failure(error, dest)
                    done = True
                if done:
                    del pending[dest]
            self._reap_abandoned()
            return not pending

        if not self._poll(all_done, timeout):
            for dest, posted in pending.items():
                failures[dest] = TransportTimeout(f"rank {dest} did not take a message within {timeout} s")
                self._abandoned.append(posted)
        return failures

    def _post(self, message: Message) -> Tuple[List[MPI.Request], List[torch.Tensor]]:
        """Start sending ``message``; returns its requests and the buffers they read."""
        dest = message.receiver_id
        packed = message.packed
        if packed is None:
            # A packed module's state_dict: views that tile its packed buffers.
            packed = PackedTensors.from_views(message.tensors)
        if packed is not None:
            entries = [(s.name, dtype_name(s.dtype), s.shape) for s in packed.specs]
            buffers = [byte_view(g) for g in packed.groups.values()]
        else:
            tensors = {k: _cpu_contiguous(t) for k, t in message.tensors.items()}
            entries = [(k, dtype_name(t.dtype), tuple(t.shape)) for k, t in tensors.items()]
            buffers = [byte_view(t) for t in tensors.values()]
        header = {**message.header(), "by_dtype": packed is not None}
        # MPI delivers a sender's messages in order and never drops one to a live peer, so
        # the receiver has seen a layout's list before any message that names it by id.
        known = self._layout_ids.setdefault(dest, {})
        header["layout"] = known.get(tuple(entries))
        if header["layout"] is None:
            header["layout"] = known[tuple(entries)] = len(known)
            header["tensors"] = entries
        header_bytes = torch.frombuffer(bytearray(encode_header(header)), dtype=torch.uint8)
        buffers = [header_bytes] + buffers
        requests = [self.comm.Isend([header_bytes.numpy(), MPI.BYTE], dest, HEADER_TAG)]
        requests += [self.comm.Isend([b.numpy(), MPI.BYTE], dest, DATA_TAG) for b in buffers[1:]]
        return requests, buffers

    def _reap_abandoned(self) -> None:
        if self._abandoned:
            self._abandoned = [(r, b) for r, b in self._abandoned if not _finished(r)]

    def _as_peer_failure(self, error: "MPI.Exception", rank: Optional[int] = None) -> Exception:
        """Turn ULFM's process-failure errors into PeerFailure; other MPI errors pass through.

        ``rank``: the peer of the failed operation, when there is one (a send).
        """
        if error.Get_error_class() not in _FAILURE_CLASSES:
            return error
        self.comm.Ack_failed()
        group = self.comm.Get_failed()
        failed = set(MPI.Group.Translate_ranks(group, list(range(group.Get_size())), self.comm.Get_group()))
        group.Free()
        if rank is not None and rank not in failed:
            return error  # an error in one of the requests that is not the peer's death
        new = failed - self.failed_ranks
        self.failed_ranks |= failed
        return PeerFailure({rank} if rank is not None else (new or failed))

    # -- receiving ---------------------------------------------------------------
    def receive(self, timeout: Optional[float] = None) -> Optional[Message]:
        status = MPI.Status()

        def arrived() -> bool:
            self._reap_abandoned()
            return self.comm.Iprobe(MPI.ANY_SOURCE, HEADER_TAG, status)

        try:
            if not self._poll(arrived, timeout):
                return None
            return self._receive_from(status.Get_source(), status.Get_count(MPI.BYTE), timeout)
        except MPI.Exception as error:
            raise self._as_peer_failure(error) from None

    def _receive_from(self, source: int, header_size: int, timeout: Optional[float]) -> Message:
        raw = bytearray(header_size)
        self.comm.Recv([raw, MPI.BYTE], source, HEADER_TAG)
        try:
            header = decode_header(bytes(raw))
            layout = self._layout(source, header)
            target = self.receive_target
            if target is not None and layout.key == target.layout_key():
                packed = target
            else:
                packed = PackedTensors.empty(layout.specs, layout.sizes, allocate=self.pool.take)
        except (ValueError, TypeError, KeyError, IndexError, RuntimeError) as error:
            # A peer that breaks the wire protocol cannot be trusted to stay in step.
            logging.error("rank %d: malformed message from rank %d (%s); treating it as failed", self.rank, source, error)
            self.failed_ranks.add(source)
            raise PeerFailure({source}) from None
        if header["by_dtype"]:
            targets: Sequence[torch.Tensor] = list(packed.groups.values())
        else:
            targets = [packed.view(spec) for spec in packed.specs]
        requests = [self.comm.Irecv([byte_view(t).numpy(), MPI.BYTE], source, DATA_TAG) for t in targets]
        # The payload is already on its way. A sender that stops mid-message (frozen, its
        # link cut) is treated as failed after payload_timeout rather than hanging us.
        if not self._poll(lambda: MPI.Request.Testall(requests), self.payload_timeout):
            self._abandoned.append((requests, targets))
            self.failed_ranks.add(source)
            raise PeerFailure({source})
        message = Message(header["type"], header["sender"], header["receiver"], header["params"])
        message.set_packed(packed)
        return message

    def _layout(self, source: int, header: Dict) -> "_Layout":
        """The layout a header from ``source`` names, learning it if the header carries it."""
        layouts = self._layouts.setdefault(source, [])
        layout_id = header["layout"]
        if "tensors" in header:
            if layout_id != len(layouts):
                raise ValueError(f"layout {layout_id} announced out of order (expected {len(layouts)})")
            entries = tuple((str(n), dtype_from_name(d), tuple(int(x) for x in s)) for n, d, s in header["tensors"])
            layouts.append(_Layout(entries, *plan_layout(entries)))
        if not (type(layout_id) is int and 0 <= layout_id < len(layouts)):
            raise ValueError(f"unknown layout {layout_id!r}")
        return layouts[layout_id]

    # -- waiting without burning a core --------------------------------------------
    def _poll(self, ready: Callable[[], bool], timeout: Optional[float]) -> bool:
        """Call ``ready()`` until it is true; False if ``timeout`` seconds pass first.

        Spins for ``spin_seconds`` (replies and large transfers usually come within
        that, and a transfer only advances while we call into MPI), then sleeps with an
        exponential back-off capped at ``max_poll_interval``.
        """
        now = time.monotonic()
        deadline = None if timeout is None else now + timeout
        spin_until = now + self.spin_seconds
        delay = 1e-5
        while not ready():
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                return False
            if now < spin_until:
                os.sched_yield()
            else:
                time.sleep(delay)
                delay = min(delay * 2, self.max_poll_interval)
        return True


class _Layout(NamedTuple):
    """A tensor layout a peer announced: its ``(name, dtype, shape)`` entries, planned."""

    key: Tuple[Tuple[str, torch.dtype, Tuple[int, ...]], ...]
    specs: List[TensorSpec]
    sizes: Dict[torch.dtype, int]


# ERR_IN_STATUS: a multi-request call failed in one request (e.g. its peer died).
_FAILURE_CLASSES = (MPI.ERR_PROC_FAILED, MPI.ERR_PROC_FAILED_PENDING, MPI.ERR_REVOKED, MPI.ERR_IN_STATUS)


def _exit_without_mpi_finalize(exit_status: int) -> None:
    # Registered after mpi4py's own exit handler, so it runs first (atexit is LIFO).
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_status)


def _finished(requests: List[MPI.Request]) -> bool:
    try:
        return MPI.Request.Testall(requests)
    except MPI.Exception:  # the peer died: nothing more will happen to these requests
        return True


def _cpu_contiguous(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to("cpu").contiguous()
