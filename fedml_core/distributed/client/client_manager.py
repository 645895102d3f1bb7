"""Base class of the client (ranks 1..N) side of a federated algorithm."""
from __future__ import annotations

from ..message_loop import MessageLoop


class ClientManager(MessageLoop):
    """Runs on every rank but 0: answers the server's requests until told to finish.

    Construct with ``(args, transport)``; see :class:`~fedml_core.distributed.message_loop.MessageLoop`.
    """
