"""Message transport over MPI (mpi4py).

Wire format of one message from rank ``s`` to rank ``r``:

1. a small JSON header on ``HEADER_TAG``: type, sender, receiver, plain params, how
   the payload is cut, and the id of its tensor layout (the tensors' ``(name, dtype,
   shape)`` list). A layout's list travels only the first time the sender uses it with
   this receiver; later messages (every round's model) name it by id alone;
2. the payload as raw bytes on ``DATA_TAG``: either one buffer per tensor (when the
   sender's tensors are separate, e.g. a live ``state_dict``) or one buffer per dtype
   (when the sender already holds them packed, e.g. an aggregated global model).
   No payload at all when the tensors are lent (below).

The receiver allocates a :class:`PackedTensors` from the header and receives the bytes
straight into it, so a model arrives as flat per-dtype buffers with no extra copy. MPI
keeps messages of one (source, tag) in order, so payloads always follow their header.

Lending (see :mod:`.lending`): tensors sent from memory of
:meth:`MpiTransport.allocate_lendable` carry an offer of that memory the first time
they go to a peer. A peer that accepts lent tensors and can map it says so in the
header of its next message to the sender; the sender's later messages from that memory
name the segment and the offset of each dtype's buffer, and carry no payload. A
message's tensors are thus always either received bytes or the sender's own memory.

Failures: under Open MPI's ULFM (``mpirun --with-ft ulfm``) a dead peer surfaces as
an MPI error; the transport acknowledges it and raises :class:`PeerFailure` naming
the dead ranks, and a send to a dead or frozen peer fails or times out without
blocking the sends to other peers (:meth:`MpiTransport.send_many`).

Waiting never spins a core for long: a wait spins for ``spin_seconds`` (20 ms where
each rank has a core: echoes and large transfers land within it; none where ranks
outnumber cores), yielding the core to any other runnable process at each probe, then
probes with an exponential sleep back-off (from 10 us) capped at ``max_poll_interval``
(1 ms by default), which bounds the added latency while keeping an idle rank near 0% CPU.
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

from .lending import CannotBorrow, LendableSegment, borrow
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
        spin_seconds: how long a wait polls without sleeping before it backs off. None
            (the default): 20 ms where this host has a core for each of the job's
            ranks on it, else 0, since a spinning rank then takes a core that another
            rank needs to copy or compute (Open MPI yields for the same reason when
            oversubscribed). Finding that out makes the constructor collective: every
            rank of ``comm`` constructs its transport together.
        payload_timeout: seconds a message's tensors may take to arrive once its header
            has; a sender slower than that is reported as failed.
    """

    def __init__(self, comm: Optional[MPI.Comm] = None, max_poll_interval: float = 1e-3, spin_seconds: Optional[float] = None,
                 payload_timeout: float = 120.0) -> None:
        self.comm = comm if comm is not None else MPI.COMM_WORLD
        self.rank = self.comm.Get_rank()
        self.world_size = self.comm.Get_size()
        self.max_poll_interval = max_poll_interval
        self.spin_seconds = spin_seconds if spin_seconds is not None else (0.0 if _host_oversubscribed(self.comm) else 0.02)
        self.payload_timeout = payload_timeout
        self.pool = BufferPool()
        self.failed_ranks: set = set()
        # Sends given up on (peer frozen) keep their buffers alive until MPI completes them.
        self._abandoned: List[Tuple[List[MPI.Request], List[torch.Tensor]]] = []
        # Layout ids: {receiver: {layout: id}} for sending, {sender: [layouts by id]} for receiving.
        self._layout_ids: Dict[int, Dict[Tuple, int]] = {}
        self._layouts: Dict[int, List[_Layout]] = {}
        # Lending. Ours: segments (by id), offered / accepted per peer. Theirs: whether we
        # take them, what we mapped {peer: {segment id: memory}}, acceptances to announce.
        self._segments: List[LendableSegment] = []
        self._offered: Dict[int, set] = {}
        self._lending_to: Dict[int, set] = {}
        self._accepts_lent = False
        self._borrowed: Dict[int, Dict[int, torch.Tensor]] = {}
        self._to_announce: Dict[int, List[int]] = {}
        #: Messages received whose tensors were read in the sender's memory.
        self.borrowed_messages = 0

    # -- lending -------------------------------------------------------------------
    def allocate_lendable(self, nbytes: int) -> torch.Tensor:
        if nbytes <= 0:
            return super().allocate_lendable(nbytes)
        self._segments.append(LendableSegment(nbytes))
        return self._segments[-1].memory

    def accept_lent_tensors(self) -> None:
        self._accepts_lent = True

    def _lend(self, dest: int, packed: PackedTensors, header: Dict) -> bool:
        """Name ``packed``'s buffers in our memory in ``header`` if ``dest`` has mapped
        that memory (True: send no payload); offer the memory if not offered yet."""
        for segment_id, segment in enumerate(self._segments):
            offsets = segment.offsets_of(packed.groups.values())
            if offsets is None:
                continue
            if segment_id in self._lending_to.get(dest, ()):
                header["lent"] = {"segment": segment_id, "offsets": offsets}
                return True
            offered = self._offered.setdefault(dest, set())
            if segment_id not in offered:
                offered.add(segment_id)
                header["offer"] = segment.offer(segment_id)
            return False
        return False

    def _consider_offer(self, source: int, offer: Dict) -> None:
        """Map a peer's offered memory if we take lent tensors and can; else it goes on
        sending copies. Raises ValueError for a malformed offer."""
        if not self._accepts_lent:
            return
        try:
            memory = borrow(offer)
        except CannotBorrow as reason:
            logging.info("rank %d: rank %d sends copies of its tensors: %s", self.rank, source, reason)
            return
        logging.info("rank %d: reads rank %d's tensors in its memory from now on (same host)", self.rank, source)
        self._borrowed.setdefault(source, {})[offer["segment"]] = memory
        self._to_announce.setdefault(source, []).append(offer["segment"])

    def _borrowed_tensors(self, source: int, layout: "_Layout", lent: Dict) -> PackedTensors:
        """The tensors of a lent message: views of the sender's memory, bounds checked."""
        memory = self._borrowed.get(source, {}).get(lent["segment"])
        offsets = lent["offsets"]
        if memory is None or not isinstance(offsets, list) or len(offsets) != len(layout.sizes):
            raise ValueError(f"lent tensors in memory that was not offered: {lent!r}")
        groups = {}
        for (dtype, count), offset in zip(layout.sizes.items(), offsets):
            itemsize = dtype.itemsize
            if not (type(offset) is int and offset % itemsize == 0 and 0 <= offset <= offset + count * itemsize <= memory.numel()):
                raise ValueError(f"lent {dtype} tensors at offset {offset!r} are not inside the offered memory")
            groups[dtype] = memory.narrow(0, offset, count * itemsize).view(dtype)
        self.borrowed_messages += 1
        return PackedTensors(layout.specs, groups)

    # -- ending --------------------------------------------------------------------
    def abandon(self, rank: int) -> None:
        self.failed_ranks.add(rank)

    def can_finalize(self) -> bool:
        return not self.failed_ranks

    def close(self, exit_status: int = 0, finalize: bool = True) -> None:
        """Finish with the job. MPI_Finalize waits for every process of the job, so after a
        peer died or was given up on (or when ``finalize`` is False) it could wait forever:
        then the process exits with ``exit_status`` at interpreter shutdown without
        finalizing MPI (after the other exit handlers, e.g. wandb's, have run)."""
        if not (finalize and self.can_finalize()):
            atexit.register(_exit_without_mpi_finalize, exit_status)

    # -- sending -----------------------------------------------------------------
    def send(self, message: Message, timeout: Optional[float] = None) -> None:
        failure = self.send_many([message], timeout).get(message.receiver_id)
        if failure is not None:
            raise failure

    def send_many(self, messages: Sequence[Message], timeout: Optional[float] = None) -> Dict[int, Exception]:
        pending: Dict[int, Tuple[List[MPI.Request], List[torch.Tensor]]] = {}
        for message in messages:  # posted in order: MPI delivers a receiver's messages in that order
            requests, buffers = self._post(message)
            posted = pending.setdefault(message.receiver_id, ([], []))
            posted[0].extend(requests)
            posted[1].extend(buffers)
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
        if self._to_announce.get(dest):
            header["accepted"] = self._to_announce.pop(dest)
        if packed is not None and self._lend(dest, packed, header):
            buffers = []
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
            self._lending_to.setdefault(source, set()).update(_segment_ids(header.get("accepted", [])))
            if "offer" in header:
                self._consider_offer(source, header["offer"])
            target = self.receive_target
            lent = self._borrowed_tensors(source, layout, header["lent"]) if "lent" in header else None
            if target is not None and layout.key == target.layout_key():
                packed = target
            elif lent is not None:
                packed = lent
            else:
                packed = PackedTensors.empty(layout.specs, layout.sizes, allocate=self.pool.take)
        except (ValueError, TypeError, KeyError, IndexError, RuntimeError) as error:
            # A peer that breaks the wire protocol cannot be trusted to stay in step.
            logging.error("rank %d: malformed message from rank %d (%s); treating it as failed", self.rank, source, error)
            self.failed_ranks.add(source)
            raise PeerFailure({source}) from None
        if lent is not None:
            # The tensors are in the sender's memory: no payload follows.
            if packed is not lent:  # a receive target, which must end up holding them
                for dtype, group in lent.groups.items():
                    packed.groups[dtype].copy_(group)
            targets: Sequence[torch.Tensor] = []
        elif header["by_dtype"]:
            targets = list(packed.groups.values())
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


def _host_oversubscribed(comm: MPI.Comm) -> bool:
    """True if this host runs more of ``comm``'s ranks than this process has cores (collective)."""
    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    ranks_here = local.Get_size()
    local.Free()
    return ranks_here > len(os.sched_getaffinity(0))


def _segment_ids(ids) -> List[int]:
    if not (isinstance(ids, list) and all(type(i) is int for i in ids)):
        raise ValueError(f"malformed list of accepted memory segments {ids!r}")
    return ids


def _cpu_contiguous(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to("cpu").contiguous()
