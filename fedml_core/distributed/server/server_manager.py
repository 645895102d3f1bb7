"""Base class of the server (rank 0) side of a federated algorithm."""
from __future__ import annotations

from ..message_loop import MessageLoop


class ServerManager(MessageLoop):
    """Runs on rank 0: registers handlers for client messages and drives the rounds.

    Construct with ``(args, transport)``; see :class:`~fedml_core.distributed.message_loop.MessageLoop`.
    """
