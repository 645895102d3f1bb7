"""The event loop shared by the server and client managers: receive, dispatch, repeat."""
from __future__ import annotations

import logging
import time
from argparse import Namespace
from typing import Callable, Dict, FrozenSet, Optional

from .communication.message import Message
from .communication.transport import PeerFailure, Transport

MessageHandler = Callable[[Message], None]


class MessageLoop:
    """A state machine driven by messages.

    Subclasses register one handler per message type in
    :meth:`register_message_receive_handlers`; :meth:`run` then delivers every incoming
    message to its handler until a handler calls :meth:`finish`. The loop never knows
    whether the transport is MPI or in-process.

    Args:
        args: the run's arguments (kept as ``self.args`` for subclasses).
        transport: moves messages; its ``rank`` is this process's id.
    """

    def __init__(self, args: Namespace, transport: Transport) -> None:
        self.args = args
        self.transport = transport
        self.rank = transport.rank
        self.size = transport.world_size
        self.message_handlers: Dict[int, MessageHandler] = {}
        # time.monotonic() at which on_deadline() runs if no message came; None: no deadline.
        self.deadline: Optional[float] = None
        self._running = False

    def register_message_receive_handlers(self) -> None:
        """Hook: call :meth:`register_message_receive_handler` for each message type."""

    def register_message_receive_handler(self, msg_type: int, handler: MessageHandler) -> None:
        self.message_handlers[msg_type] = handler

    def get_sender_id(self) -> int:
        return self.rank

    def send_message(self, message: Message) -> None:
        self.transport.send(message)

    def run(self) -> None:
        """Dispatch messages until :meth:`finish` is called."""
        self.register_message_receive_handlers()
        self._running = True
        while self._running:
            timeout = None if self.deadline is None else max(0.0, self.deadline - time.monotonic())
            try:
                message = self.transport.receive(timeout=timeout)
            except PeerFailure as failure:
                self.on_peer_failure(failure.ranks)
                continue
            if message is None:
                self.deadline = None
                self.on_deadline()
                continue
            handler = self.message_handlers.get(message.msg_type)
            if handler is None:
                raise RuntimeError(
                    f"rank {self.rank} ({type(self).__name__}) has no handler for message type "
                    f"{message.msg_type} from rank {message.sender_id}; known types: {sorted(self.message_handlers)}"
                )
            handler(message)
        logging.debug("rank %d: message loop finished", self.rank)

    def on_deadline(self) -> None:
        """Hook: ``self.deadline`` passed (it is reset to None before this runs)."""

    def on_peer_failure(self, ranks: FrozenSet[int]) -> None:
        """Hook: the transport reports that the processes ``ranks`` died."""
        raise PeerFailure(ranks)

    def finish(self) -> None:
        """End :meth:`run` after the current handler returns. Never aborts MPI: every
        rank leaves its loop and exits normally."""
        self._running = False
