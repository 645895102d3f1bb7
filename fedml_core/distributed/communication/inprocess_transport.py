"""Message transport between threads of one process, for testing the protocol without mpirun.

It behaves like the wire: headers go through JSON, tensors are copied into a
fresh :class:`PackedTensors` (so sender and receiver never share memory), and messages
from one sender to one receiver keep their order. Any rank may send to any rank.

A test can declare a rank dead (:meth:`InProcessHub.fail`), as ULFM reports a dead MPI
process: a send to it raises :class:`PeerFailure`, and every other rank's next
``receive`` raises :class:`PeerFailure` naming it once.
"""
from __future__ import annotations

import queue
import threading
import time
from typing import List, Optional, Set

from .message import Message, decode_header, encode_header
from .packed_tensors import PackedTensors
from .transport import PeerFailure, Transport

# Put in every other rank's inbox when a rank fails: wakes a waiting receive.
_PEER_FAILED = object()


class InProcessHub:
    """Creates the connected transports of a ``world_size``-rank job inside one process."""

    def __init__(self, world_size: int) -> None:
        if world_size < 2:
            raise ValueError(f"world_size must be at least 2 (a server and a client), got {world_size}")
        self.world_size = world_size
        self.inboxes: List["queue.Queue[Message]"] = [queue.Queue() for _ in range(world_size)]
        self.failed: Set[int] = set()
        self._lock = threading.Lock()

    def transport(self, rank: int) -> "InProcessTransport":
        return InProcessTransport(self, rank)

    def fail(self, rank: int) -> None:
        """Declare ``rank`` dead (its thread has stopped): what it sent before stays
        deliverable; sends to it raise PeerFailure; every other rank's receive raises
        PeerFailure naming it, once."""
        with self._lock:
            self.failed.add(rank)
        for other, inbox in enumerate(self.inboxes):
            if other != rank:
                inbox.put(_PEER_FAILED)


class InProcessTransport(Transport):
    """The endpoint of rank ``rank`` in an :class:`InProcessHub`."""

    def __init__(self, hub: InProcessHub, rank: int) -> None:
        if not 0 <= rank < hub.world_size:
            raise ValueError(f"rank must be in [0, {hub.world_size}), got {rank}")
        self.hub = hub
        self.rank = rank
        self.world_size = hub.world_size
        self._reported: Set[int] = set()  # failed ranks this rank has been told of

    def send(self, message: Message, timeout: Optional[float] = None) -> None:
        if message.receiver_id in self.hub.failed:
            raise PeerFailure({message.receiver_id})
        header = decode_header(encode_header(message.header()))
        copy = Message(header["type"], header["sender"], header["receiver"], header["params"])
        copy.set_packed(PackedTensors.from_tensors(message.tensors))
        self.hub.inboxes[message.receiver_id].put(copy)

    def receive(self, timeout: Optional[float] = None) -> Optional[Message]:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                message = self.hub.inboxes[self.rank].get(
                    timeout=None if deadline is None else max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                return None
            if message is not _PEER_FAILED:
                break
            with self.hub._lock:
                new = self.hub.failed - self._reported
                self._reported |= new
            if new:  # else told already, by an earlier notice
                raise PeerFailure(new)
        target = self.receive_target
        if target is not None and message.packed.layout_key() == target.layout_key():
            for dtype, group in message.packed.groups.items():
                target.groups[dtype].copy_(group)
            message.set_packed(target)
        return message
