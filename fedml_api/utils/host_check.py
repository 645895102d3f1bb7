"""Check, before launching, that every host of a run can take part in it.

mpirun starts remote processes over ssh without a terminal, in the launching
directory, with the launching host's python; a host that prompts for a password,
lacks the project or its environment fails only after the others have started.
:func:`first_unready_host` finds such a host first, with the reason.
"""
from __future__ import annotations

import os
import shlex
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import List, Mapping, Optional, Sequence, Tuple

from fedml_api.utils.hostfile import is_local_host

# Exit statuses of the probe script (ssh itself exits 255 when it cannot connect).
_NO_PROJECT, _NO_PYTHON, _NO_MODULES = 10, 11, 12
# How long importing torch may take on a busy host, beyond the ssh connection.
_IMPORT_TIMEOUT = 60.0
# A file every checkout of the project has: the launcher mpirun is started from.
_PROJECT_MARKER = "fedml_experiments/distributed/launch_fedavg.sh"


@dataclass(frozen=True)
class HostProblem:
    """Why ``host`` (playing ``role``, e.g. ``client 2 (process 2)``) is not ready."""

    host: str
    role: str
    reason: str

    def __str__(self) -> str:
        return f"{self.role} host {self.host} is not ready: {self.reason}"


def ssh_command(env: Mapping[str, str] = os.environ) -> List[str]:
    """The ssh command mpirun will use: Open MPI 5 takes it from ``PRTE_MCA_plm_ssh_agent``
    (alternatives separated by ``:``, the first is tried first), else plain ``ssh``."""
    agent = env.get("PRTE_MCA_plm_ssh_agent", "").split(":")[0].strip()
    return shlex.split(agent) if agent else ["ssh"]


def probe_script(project_dir: str, python: str) -> str:
    """A POSIX shell script that exits 0 when the project and its python are usable here."""
    project, py = shlex.quote(project_dir), shlex.quote(python)
    marker = shlex.quote(os.path.join(project_dir, _PROJECT_MARKER))
    return (f"test -f {marker} || exit {_NO_PROJECT}; "
            f"test -x {py} || exit {_NO_PYTHON}; "
            f"cd {project} && {py} -c 'import torch, mpi4py' || exit {_NO_MODULES}")


def check_host(host: str, project_dir: str, python: str, ssh: Sequence[str],
               connect_timeout: float = 5.0) -> Optional[str]:
    """Why ``host`` cannot run the project's processes, or None when it can.

    A remote host is probed over ``ssh`` non-interactively (BatchMode: a password or
    host-key prompt is a failure, not a hang); this machine is probed directly, as
    mpirun starts its processes without ssh.
    """
    script = probe_script(project_dir, python)
    local = is_local_host(host)
    if local:
        command = ["sh", "-c", script]
    else:
        command = [*ssh, "-o", "BatchMode=yes", "-o", f"ConnectTimeout={connect_timeout:g}", host, script]
    try:
        result = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                timeout=connect_timeout + _IMPORT_TIMEOUT)
    except subprocess.TimeoutExpired:
        return f"no answer within {connect_timeout + _IMPORT_TIMEOUT:.0f} s"
    errors = result.stderr.strip().splitlines()
    last_error = errors[-1] if errors else ""
    if result.returncode == 0:
        return None
    if result.returncode == 255 and not local:
        return f"cannot ssh to it non-interactively ({' '.join(ssh)}): {last_error or 'ssh exited 255'}"
    if result.returncode == _NO_PROJECT:
        return f"the project is not at {project_dir} (no {_PROJECT_MARKER})"
    if result.returncode == _NO_PYTHON:
        return f"python {python} is not there (the same environment must be at the same path)"
    if result.returncode == _NO_MODULES:
        return f"{python} cannot import torch and mpi4py: {last_error}"
    return f"the check exited {result.returncode}: {last_error}"


def first_unready_host(roles: Sequence[Tuple[str, str]], project_dir: str, python: str,
                       ssh: Sequence[str], connect_timeout: float = 5.0) -> Optional[HostProblem]:
    """The first of ``roles`` (``(role, host)`` pairs, in process order) whose host is not
    ready, or None. Hosts are probed in parallel, each once however often it is listed."""
    hosts = list(dict.fromkeys(host for _, host in roles))
    with ThreadPoolExecutor(max_workers=min(8, len(hosts))) as pool:
        reasons = dict(zip(hosts, pool.map(
            lambda host: check_host(host, project_dir, python, ssh, connect_timeout), hosts)))
    for role, host in roles:
        reason = reasons[host]
        if reason is not None:
            return HostProblem(host, role, reason)
    return None
