"""FedAvgM: federated averaging with server momentum (Hsu et al., 2019, "Measuring the
Effects of Non-Identical Data Distribution for Federated Visual Classification")."""
from __future__ import annotations

from typing import Optional

import torch

from .server_optimizer import ServerOptimizer, StateSlices


class FedAvgM(ServerOptimizer):
    """Server momentum on the FedAvg pseudo-gradient.

    With ``delta = mean - x`` (``mean``: the clients' sample-weighted mean, ``x``: the
    global model the round started from), per trainable element::

        momentum <- server_momentum * momentum + delta
        x        <- x + server_lr * momentum

    (``server_momentum = 0, server_lr = 1`` is FedAvg; the effective step in steady
    state is ``server_lr / (1 - server_momentum)``.) Buffers take the mean.

    Args:
        server_lr: the server learning rate (dimensionless: a multiple of ``delta``).
        server_momentum: the momentum coefficient, in [0, 1).
        max_buffered_updates: see :class:`~fedml_core.aggregation.fedavg.WeightedMeanAccumulator`.
    """

    name = "FedAvgM"
    accepts_partial_sums = True
    state_names = ("momentum",)

    def __init__(self, server_lr: float = 0.1, server_momentum: float = 0.9, max_buffered_updates: Optional[int] = None) -> None:
        if not server_lr > 0 or not 0 <= server_momentum < 1:
            raise ValueError(f"FedAvgM needs server_lr > 0 and 0 <= server_momentum < 1, got {server_lr}, {server_momentum}")
        super().__init__(max_buffered_updates)
        self.server_lr, self.server_momentum = server_lr, server_momentum

    def step(self, mean: torch.Tensor, x: torch.Tensor, old: StateSlices, new: StateSlices) -> None:
        delta = mean.sub_(x)  # in place: a temporary of its own would take cache
        momentum = torch.add(delta, old["momentum"], alpha=self.server_momentum, out=new["momentum"])
        torch.add(x, momentum, alpha=self.server_lr, out=mean)
