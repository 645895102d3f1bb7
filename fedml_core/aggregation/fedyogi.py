"""FedYogi (Reddi et al., 2021, "Adaptive Federated Optimization")."""
from __future__ import annotations

from typing import Optional

from .fedopt import FedOpt, YOGI


class FedYogi(FedOpt):
    """:class:`~fedml_core.aggregation.fedopt.FedOpt` with
    ``v <- v - (1 - beta2) * delta^2 * sign(v - delta^2)``.

    Args: see :class:`~fedml_core.aggregation.fedopt.FedOpt`.
    """

    name = "FedYogi"
    rule = YOGI

    def __init__(self, server_lr: float = 0.01, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3,
                 max_buffered_updates: Optional[int] = None) -> None:
        super().__init__(server_lr, beta1, beta2, tau, max_buffered_updates)
