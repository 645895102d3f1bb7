"""Krum and Multi-Krum (Blanchard et al., 2017, "Machine Learning with Adversaries:
Byzantine Tolerant Gradient Descent")."""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch

from ..distributed.communication.packed_tensors import PackedTensors
from .fedavg import BLOCK_ELEMENTS, WeightedMeanAccumulator
from .held_updates import HeldUpdates
from .strategy import ClientUpdate


def squared_distances(updates: List[ClientUpdate], global_model: PackedTensors) -> torch.Tensor:
    """``[K, K]`` float64 squared Euclidean distances between the updates' floating-point
    tensors (computed on ``update - global_model``, blockwise, through a Gram matrix)."""
    k = len(updates)
    gram = torch.zeros(k, k, dtype=torch.float64)
    for dtype, x in global_model.groups.items():
        if not dtype.is_floating_point:
            continue
        for start in range(0, x.numel(), BLOCK_ELEMENTS):
            length = min(BLOCK_ELEMENTS, x.numel() - start)
            base = x.narrow(0, start, length).double()
            block = torch.stack([u.params.groups[dtype].narrow(0, start, length).double() - base for u in updates])
            gram += block @ block.T
    norms = gram.diagonal()
    return (norms[:, None] + norms[None, :] - 2 * gram).clamp_(min=0)


class Krum(HeldUpdates):
    """Score each update by the sum of its squared distances to its ``K - f - 2``
    nearest other updates; the ``m`` best-scored are averaged (uniformly) into the new
    model, and the others are named in the round's metrics (``krum_not_chosen``, with
    their scores; they were valid updates, so they do not count against
    ``--min_clients_per_round`` as :meth:`rejected_updates`, the invalid ones, do).
    ``m = 1`` is Krum: the new model is the chosen client's state.

    Args:
        krum_f: f, the number of Byzantine clients to tolerate; a round needs more than
            ``2 f + 2`` valid updates.
        krum_m: m, how many updates to average (None: ``K - f``, Multi-Krum's usual
            choice, for :class:`MultiKrum`; 1 for Krum).
    """

    name = "Krum"

    def __init__(self, krum_f: int = 1, krum_m: Optional[int] = 1) -> None:
        if krum_f < 0 or (krum_m is not None and krum_m < 1):
            raise ValueError(f"{self.name} needs krum_f >= 0 and krum_m >= 1, got {krum_f}, {krum_m}")
        super().__init__()
        self.krum_f, self.krum_m = krum_f, krum_m
        self._mean = WeightedMeanAccumulator()
        self._not_chosen: Dict[int, str] = {}

    def scores(self, updates: List[ClientUpdate], global_model: PackedTensors) -> List[float]:
        """Krum's score of each update (lower is more central)."""
        k, f = len(updates), self.krum_f
        if k <= 2 * f + 2:
            raise ValueError(f"{self.name} with krum_f={f} needs more than {2 * f + 2} valid updates, got {k}")
        distances = squared_distances(updates, global_model)
        return [float(row[torch.arange(k) != i].sort().values[:k - f - 2].sum()) for i, row in enumerate(distances)]

    def aggregate(self, global_model: PackedTensors, round_idx: int = 0) -> PackedTensors:
        self._not_chosen = {}
        updates = self.take_updates()
        scores = self.scores(updates, global_model)
        m = min(self.krum_m if self.krum_m is not None else len(updates) - self.krum_f, len(updates))
        ranked = sorted(range(len(updates)), key=lambda i: (scores[i], updates[i].client_id))
        chosen = set(ranked[:m])
        self._not_chosen = {updates[i].client_id: f"not among the {m} updates {self.name} chose (score {scores[i]:.4g})"
                            for i in ranked[m:]}
        for i in sorted(chosen):
            self._mean.add(updates[i].params, 1.0, order_key=updates[i].client_id)
        return self._mean.result()

    def round_metrics(self) -> Dict[str, Any]:
        return {"krum_not_chosen": {str(client): reason for client, reason in sorted(self._not_chosen.items())}}


class MultiKrum(Krum):
    """:class:`Krum` averaging the ``krum_m`` best-scored updates (default ``K - f``)."""

    name = "MultiKrum"

    def __init__(self, krum_f: int = 1, krum_m: Optional[int] = None) -> None:
        super().__init__(krum_f, krum_m)
