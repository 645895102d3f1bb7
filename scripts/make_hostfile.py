#!/usr/bin/env python
"""Write the MPI hostfile of a federation, and check its hosts before launching.

    python scripts/make_hostfile.py --server headnode --clients node1 node2 node3 \\
        --out fedml_experiments/distributed/fedResNet18/mpi_host_file --check

lists the server's host first, then the clients' hosts in order (process i runs on the
i-th line; a host given twice runs two processes). Without ``--out`` the hostfile goes to
stdout. With ``--check`` every host is probed first, as mpirun will reach it: ssh without
prompts (BatchMode, short ConnectTimeout; the ssh command Open MPI uses, from
``PRTE_MCA_plm_ssh_agent`` when set), the project at this checkout's path, and the
python running this script (or ``--python``) importing torch and mpi4py. The first host
that fails is named with the reason, nothing is written and the exit status is 1.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

# Make the repository importable however the script is launched (any cwd, no install).
REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from fedml_api.utils.host_check import first_unready_host, ssh_command  # noqa: E402
from fedml_api.utils.hostfile import HostfileError, format_hostfile, parse_hostfile, processes_per_host  # noqa: E402


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Write mpi_host_file: the server's host, then the clients' hosts.")
    parser.add_argument("--server", required=True, metavar="HOST", help="host of the server (process 0)")
    parser.add_argument("--clients", required=True, nargs="+", metavar="HOST",
                        help="host of client 1, client 2, ... (process ids 1..CLIENT_NUM)")
    parser.add_argument("--out", type=Path, help="hostfile to write (default: print it)")
    parser.add_argument("--check", action="store_true",
                        help="first check that every host answers ssh and has the project and its python")
    parser.add_argument("--python", default=sys.executable,
                        help="python the hosts must have (default: the one running this script)")
    parser.add_argument("--connect_timeout", type=float, default=5.0, help="ssh connect timeout in seconds")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        text = format_hostfile(args.server, args.clients)
    except HostfileError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.check:
        roles = [("server (process 0)", args.server)]
        roles += [(f"client {i} (process {i})", host) for i, host in enumerate(args.clients, start=1)]
        problem = first_unready_host(roles, str(REPO_ROOT), args.python, ssh_command(), args.connect_timeout)
        if problem is not None:
            print(f"error: {problem}" + (f"; {args.out} not written" if args.out else ""), file=sys.stderr)
            return 1
        print(f"checked {len(set(h for _, h in roles))} hosts: ssh works, the project is at {REPO_ROOT}, "
              f"{args.python} imports torch and mpi4py", file=sys.stderr)
    if args.out is None:
        sys.stdout.write(text)
        return 0
    args.out.write_text(text)
    counts = processes_per_host(parse_hostfile(text))
    print(f"wrote {args.out}: {sum(counts.values())} processes (server + {len(args.clients)} clients) on "
          + ", ".join(f"{host} ({n})" for host, n in counts.items()), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
