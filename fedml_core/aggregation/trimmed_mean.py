"""Coordinate-wise trimmed mean (Yin et al., 2018, "Byzantine-Robust Distributed
Learning: Towards Optimal Statistical Rates")."""
from __future__ import annotations

import math

from ..distributed.communication.packed_tensors import PackedTensors
from .held_updates import HeldUpdates


class FedTrimmedAvg(HeldUpdates):
    """Every element of the new model is the mean of the clients' values of it after
    the ``floor(trim_ratio * K)`` largest and as many smallest are dropped (``K``: the
    round's valid updates; unweighted).

    Args:
        trim_ratio: beta, the fraction trimmed at each end, in [0, 0.5).
    """

    name = "FedTrimmedAvg"

    def __init__(self, trim_ratio: float = 0.1) -> None:
        if not 0 <= trim_ratio < 0.5:
            raise ValueError(f"FedTrimmedAvg needs 0 <= trim_ratio < 0.5, got {trim_ratio}")
        super().__init__()
        self.trim_ratio = trim_ratio

    def aggregate(self, global_model: PackedTensors, round_idx: int = 0) -> PackedTensors:
        updates = self.take_updates()
        k = math.floor(self.trim_ratio * len(updates))
        return self.coordinatewise(updates, lambda values: values.sort(dim=0).values[k:len(updates) - k].mean(dim=0))
