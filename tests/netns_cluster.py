"""A cluster of fake hosts on this machine, for testing multi-host launches for real.

Each host is a Linux network namespace with its own IP address, joined to a bridge
in the root namespace (which has an address on the bridge too and acts as the
launching head node), and runs its own sshd under its own hostname (a UTS namespace
of its own, so Open MPI, which tells nodes apart by the hostname each daemon
reports, sees distinct nodes) and on one CPU of this machine (round-robin), like a
small real host. The sshds accept one key generated for the session, and no password,
and an ssh client config in the session's directory makes ``ssh -F <config> <address>``
work without prompts.

    with NetnsCluster(workdir, hosts=3) as cluster:
        subprocess.run([*cluster.ssh_command, cluster.hosts[0].address, "hostname"])

Everything is torn down on exit, on failure too: every process in the namespaces
is killed, then the namespaces, veths and bridge are deleted. The names and the
subnet are fixed, so instances are serialised by a lock file, and objects left by
an instance that was killed before its teardown are removed on the next start.
Needs root, ``ip`` (iproute2), ``unshare`` and OpenSSH's ``sshd``/``ssh``/``ssh-keygen``.
"""
from __future__ import annotations

import fcntl
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Dict, List, Optional

SUBNET = "10.231.77"  # a /24 used only by this harness; nothing else may live there
HEAD_ADDRESS = f"{SUBNET}.1"
BRIDGE = "fedmlbr0"
NAME_PREFIX = "fedml-host"  # namespace names and hostnames: fedml-host1, fedml-host2, ...
VETH_PREFIX = "fedml-veth"  # root-namespace end of each host's veth pair
LOCK_FILE = Path("/run/lock/fedml-netns-cluster.lock")
SSHD_START_TIMEOUT = 10.0
SBIN_DIRS = ("/usr/sbin", "/sbin", "/usr/local/sbin")


class ClusterUnavailable(RuntimeError):
    """This machine cannot host the namespaces (e.g. no CAP_NET_ADMIN in a container)."""


@dataclass(frozen=True)
class NetnsHost:
    """One fake host: its network namespace, hostname and address on the bridge."""

    index: int
    name: str
    address: str


def _find_tool(name: str) -> Optional[str]:
    """``name`` on PATH or in the sbin directories (root's PATH may lack them)."""
    search = os.pathsep.join([os.environ.get("PATH", ""), *SBIN_DIRS])
    return shutil.which(name, path=search)


def missing_requirements() -> Optional[str]:
    """Why a cluster cannot be built here (a reason to skip), or None when it can."""
    if os.geteuid() != 0:
        return "network namespaces and sshd need root"
    for tool, package in (("ip", "iproute2"), ("unshare", "util-linux"), ("sshd", "openssh-server"),
                          ("ssh", "openssh-client"), ("ssh-keygen", "openssh-client")):
        if _find_tool(tool) is None:
            return f"'{tool}' not found (apt-get install {package})"
    return None


def _run(*cmd: str) -> str:
    """Run a command, returning its stdout; raise with its stderr when it fails."""
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({result.returncode}): {result.stderr.strip()}")
    return result.stdout


def _namespace_pids(namespace: str) -> List[int]:
    """Pids of every process whose network namespace is ``namespace``."""
    result = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True)
    return [int(pid) for pid in result.stdout.split()] if result.returncode == 0 else []


