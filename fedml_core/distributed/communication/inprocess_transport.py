"""Message transport between threads of one process, for testing the protocol without mpirun.

It behaves like the wire: headers go through JSON, tensors are copied into a
fresh :class:`PackedTensors` (so sender and receiver never share memory), and messages
from one sender to one receiver keep their order.
"""
from __future__ import annotations

import queue
from typing import List, Optional

from .message import Message, decode_header, encode_header
from .packed_tensors import PackedTensors
from .transport import Transport


class InProcessHub:
    """Creates the connected transports of a ``world_size``-rank job inside one process."""

    def __init__(self, world_size: int) -> None:
        if world_size < 2:
            raise ValueError(f"world_size must be at least 2 (a server and a client), got {world_size}")
        self.world_size = world_size
        self.inboxes: List["queue.Queue[Message]"] = [queue.Queue() for _ in range(world_size)]

    def transport(self, rank: int) -> "InProcessTransport":
        return InProcessTransport(self, rank)


class InProcessTransport(Transport):
    """The endpoint of rank ``rank`` in an :class:`InProcessHub`."""

    def __init__(self, hub: InProcessHub, rank: int) -> None:
        if not 0 <= rank < hub.world_size:
            raise ValueError(f"rank must be in [0, {hub.world_size}), got {rank}")
        self.hub = hub
        self.rank = rank
        self.world_size = hub.world_size

    def send(self, message: Message, timeout: Optional[float] = None) -> None:
        header = decode_header(encode_header(message.header()))
        copy = Message(header["type"], header["sender"], header["receiver"], header["params"])
        copy.set_packed(PackedTensors.from_tensors(message.tensors))
        self.hub.inboxes[message.receiver_id].put(copy)

    def receive(self, timeout: Optional[float] = None) -> Optional[Message]:
        try:
            message = self.hub.inboxes[self.rank].get(timeout=timeout)
        except queue.Empty:
            return None
        target = self.receive_target
        if target is not None and message.packed.layout_key() == target.layout_key():
            for dtype, group in message.packed.groups.items():
                target.groups[dtype].copy_(group)
            message.set_packed(target)
        return message
