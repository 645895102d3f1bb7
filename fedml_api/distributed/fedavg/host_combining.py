"""Per-host combining of partial sums (``--worker_processes``, ``--combine_per_host on``).

With partial sums, each worker sends the server one partial sum a round. On a cluster of
several hosts, the workers of a host other than the server's add their sums together
first: the host's *combiner* (its lowest live rank with clients in the phase) receives
the sums of the others there (its *peers*), adds them to its own and sends the server
one sum for the host. One partial sum per remote host then crosses the network instead
of one per worker. Workers on the server's own host send theirs directly: combining
there would move the same bytes over the same memory.

Numbers: float64 sums of exact products are exact (see
:mod:`fedml_core.aggregation.partial_sums`), so the mean does not depend on the
grouping. The combiner still adds its peers' sums in rank order, so a run is
reproducible bit for bit even where a sum is not exact.

Failures (the server's side is in :class:`~.FedAvgPoolServerManager.FedAvgPoolServerManager`):
a combiner waits for each peer's sum until it arrives, the peer is known dead (from the
transport or from the server's ``S2C_PEER_LOST``), or the combine deadline passes
(:data:`COMBINE_SHARE` of the phase's timeout, which leaves the rest for the one send to
the server); it then sends what it has and names the peers whose sums are missing. A sum
that arrives after that, twice, or from a rank that is not an awaited peer is ignored.
A peer sends its sum to the server itself when its combiner cannot take it: ready late in
the combine window (:func:`too_late_to_combine`), or the combiner dead or not reachable
within the window; so being combined costs no client that would have made the server's
deadline sending directly (unless the peer's train message came over :data:`DIRECT_SHARE`
of the window after its combiner's). The clients of a missing peer fail for the round
only when its sum reached the server by neither way.
"""
from __future__ import annotations

import os
import socket
from typing import Dict, Iterable, List, Mapping, Optional

from fedml_core.aggregation.partial_sums import PartialSum

#: For tests: comma-separated host names by rank ("s,a,a,b,b": rank 0 on s, 1-2 on a,
#: 3-4 on b), read by every process at start-up, to fake distinct hosts on one machine.
FAKE_HOSTS_ENV = "FEDML_FAKE_HOSTS"

#: The share of a train phase's timeout (``--round_timeout``, plus the start-up allowance
#: of a first phase) a combiner waits for its peers' sums; the rest is left for its one
#: send to the server, which must arrive before the server's own deadline.
COMBINE_SHARE = 0.8

#: The last share of the combine window in which a peer sends its sum to the server
#: instead of its combiner: each counts the window from when its own train message
#: arrived, so the combiner may stop waiting a little before the peer's window ends.
DIRECT_SHARE = 0.1


def host_name(rank: int) -> str:
    """The host process ``rank`` runs on: ``socket.gethostname()`` (what Open MPI's
    processor name is), or its entry in $FEDML_FAKE_HOSTS when that is set (for tests).
    Raises ValueError when $FEDML_FAKE_HOSTS has no entry for ``rank``."""
    fake = os.environ.get(FAKE_HOSTS_ENV)
    if not fake:
        return socket.gethostname()
    names = fake.split(",")
    if rank >= len(names) or not names[rank].strip():
        raise ValueError(f"${FAKE_HOSTS_ENV}={fake!r} names no host for rank {rank} (one name per rank, from 0)")
    return names[rank].strip()


def too_late_to_combine(received: float, combine_seconds: Optional[float], now: float) -> bool:
    """Whether a peer whose sum is ready at ``now`` sends it to the server itself: its
    combine window (``combine_seconds`` from ``received``, its train message's arrival,
    all ``time.monotonic()``) is in its last :data:`DIRECT_SHARE`. Never without a window."""
    return combine_seconds is not None and now >= received + (1.0 - DIRECT_SHARE) * combine_seconds


def combining_plan(workers: Iterable[int], hosts: Mapping[int, str], server_host: str) -> Dict[int, List[int]]:
    """``{combiner: [its peers]}`` for the hosts other than ``server_host`` that run two
    or more of ``workers`` (the ranks with clients in the phase); the combiner is the
    host's lowest rank. A worker whose host is unknown sends directly."""
    by_host: Dict[str, List[int]] = {}
    for rank in sorted(workers):
        host = hosts.get(rank)
        if host is not None and host != server_host:
            by_host.setdefault(host, []).append(rank)
    return {ranks[0]: ranks[1:] for ranks in by_host.values() if len(ranks) > 1}


class HostCombination:
    """A combiner's round: its own partial sum, to which its peers' are added in rank order.

    Args:
        round_idx: the round.
        total: the combiner's own partial sum (its clients folded); the peers' are added to it.
        peers: each peer's clients in the phase, as the server assigned them: a peer's
            sum may name no other client.
        deadline: ``time.monotonic()`` after which the combiner stops waiting; None: no deadline.

    Attributes:
        missing: peer -> why its sum is not in the total.
    """

    def __init__(self, round_idx: int, total: PartialSum, peers: Mapping[int, List[int]], deadline: Optional[float]) -> None:
        self.round_idx = round_idx
        self.total = total
        self.peers = {rank: set(clients) for rank, clients in peers.items()}
        self.deadline = deadline
        self.missing: Dict[int, str] = {}
        self._held: Dict[int, tuple] = {}  # peer -> (clients, tensors), arrived before its turn
        self._next = sorted(peers)  # peers not yet added or given up on, in rank order

    def awaited(self) -> List[int]:
        """The peers whose sums are still to come."""
        return [rank for rank in self._next if rank not in self._held and rank not in self.missing]

    @property
    def complete(self) -> bool:
        return not self._next

    def add(self, peer: int, clients: List[int], tensors: Mapping) -> Optional[str]:
        """Take ``peer``'s partial sum of ``clients`` (message tensors). Returns None, or
        why it is ignored: the sender is no awaited peer (a late or duplicate sum). A sum
        that names clients the server did not assign ``peer`` is not added: the peer
        counts as missing."""
        if peer not in self.awaited():
            return f"worker {peer}'s sum for round {self.round_idx} is not awaited (late, duplicate, or not a peer)"
        if not set(clients) <= self.peers[peer]:
            self.missing[peer] = f"its sum names clients {sorted(clients)}, not all of its {sorted(self.peers[peer])}"
        else:
            self._held[peer] = (list(clients), dict(tensors))
        self._add_in_order()
        return None

    def lose(self, peer: int, reason: str) -> None:
        """Stop waiting for ``peer``'s sum (it died, or the server gave up on it);
        nothing happens if it arrived already."""
        if peer in self.awaited():
            self.missing[peer] = reason
            self._add_in_order()

    def give_up(self, reason: str) -> None:
        """Stop waiting for every peer whose sum has not arrived (the deadline passed)."""
        for peer in self.awaited():
            self.missing[peer] = reason
        self._add_in_order()

    def _add_in_order(self) -> None:
        # Rank order whatever the arrival order; a sum waits only for the lower-ranked ones still to come.
        while self._next and (self._next[0] in self._held or self._next[0] in self.missing):
            peer = self._next.pop(0)
            if peer in self._held:
                clients, tensors = self._held.pop(peer)
                try:
                    self.total.add_sum(clients, tensors)
                except ValueError as error:
                    self.missing[peer] = str(error)
