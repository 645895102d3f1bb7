"""FedAdagrad (Reddi et al., 2021, "Adaptive Federated Optimization")."""
from __future__ import annotations

from typing import Optional

from .fedopt import FedOpt, ADAGRAD


class FedAdagrad(FedOpt):
    """:class:`~fedml_core.aggregation.fedopt.FedOpt` with ``v <- v + delta^2``.

    Args: see :class:`~fedml_core.aggregation.fedopt.FedOpt` (``beta2`` is not used).
    """

    name = "FedAdagrad"
    rule = ADAGRAD

    def __init__(self, server_lr: float = 0.1, beta1: float = 0.9, tau: float = 1e-9, max_buffered_updates: Optional[int] = None) -> None:
        super().__init__(server_lr, beta1, 0.0, tau, max_buffered_updates)
