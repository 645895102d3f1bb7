"""Tells the launcher that the server is done, so it can stop ranks that never exit.

A client frozen by SIGSTOP (or stuck in a kernel call) never exits, and mpirun waits
for every rank. ``launch_fedavg.sh`` therefore gives each job a status file through
``FEDML_STATUS_FILE``; the server writes its exit status there when it is done, and the
launcher stops whatever is still running after a grace period. At start the server also
leaves its host and pid beside it (``<file>.server``), so that the launcher can stop the
job when the server dies without reporting.
"""
from __future__ import annotations

import os
import socket

STATUS_FILE_ENV = "FEDML_STATUS_FILE"


def report_server_exit(status: int) -> None:
    """Record the server's exit status for the launcher (no-op outside the launcher)."""
    _report("", f"{status}\n")


def report_server_start() -> None:
    """Leave ``HOST PID`` of the server for the launcher, which then stops the job if the
    server dies without reporting an exit status (no-op outside the launcher)."""
    _report(".server", f"{socket.gethostname()} {os.getpid()}\n")


def _report(suffix: str, text: str) -> None:
    """Write ``text`` to the status file's path + ``suffix``, atomically: the launcher
    never reads a half-written file."""
    path = os.environ.get(STATUS_FILE_ENV)
    if not path:
        return
    temporary = f"{path}{suffix}.partial"
    with open(temporary, "w") as f:
        f.write(text)
    os.replace(temporary, path + suffix)
