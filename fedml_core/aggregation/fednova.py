"""FedNova (Wang et al., 2020, "Tackling the Objective Inconsistency Problem in
Heterogeneous Federated Optimization")."""
from __future__ import annotations

import math
from argparse import Namespace
from typing import Dict, Optional

import torch

from ..distributed.communication.packed_tensors import PackedTensors
from .local_training import GradientHooks, momentum_a_norm, replace_hooks
from .server_optimizer import ServerOptimizer, StateSlices, global_step
from .strategy import ClientAlgorithm, ClientReport, ClientRound, ClientUpdate
from .validation import InvalidUpdate


class FedNova(ServerOptimizer):
    """Normalized averaging: each client's update is divided by its amount of local
    work, so clients that took more steps do not pull the model to their own optimum.

    With ``p_i = n_i / sum n`` (sample numbers) and ``a_i`` the client's ``||a_i||_1``
    (its local step count for plain SGD), per trainable element::

        d_i   = (x - y_i) / a_i
        x    <- x - tau_eff * sum_i p_i d_i,      tau_eff = sum_i p_i a_i

    computed as ``x + tau_eff * S * (mean_w - x)``, where ``mean_w`` is the mean of the
    ``y_i`` weighted by ``p_i / a_i`` and ``S = sum_i p_i / a_i``. Buffers take
    ``mean_w``.

    Args:
        max_buffered_updates: see :class:`~fedml_core.aggregation.fedavg.WeightedMeanAccumulator`.
    """

    name = "FedNova"

    def __init__(self, max_buffered_updates: Optional[int] = None) -> None:
        super().__init__(max_buffered_updates)
        self._work: Dict[int, tuple] = {}  # client: (sample number, a_i)

    def check_update(self, update: ClientUpdate) -> None:
        a = update.metadata.get("a_norm")
        if not isinstance(a, (int, float)) or isinstance(a, bool) or not math.isfinite(a) or not a > 0:
            raise InvalidUpdate(f"FedNova update without a positive finite 'a_norm' (got {a!r})")

    def weight(self, update: ClientUpdate) -> float:
        samples = super().weight(update)
        self._work[update.client_id] = (samples, float(update.metadata["a_norm"]))
        return samples / self._work[update.client_id][1]

    def aggregate(self, global_model: PackedTensors, round_idx: int = 0) -> PackedTensors:
        try:
            return super().aggregate(global_model, round_idx)
        finally:
            self._work = {}

    def step(self, mean: torch.Tensor, x: torch.Tensor, old: StateSlices, new: StateSlices) -> None:
        # Over the updates not rejected (the pass runs again without any that held NaN), in
        # client order (float sums in arrival order would differ from run to run).
        used = [work for client, work in sorted(self._work.items()) if client not in self._accumulator.rejected]
        total = sum(n for n, _ in used)
        tau_eff = sum(n / total * a for n, a in used)
        s = sum(n / total / a for n, a in used)
        global_step(mean, x, tau_eff * s)

    def client_algorithm(self, args: Namespace) -> ClientAlgorithm:
        return FedNovaClient()


class FedNovaClient(ClientAlgorithm):
    """Counts the local SGD steps and reports ``a_norm`` (``||a_i||_1`` for heavy-ball
    momentum ``args.momentum``, 0 when the experiment has none) and ``local_steps``."""

    def __init__(self) -> None:
        self._hooks: Optional[GradientHooks] = None
        self._momentum = 0.0

    def before_train(self, model: torch.nn.Module, round_info: ClientRound) -> None:
        self._momentum = float(getattr(round_info.args, "momentum", 0.0) or 0.0)
        self._hooks = replace_hooks(self._hooks, model, lambda name, p, grad: None)

    def after_train(self, model: torch.nn.Module, state: Dict[str, torch.Tensor]) -> ClientReport:
        self._hooks.remove()
        steps = self._hooks.steps
        if steps == 0:
            raise ValueError("FedNova: local training took no step (no backward pass)")
        return ClientReport(metadata={"local_steps": steps, "a_norm": momentum_a_norm(steps, self._momentum)})
