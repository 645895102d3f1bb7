"""The event loop shared by the server and client managers: receive, dispatch, repeat."""
from __future__ import annotations

import logging
from argparse import Namespace
from typing import Callable, Dict, Optional

from .communication.message import Message
from .communication.transport import Transport

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
        # Seconds to wait for a message before on_receive_timeout() runs; None waits forever.
        self.receive_timeout: Optional[float] = None
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
            message = self.transport.receive(timeout=self.receive_timeout)
            if message is None:
                self.on_receive_timeout()
                continue
            handler = self.message_handlers.get(message.msg_type)
            if handler is None:
                raise RuntimeError(
                    f"rank {self.rank} ({type(self).__name__}) has no handler for message type "
                    f"{message.msg_type} from rank {message.sender_id}; known types: {sorted(self.message_handlers)}"
                )
            handler(message)
        logging.debug("rank %d: message loop finished", self.rank)

    def on_receive_timeout(self) -> None:
        """Hook: nothing arrived within ``receive_timeout`` seconds."""

    def finish(self) -> None:
        """End :meth:`run` after the current handler returns. Never aborts MPI: every
        rank leaves its loop and exits normally."""
        self._running = False
