"""Tells the launcher that the server is done, so it can stop ranks that never exit.

A client frozen by SIGSTOP (or stuck in a kernel call) never exits, and mpirun waits
for every rank. ``launch_fedavg.sh`` therefore gives each job a status file through
``FEDML_STATUS_FILE``; the server writes its exit status there when it is done, and the
launcher stops whatever is still running after a grace period.
"""
from __future__ import annotations

import os
import socket

STATUS_FILE_ENV = "FEDML_STATUS_FILE"


def report_server_exit(status: int) -> None:
    """Record the server's exit status for the launcher (no-op outside the launcher)."""
    path = os.environ.get(STATUS_FILE_ENV)
    if not path:
        return
    temporary = f"{path}.partial"
    with open(temporary, "w") as f:
        f.write(f"{status}\n")
    os.replace(temporary, path)  # the launcher never reads a half-written status


def report_server_start() -> None:
    """Leave ``HOST PID`` of the server for the launcher, which then stops the job if the
    server dies without reporting an exit status (no-op outside the launcher)."""
    path = os.environ.get(STATUS_FILE_ENV)
    if not path:
        return
    temporary = f"{path}.server.partial"
    with open(temporary, "w") as f:
        f.write(f"{socket.gethostname()} {os.getpid()}\n")
    os.replace(temporary, f"{path}.server")
