"""MPI hostfiles: read, write, and place a run's processes on their hosts.

A hostfile lists one host per line: the server's host first, then the clients' hosts.
``#`` starts a comment. A line may say ``slots=N`` to run N processes on its host
(default 1). Process ids follow the file: the first line's processes come first, then
the second line's, and so on, so a host listed twice runs two processes::

    headnode            # process 0, the server
    computenode1        # process 1
    computenode2 slots=2  # processes 2 and 3

The launcher (fedml_experiments/distributed/launch_fedavg.sh) asks this module where
each process goes before it starts anything::

    python -m fedml_api.utils.hostfile HOSTFILE PROCESS_NUM

prints the host of every process id, comma-separated (mpirun's ``--host`` list for
``--map-by seq``), or exits 2 with an error when the file holds too few processes.

Only the standard library is used: the launcher may run this with any python3.
"""
from __future__ import annotations

import argparse
import ipaddress
import socket
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

_LOCAL_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost"}


class HostfileError(ValueError):
    """A hostfile that cannot be used: unreadable, malformed, or too small for the run."""


@dataclass(frozen=True)
class HostfileEntry:
    """One line of a hostfile: a host and how many processes it runs."""

    host: str
    slots: int = 1


def parse_hostfile(text: str, source: str = "hostfile") -> List[HostfileEntry]:
    """The entries of a hostfile's ``text``, in order; ``source`` names it in errors."""
    entries = []
    for number, raw in enumerate(text.splitlines(), start=1):
        fields = raw.split("#", 1)[0].split()
        if not fields:
            continue
        host, slots = fields[0], 1
        for field in fields[1:]:
            key, _, value = field.partition("=")
            if key != "slots" or not value.isdigit() or int(value) < 1:
                raise HostfileError(f"{source}, line {number}: cannot read '{field}' "
                                    "(expected 'HOST' or 'HOST slots=N' with N >= 1)")
            slots = int(value)
        entries.append(HostfileEntry(host, slots))
    return entries


def read_hostfile(path: Path) -> List[HostfileEntry]:
    """The entries of the hostfile at ``path``; HostfileError when it is unreadable."""
    try:
        text = Path(path).read_text()
    except OSError as error:
        raise HostfileError(f"cannot read hostfile {path}: {error.strerror}") from error
    return parse_hostfile(text, source=str(path))


def format_hostfile(server: str, clients: Sequence[str]) -> str:
    """A hostfile running the server on ``server`` and client i on ``clients[i-1]``."""
    if not clients:
        raise HostfileError("a federation needs at least one client host")
    for host in (server, *clients):
        if not host or host.startswith("-") or any(c.isspace() or c == "#" for c in host):
            raise HostfileError(f"'{host}' is not a host name or address")
    lines = [f"{server}  # process 0: the server"]
    lines += [f"{host}  # process {i}: client {i}" for i, host in enumerate(clients, start=1)]
    return "\n".join(lines) + "\n"


def total_processes(entries: Sequence[HostfileEntry]) -> int:
    """How many processes the hostfile holds (every line's slots)."""
    return sum(entry.slots for entry in entries)


def processes_per_host(entries: Sequence[HostfileEntry]) -> Dict[str, int]:
    """Processes each host runs, hosts in order of first appearance."""
    counts: Counter = Counter()
    for entry in entries:
        counts[entry.host] += entry.slots
    return dict(counts)


def place_processes(entries: Sequence[HostfileEntry], process_num: int, source: str = "hostfile") -> List[str]:
    """The host of each process id 0..process_num-1, following the hostfile's order.

    Raises HostfileError, naming both numbers, when the entries hold fewer than
    ``process_num`` processes. Processes beyond ``process_num`` are simply not used.
    """
    held = total_processes(entries)
    if held < process_num:
        raise HostfileError(
            f"{source} holds {held} process{'es' if held != 1 else ''} ({len(entries)} host lines, "
            f"slots included) but this run needs {process_num}: the server and {process_num - 1} "
            f"clients (CLIENT_NUM={process_num - 1}). Add hosts: list a host once per process it "
            "should run, or write 'HOST slots=N'.")
    placement = [entry.host for entry in entries for _ in range(entry.slots)]
    return placement[:process_num]


def is_local_host(host: str) -> bool:
    """Whether ``host`` names this machine: a loopback name, its hostname, or one of its addresses.

    A name is resolved and each address is tried with ``bind``, which succeeds only for
    addresses of this machine's interfaces. An unresolvable name is not local.
    """
    if host in _LOCAL_NAMES or host in {socket.gethostname(), socket.gethostname().split(".")[0]}:
        return True
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        return False
    for family, _, _, _, address in infos:
        if ipaddress.ip_address(str(address[0]).split("%")[0]).is_loopback:
            return True
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            try:
                probe.bind((address[0], 0, *address[2:]))  # IPv6 keeps its flow info and scope
                return True
            except OSError:
                continue
    return False


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``HOSTFILE PROCESS_NUM``: print the comma-separated host of each process id;
    ``--count HOSTFILE``: print how many processes the hostfile holds."""
    parser = argparse.ArgumentParser(description="Print the host of each process id, as mpirun's --host list.")
    parser.add_argument("--count", action="store_true", help="print the number of processes the hostfile holds instead")
    parser.add_argument("hostfile", type=Path)
    parser.add_argument("process_num", type=int, nargs="?")
    args = parser.parse_args(argv)
    if not args.count and args.process_num is None:
        parser.error("PROCESS_NUM is required (or --count)")
    try:
        entries = read_hostfile(args.hostfile)
        if args.count:
            print(total_processes(entries))
            return 0
        placement = place_processes(entries, args.process_num, source=str(args.hostfile))
    except HostfileError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(",".join(placement))
    return 0


if __name__ == "__main__":
    sys.exit(main())
