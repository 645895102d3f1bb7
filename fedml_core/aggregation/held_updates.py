"""Base of the robust aggregators, which need every update of a round at once."""
from __future__ import annotations

from typing import Callable, Dict, List

import torch

from ..distributed.communication.packed_tensors import BufferPool, PackedTensors
from .fedavg import BLOCK_ELEMENTS
from .strategy import AggregationStrategy, ClientUpdate
from .validation import non_finite_tensor

#: ``statistic(values)``: one value per column of a ``[clients, elements]`` tensor.
Statistic = Callable[[torch.Tensor], torch.Tensor]


class HeldUpdates(AggregationStrategy):
    """Holds the round's finite updates (in client-id order) until :meth:`aggregate`;
    an update holding NaN or Inf is left out and named in :meth:`rejected_updates`."""

    def __init__(self) -> None:
        self._updates: Dict[int, ClientUpdate] = {}
        self._rejected: Dict[int, str] = {}
        self._last_rejected: Dict[int, str] = {}
        self._pool = BufferPool(max_buffers=4)

    def add(self, update: ClientUpdate) -> None:
        reason = non_finite_tensor(update.params)
        if reason is not None:
            self._rejected[update.client_id] = reason
        else:
            self._updates[update.client_id] = update

    def take_updates(self) -> List[ClientUpdate]:
        """The round's finite updates, by client id; resets for the next round.
        Raises ValueError if there are none."""
        updates = [self._updates[c] for c in sorted(self._updates)]
        self._last_rejected, self._rejected, self._updates = self._rejected, {}, {}
        if not updates:
            raise ValueError(f"no valid update to aggregate; rejected: {self._last_rejected}")
        return updates

    def rejected_updates(self) -> Dict[int, str]:
        return dict(self._last_rejected)

    def coordinatewise(self, updates: List[ClientUpdate], statistic: Statistic) -> PackedTensors:
        """``statistic`` of the updates, element by element, over every tensor (integers
        rounded, booleans by majority), one cache-sized block at a time."""
        template = updates[0].params
        result = PackedTensors.empty(template.specs, {d: g.numel() for d, g in template.groups.items()}, allocate=self._pool.take)
        for dtype, out in result.groups.items():
            work = dtype if dtype in (torch.float32, torch.float64) else torch.float64
            for start in range(0, out.numel(), BLOCK_ELEMENTS):
                length = min(BLOCK_ELEMENTS, out.numel() - start)
                values = torch.stack([u.params.groups[dtype].narrow(0, start, length).to(work) for u in updates])
                column = statistic(values)
                if dtype == torch.bool:
                    column = column >= 0.5
                elif not dtype.is_floating_point:
                    column = column.round()
                out.narrow(0, start, length).copy_(column)
        return result
