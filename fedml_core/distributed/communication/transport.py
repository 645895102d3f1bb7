"""The transport interface: moves :class:`Message` objects between ranks."""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Optional

from .message import Message


class TransportTimeout(TimeoutError):
    """A send could not complete within its deadline (the peer is gone or stuck)."""


class Transport(ABC):
    """Point-to-point delivery of messages between the ranks of one job.

    ``rank`` is this process's id (0 is the server); ``world_size`` counts all ranks.
    Messages from one sender to one receiver arrive in the order they were sent.
    """

    rank: int
    world_size: int

    @abstractmethod
    def send(self, message: Message, timeout: Optional[float] = None) -> None:
        """Deliver ``message`` to ``message.receiver_id``.

        Returns once the message's tensors may be modified again by the caller.
        Raises :class:`TransportTimeout` if that takes longer than ``timeout`` seconds.
        """

    @abstractmethod
    def receive(self, timeout: Optional[float] = None) -> Optional[Message]:
        """Wait for the next message addressed to this rank, from any sender.

        Returns None if none arrived within ``timeout`` seconds (``None``: wait forever).
        Waiting does not spin a CPU core.
        """

    def close(self) -> None:
        """Release resources; the transport is unusable afterwards."""
