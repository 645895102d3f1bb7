"""FedOpt: adaptive server optimizers on the FedAvg pseudo-gradient (Reddi et al., 2021,
"Adaptive Federated Optimization", Algorithm 2). FedAdagrad, FedAdam and FedYogi differ
only in how they update the second moment ``v``: their :attr:`FedOpt.rule`."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..distributed.communication.packed_tensors import PackedTensors
from .server_optimizer import ServerOptimizer, StateSlices
from .strategy import FederationInfo


#: :attr:`FedOpt.rule`: how the second moment ``v`` takes ``delta^2``.
ADAGRAD, ADAM, YOGI = 0, 1, 2


class FedOpt(ServerOptimizer):
    """Reddi et al.'s Algorithm 2, per trainable element, with ``delta = mean - x``
    (``mean``: the clients' sample-weighted mean, ``x``: the round's global model)::

        m <- beta1 * m + (1 - beta1) * delta
        v <- the subclass's rule (v, delta^2)
        x <- x + server_lr * m / (sqrt(v) + tau)

    starting from ``m = 0`` and ``v = tau^2`` (the paper's ``v_{-1} >= tau^2``), with
    no bias correction, as in the paper. Buffers take the mean.

    Args:
        server_lr: eta, the server learning rate (in units of the model's values).
        beta1: the first-moment decay, in [0, 1).
        beta2: the second-moment decay, in [0, 1) (unused by FedAdagrad).
        tau: the adaptivity (added to sqrt(v)), > 0.
        max_buffered_updates: see :class:`~fedml_core.aggregation.fedavg.WeightedMeanAccumulator`.
    """

    state_names = ("m", "v")
    accepts_partial_sums = True
    #: the second moment's rule: :data:`ADAGRAD`, :data:`ADAM` or :data:`YOGI`.
    rule: int

    def __init__(self, server_lr: float, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-9,
                 max_buffered_updates: Optional[int] = None) -> None:
        if not server_lr > 0 or not 0 <= beta1 < 1 or not 0 <= beta2 < 1 or not tau > 0:
            raise ValueError(f"{self.name} needs server_lr > 0, beta1 and beta2 in [0, 1) and tau > 0; "
                             f"got server_lr={server_lr}, beta1={beta1}, beta2={beta2}, tau={tau}")
        super().__init__(max_buffered_updates)
        self.server_lr, self.beta1, self.beta2, self.tau = server_lr, beta1, beta2, tau

    def initial_state(self, name: str) -> float:
        return self.tau ** 2 if name == "v" else 0.0

    def setup(self, global_model: PackedTensors, trainable: Sequence[str], federation: FederationInfo) -> None:
        if self.rule not in (ADAGRAD, ADAM, YOGI):  # the compiled loop would take any other value for YOGI
            raise ValueError(f"{type(self).__name__}.rule must be ADAGRAD, ADAM or YOGI ({ADAGRAD}, {ADAM}, {YOGI}), got {self.rule!r}")
        super().setup(global_model, trainable, federation)
        from .fedopt_kernel import fedopt_step  # imports numba: only in the runs that use it
        self._step = fedopt_step
        for dtype in {v.dtype for vectors in self._state.values() for v in vectors.values()}:
            one = [torch.ones(1, dtype=dtype) for _ in range(6)]
            self._step(self.rule, *one, self.beta1, self.beta2, self.server_lr, self.tau)  # compiled (or loaded) now, not in round 0

    def step(self, mean: torch.Tensor, x: torch.Tensor, old: StateSlices, new: StateSlices) -> None:
        self._step(self.rule, mean, x, old["m"], old["v"], new["m"], new["v"],
                   self.beta1, self.beta2, self.server_lr, self.tau)
