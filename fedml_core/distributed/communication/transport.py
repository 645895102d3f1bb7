"""The transport interface: moves :class:`Message` objects between ranks."""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Dict, FrozenSet, Iterable, Optional, Sequence

import torch

from .message import Message
from .packed_tensors import PackedTensors, allocate_bytes


class TransportTimeout(TimeoutError):
    """A send could not complete within its deadline (the peer is gone or stuck)."""


class PeerFailure(RuntimeError):
    """The communication layer reports that peer processes died (e.g. MPI ULFM).

    Attributes:
        ranks: the ranks newly known to have failed.
    """

    def __init__(self, ranks: Iterable[int]) -> None:
        self.ranks: FrozenSet[int] = frozenset(ranks)
        super().__init__(f"processes {sorted(self.ranks)} failed")


class Transport(ABC):
    """Point-to-point delivery of messages between the ranks of one job.

    ``rank`` is this process's id (0 is the server); ``world_size`` counts all ranks.
    Messages from one sender to one receiver arrive in the order they were sent.
    """

    rank: int
    world_size: int
    #: Where tensors whose layout matches arrive (see :meth:`receive_into`); None: fresh memory.
    receive_target: Optional[PackedTensors] = None

    @abstractmethod
    def send(self, message: Message, timeout: Optional[float] = None) -> None:
        """Deliver ``message`` to ``message.receiver_id``.

        Returns once the message's tensors may be modified again by the caller (tensors
        in lendable memory: see :meth:`allocate_lendable`).
        Raises :class:`TransportTimeout` if that takes longer than ``timeout`` seconds.
        """

    def send_many(self, messages: Sequence[Message], timeout: Optional[float] = None) -> Dict[int, Exception]:
        """Deliver several messages concurrently: those to one receiver in their order.

        Waits at most ``timeout`` seconds in all. A receiver that cannot be reached in
        time, or that has died, does not stop the others: returns ``{receiver_id:
        error}`` for the receivers not delivered all their messages (empty when all were).
        """
        failures: Dict[int, Exception] = {}
        for message in messages:
            if message.receiver_id in failures:
                continue
            try:
                self.send(message, timeout)
            except (TransportTimeout, PeerFailure) as error:
                failures[message.receiver_id] = error
        return failures

    @abstractmethod
    def receive(self, timeout: Optional[float] = None) -> Optional[Message]:
        """Wait for the next message addressed to this rank, from any sender.

        Returns None if none arrived within ``timeout`` seconds (``None``: wait forever).
        Waiting does not spin a CPU core. Raises :class:`PeerFailure` when the
        communication layer learns that peers died (then call ``receive`` again).
        """

    def receive_into(self, target: Optional[PackedTensors]) -> None:
        """From now on, receive the tensors of every message whose layout (names, dtypes,
        shapes, order) is ``target``'s straight into ``target``, overwriting it; other
        messages still get fresh memory. ``None`` turns this off.

        For a rank that loads each model it receives into one place at once, e.g. a
        client whose model was packed with ``pack_module``: the model then arrives in
        the module's own memory, and loading it copies nothing.
        """
        self.receive_target = target

    def allocate_lendable(self, nbytes: int) -> torch.Tensor:
        """``nbytes`` of CPU memory (a 1-D uint8 tensor) for tensors this rank sends
        again and again, e.g. a client's packed model (``pack_module(model,
        allocate=transport.allocate_lendable)``). A receiver on this host that accepts
        lent tensors (:meth:`accept_lent_tensors`) may then read a message's tensors
        straight from this memory instead of receiving a copy.

        The price: after sending a message whose tensors live here, leave them unchanged
        until the receiver has sent this rank a message. A request/response protocol,
        where the next thing that writes this memory is the receiver's next message,
        meets that by construction.
        """
        return allocate_bytes(nbytes)

    def accept_lent_tensors(self) -> None:
        """Let senders on this host lend this rank the tensors of their messages (see
        :meth:`allocate_lendable`): a received message's tensors may then live in the
        sender's memory, valid until this rank next sends a message to that sender. For
        a rank that is done with each message before it answers its sender (a FedAvg
        server aggregates a round's updates before it sends the next model). Tensors are
        always bit-exact; without this call (or where memory cannot be shared) they are
        copies."""

    def abandon(self, rank: int) -> None:
        """Note that ``rank`` was given up on (dead, frozen, unreachable)."""

    def can_finalize(self) -> bool:
        """Whether this process may take part in the job-wide shutdown handshake
        (MPI_Finalize): False once any peer died or was given up on, since the handshake
        would then wait for it forever. Every live rank must decide alike (the server
        tells the clients in its finish message), or those that finalize wait forever
        for those that do not."""
        return True

    def close(self, exit_status: int = 0, finalize: bool = True) -> None:
        """This process is done with the job and will exit with ``exit_status``.

        ``finalize=False``: leave without the shutdown handshake (see :meth:`can_finalize`),
        e.g. a client that stops early, or one the server told that a peer was lost.
        """
