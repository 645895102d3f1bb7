"""Which worker process serves which client (``--worker_processes``)."""
from __future__ import annotations

import heapq
from typing import Dict, List, Mapping, Sequence


def client_share(worker_rank: int, num_workers: int, num_clients: int) -> List[int]:
    """The clients whose sample numbers worker ``worker_rank`` (1..num_workers) counts at
    start-up: ``c`` with ``(c - 1) % num_workers == worker_rank - 1``."""
    return list(range(worker_rank, num_clients + 1, num_workers))


def assign_clients(clients: Sequence[int], workers: Sequence[int], load: Mapping[int, int]) -> Dict[int, List[int]]:
    """Spread ``clients`` over ``workers`` so that the largest total ``load`` (e.g.
    sample numbers) of any worker is small: longest first, each to the worker with the
    least load so far (ties: the fewest clients, then the lowest rank). Returns ``{worker: sorted clients}`` for
    the workers that got any, deterministic for the same inputs."""
    if not workers:
        raise ValueError("no worker process to assign clients to")
    heap = [(0, 0, rank) for rank in sorted(workers)]  # (load, clients, rank)
    assigned: Dict[int, List[int]] = {}
    for client in sorted(clients, key=lambda c: (-load[c], c)):
        total, count, rank = heapq.heappop(heap)
        assigned.setdefault(rank, []).append(client)
        heapq.heappush(heap, (total + load[client], count + 1, rank))
    return {rank: sorted(chosen) for rank, chosen in sorted(assigned.items())}
