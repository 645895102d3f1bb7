"""Norm clipping (Sun et al., 2019, "Can You Really Backdoor Federated Learning?")."""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence

import torch

from ..distributed.communication.packed_tensors import PackedTensors
from .fedavg import BLOCK_ELEMENTS
from .server_optimizer import ServerOptimizer, StateSlices, global_step
from .strategy import ClientInstructions, ClientUpdate
from .validation import non_finite_tensor


def update_norm(params: PackedTensors, global_model: PackedTensors) -> float:
    """The Euclidean norm of ``params - global_model`` over every floating-point tensor
    (NaN if ``params`` holds NaN or Inf)."""
    total = 0.0
    for dtype, group in params.groups.items():
        if not dtype.is_floating_point:
            continue
        x = global_model.groups[dtype]
        scratch = torch.empty(min(BLOCK_ELEMENTS, group.numel()), dtype=torch.promote_types(dtype, torch.float32))
        for start in range(0, group.numel(), BLOCK_ELEMENTS):
            length = min(BLOCK_ELEMENTS, group.numel() - start)
            delta = torch.sub(group.narrow(0, start, length), x.narrow(0, start, length), out=scratch[:length])
            total += float(torch.dot(delta, delta))
    return math.sqrt(total) if math.isfinite(total) else math.nan


class NormClipping(ServerOptimizer):
    """Each update ``delta_i = y_i - x`` is scaled to norm at most ``clip_norm`` (over all
    floating-point tensors), then the clipped updates are averaged with FedAvg's weights::

        x <- x + sum_i p_i * min(1, clip_norm / ||delta_i||) * delta_i,     p_i = n_i / sum n

    computed as ``x + (sum_i p_i s_i) * (mean_ps - x)``, ``mean_ps`` the mean of the
    ``y_i`` weighted by ``p_i s_i``. Clipped clients are named in the round's
    ``clipped_updates``; updates holding NaN or Inf are rejected.

    Args:
        clip_norm: M, the largest update norm let through (in the model's units).
        max_buffered_updates: see :class:`~fedml_core.aggregation.fedavg.WeightedMeanAccumulator`.
    """

    name = "NormClipping"

    def __init__(self, clip_norm: float = 1.0, max_buffered_updates: Optional[int] = None) -> None:
        if not clip_norm > 0:
            raise ValueError(f"{self.name} needs clip_norm > 0, got {clip_norm}")
        super().__init__(max_buffered_updates)
        self.clip_norm = clip_norm
        self._round_model: Optional[PackedTensors] = None
        self._scales: Dict[int, tuple] = {}  # client: (base weight, clip scale)
        self._invalid: Dict[int, str] = {}
        self._clipped: Dict[int, str] = {}
        self._last: Dict[str, Any] = {}

    def updated_names(self, global_model: PackedTensors, trainable: Sequence[str]) -> List[str]:
        return [s.name for s in global_model.specs if s.dtype.is_floating_point]

    def configure_round(self, round_idx: int, clients: Sequence[int], global_model: PackedTensors) -> Dict[int, ClientInstructions]:
        self._round_model = global_model
        return {}

    def base_weight(self, update: ClientUpdate) -> float:
        """The update's weight before clipping (here its sample number)."""
        return super().weight(update)

    def add(self, update: ClientUpdate) -> None:
        norm = update_norm(update.params, self._round_model)
        if math.isnan(norm):
            self._invalid[update.client_id] = non_finite_tensor(update.params) or "its update's norm overflows"
            return
        scale = min(1.0, self.clip_norm / norm) if norm > 0 else 1.0
        if scale < 1:
            self._clipped[update.client_id] = f"update norm {norm:.4g} clipped to {self.clip_norm:g}"
        self._scales[update.client_id] = (self.base_weight(update), scale)
        self._accumulator.add(update.params, self._scales[update.client_id][0] * scale, order_key=update.client_id)

    def rate(self, used: List[tuple]) -> float:
        """The step from ``x`` towards the weighted mean: ``sum p_i s_i``."""
        return sum(w * s for w, s in used) / sum(w for w, _ in used)

    def step(self, mean: torch.Tensor, x: torch.Tensor, old: StateSlices, new: StateSlices) -> None:
        used = [ws for client, ws in sorted(self._scales.items()) if client not in self._accumulator.rejected]  # client order
        global_step(mean, x, self.rate(used))

    def aggregate(self, global_model: PackedTensors, round_idx: int = 0) -> PackedTensors:
        invalid, self._invalid = self._invalid, {}
        clipped, self._clipped = self._clipped, {}
        try:
            if not self._scales:
                raise ValueError(f"no valid update to aggregate; rejected: {invalid}")
            result = super().aggregate(global_model, round_idx)
        finally:
            self._scales = {}
            self._accumulator.rejected.update(invalid)
        self._last = {"clipped_updates": {str(c): reason for c, reason in sorted(clipped.items())}} if clipped else {}
        return result

    def round_metrics(self) -> Dict[str, Any]:
        return dict(self._last)