def _kill_namespace_processes(namespace: str, grace: float = 3.0) -> None:
    """SIGTERM every process in ``namespace``, then SIGKILL what is left after ``grace`` s."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in _namespace_pids(namespace):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while _namespace_pids(namespace) and time.monotonic() < deadline:
            time.sleep(0.05)
        if not _namespace_pids(namespace):
            return
    raise RuntimeError(f"processes {_namespace_pids(namespace)} in namespace {namespace} survived SIGKILL")


def _link_exists(name: str) -> bool:
    return subprocess.run(["ip", "link", "show", name], capture_output=True).returncode == 0


def _our_namespaces() -> List[str]:
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in listing.splitlines() if line.startswith(NAME_PREFIX)]


def _remove_everything() -> None:
    """Delete every object this harness creates: processes, namespaces, veths, bridge."""
    namespaces = _our_namespaces()
    for namespace in namespaces:
        _kill_namespace_processes(namespace)
    # Veths first: deleting one end deletes the pair at once, whereas a deleted
    # namespace releases its end asynchronously.
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    for line in links.splitlines():
        name = line.split(":")[1].strip().split("@")[0]
        if name.startswith(VETH_PREFIX):
            _run("ip", "link", "delete", name)
    for namespace in namespaces:
        _run("ip", "netns", "delete", namespace)
    if _link_exists(BRIDGE):
        _run("ip", "link", "delete", BRIDGE)


class NetnsCluster:
    """``hosts`` fake hosts reachable by ssh from this (root) namespace; a context manager.

    Attributes once entered: ``hosts`` (NetnsHost, addresses ``10.231.77.11`` up),
    ``head_address`` (this namespace's address on the bridge), ``ssh_config`` (the
    client config), ``ssh_command`` (``["ssh", "-F", <config>]``).
    """

    def __init__(self, workdir: Path, hosts: int = 3) -> None:
        # Addresses .11 to .60 at most: the rest of the subnet stays free, for tests that
        # need an address with no host behind it.
        if not 1 <= hosts <= 50:
            raise ValueError(f"hosts must be between 1 and 50, got {hosts}")
        self.workdir = Path(workdir)
        self.head_address = HEAD_ADDRESS
        self.hosts = [NetnsHost(i, f"{NAME_PREFIX}{i}", f"{SUBNET}.{10 + i}") for i in range(1, hosts + 1)]
        self.ssh_config = self.workdir / "ssh_config"
        self.ssh_command = ["ssh", "-F", str(self.ssh_config)]
        self._sshds: Dict[str, subprocess.Popen] = {}
        self._lock: Optional[IO[str]] = None

    @property
    def ssh_agent(self) -> str:
        """The ssh command line as one string, for Open MPI's ``plm_ssh_agent``."""
        return " ".join(self.ssh_command)

    def __enter__(self) -> "NetnsCluster":
        reason = missing_requirements()
        if reason:
            raise ClusterUnavailable(reason)
        LOCK_FILE.parent.mkdir(parents=True, exist_ok=True)
        self._lock = open(LOCK_FILE, "w")
        fcntl.flock(self._lock, fcntl.LOCK_EX)
        try:
            _remove_everything()  # leftovers of an instance killed before its teardown
            self._check_subnet_is_free()
            self._make_network()
            self._make_keys_and_ssh_config()
            for host in self.hosts:
                self._start_sshd(host)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        try:
            _remove_everything()
            for sshd in self._sshds.values():
                sshd.wait(timeout=5)  # reap: it was killed with its namespace
            self._sshds.clear()
        finally:
            if self._lock is not None:
                self._lock.close()  # releases the flock
                self._lock = None

    def processes_on(self, host: NetnsHost) -> List[int]:
        """Pids of the processes running on ``host`` (in its network namespace)."""
        return _namespace_pids(host.name)

    def sshd_pid(self, host: NetnsHost) -> int:
        """Pid of ``host``'s sshd, the one process that runs there between jobs."""
        return self._sshds[host.name].pid

    def stop_strays(self, host: NetnsHost) -> None:
        """Kill every process on ``host`` but its sshd (what a cut-off job leaves there)."""
        for pid in self.processes_on(host):
            if pid != self.sshd_pid(host):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    # -- setup steps -----------------------------------------------------------------

    def _check_subnet_is_free(self) -> None:
        addresses = _run("ip", "-o", "-4", "addr", "show")
        if f" {SUBNET}." in addresses:
            raise RuntimeError(f"subnet {SUBNET}.0/24 is already in use on this machine:\n{addresses}")

    def _make_network(self) -> None:
        for host in self.hosts:
            try:
                _run("ip", "netns", "add", host.name)
            except RuntimeError as error:
                if "Operation not permitted" in str(error) or "Permission denied" in str(error):
                    raise ClusterUnavailable(f"cannot create network namespaces here: {error}") from error
                raise
        _run("ip", "link", "add", BRIDGE, "type", "bridge")
        _run("ip", "addr", "add", f"{HEAD_ADDRESS}/24", "dev", BRIDGE)
        _run("ip", "link", "set", BRIDGE, "up")
        for host in self.hosts:
            veth = f"{VETH_PREFIX}{host.index}"
            _run("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", host.name)
            _run("ip", "link", "set", veth, "master", BRIDGE, "up")
            _run("ip", "-n", host.name, "addr", "add", f"{host.address}/24", "dev", "eth0")
            _run("ip", "-n", host.name, "link", "set", "eth0", "up")
            # MPI and PMIx inside a host talk over its loopback. No default route on
            # purpose: a host can reach the bridge's subnet and nothing else.
            _run("ip", "-n", host.name, "link", "set", "lo", "up")

    def _make_keys_and_ssh_config(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        client_key = self.workdir / "id_ed25519"
        _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "fedml-netns-cluster", "-f", str(client_key))
        (self.workdir / "authorized_keys").write_text(Path(f"{client_key}.pub").read_text())
        known_hosts = []
        for host in self.hosts:
            host_dir = self.workdir / host.name
            host_dir.mkdir()
            host_key = host_dir / "ssh_host_ed25519_key"
            _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", host.name, "-f", str(host_key))
            known_hosts.append(f"{host.address} {Path(f'{host_key}.pub').read_text().strip()}")
            (host_dir / "sshd_config").write_text(self._sshd_config(host, host_key))
        (self.workdir / "known_hosts").write_text("\n".join(known_hosts) + "\n")
        self.ssh_config.write_text(
            f"Host {SUBNET}.*\n"
            "    User root\n"
            f"    IdentityFile {client_key}\n"
            "    IdentitiesOnly yes\n"
            f"    UserKnownHostsFile {self.workdir / 'known_hosts'}\n"
            "    GlobalKnownHostsFile /dev/null\n"
            "    StrictHostKeyChecking yes\n"
            "    BatchMode yes\n"
            "    ConnectTimeout 5\n"
            "    LogLevel ERROR\n"
        )

    def _sshd_config(self, host: NetnsHost, host_key: Path) -> str:
        return (
            f"ListenAddress {host.address}:22\n"
            f"HostKey {host_key}\n"
            f"PidFile {self.workdir / host.name / 'sshd.pid'}\n"
            f"AuthorizedKeysFile {self.workdir / 'authorized_keys'}\n"
            "PubkeyAuthentication yes\n"
            "PasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\n"
            "PermitRootLogin prohibit-password\n"
            "UsePAM no\n"
            # The keys live under /tmp (world-writable), which StrictModes rejects.
            "StrictModes no\n"
            "PrintMotd no\n"
            "LogLevel ERROR\n"
        )

    def _start_sshd(self, host: NetnsHost) -> None:
        # sshd refuses to start without its privilege-separation directory, which the
        # Debian package only creates when its service starts.
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        # ip netns exec, unshare and sh all exec, so the Popen pid is sshd itself; its
        # sessions (and the MPI daemons they start) inherit its namespaces, hostname and
        # CPU: like a real host each has a core of its own (round-robin over this
        # machine's), and ranks size their torch threads by it rather than thrash.
        cpus = sorted(os.sched_getaffinity(0))
        with open(self.workdir / host.name / "sshd.log", "w") as log:
            sshd = subprocess.Popen(
                ["ip", "netns", "exec", host.name, "unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"',
                 host.name, _find_tool("sshd") or "sshd", "-D", "-e", "-f",
                 str(self.workdir / host.name / "sshd_config")],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        self._sshds[host.name] = sshd
        os.sched_setaffinity(sshd.pid, {cpus[(host.index - 1) % len(cpus)]})  # before any connection
        deadline = time.monotonic() + SSHD_START_TIMEOUT
        while True:
            if sshd.poll() is not None:
                raise RuntimeError(f"sshd of {host.name} exited: {(self.workdir / host.name / 'sshd.log').read_text()}")
            try:
                socket.create_connection((host.address, 22), timeout=0.5).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"sshd of {host.name} not listening on {host.address}:22 "
                                       f"after {SSHD_START_TIMEOUT:.0f} s") from None
                time.sleep(0.05)
