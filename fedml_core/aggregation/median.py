"""Coordinate-wise median (Yin et al., 2018, "Byzantine-Robust Distributed Learning:
Towards Optimal Statistical Rates")."""
from __future__ import annotations

import torch

from ..distributed.communication.packed_tensors import PackedTensors
from .held_updates import HeldUpdates


def coordinate_median(values: torch.Tensor) -> torch.Tensor:
    """The median of each column of ``[clients, elements]``: the middle value, or the
    mean of the two middle ones for an even number of clients."""
    ordered = values.sort(dim=0).values
    k = values.shape[0]
    return ordered[k // 2] if k % 2 else (ordered[k // 2 - 1] + ordered[k // 2]) / 2


class FedMedian(HeldUpdates):
    """Every element of the new model is the median of the clients' values of it
    (unweighted: a client's sample number cannot buy it influence). Robust to fewer
    than half of the clients sending anything they like."""

    name = "FedMedian"

    def aggregate(self, global_model: PackedTensors, round_idx: int = 0) -> PackedTensors:
        return self.coordinatewise(self.take_updates(), coordinate_median)
