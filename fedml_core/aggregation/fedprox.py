"""FedProx (Li et al., 2020, "Federated Optimization in Heterogeneous Networks")."""
from __future__ import annotations

from argparse import Namespace
from typing import Dict, Optional, Sequence

import torch

from ..distributed.communication.packed_tensors import PackedTensors
from .fedavg import FedAvg
from .local_training import DeviceCache, GradientHooks, cpu_copy, replace_hooks, trainable_parameters
from .strategy import ClientAlgorithm, ClientInstructions, ClientReport, ClientRound


class FedProx(FedAvg):
    """FedAvg whose clients minimise their loss plus the proximal term
    ``mu / 2 * ||w - w_global||^2`` (``w``: the trainable parameters; ``w_global``: their
    values in the round's global model). The server aggregates as FedAvg and sends
    ``mu`` to the clients in every round's config.

    Args:
        mu: the proximal coefficient (>= 0; 0 is FedAvg), in the loss's units per squared
            parameter unit.
        max_buffered_updates: see :class:`~fedml_core.aggregation.fedavg.WeightedMeanAccumulator`.
    """

    name = "FedProx"

    def __init__(self, mu: float = 0.01, max_buffered_updates: Optional[int] = None) -> None:
        if not mu >= 0:
            raise ValueError(f"FedProx needs mu >= 0, got {mu}")
        super().__init__(max_buffered_updates)
        self.mu = mu

    def configure_round(self, round_idx: int, clients: Sequence[int], global_model: PackedTensors) -> Dict[int, ClientInstructions]:
        return {client: ClientInstructions(config={"mu": self.mu}) for client in clients}

    def client_algorithm(self, args: Namespace) -> ClientAlgorithm:
        return FedProxClient()


class FedProxClient(ClientAlgorithm):
    """Adds the proximal term's gradient, ``mu * (w - w_global)``, to every trainable
    parameter's gradient in the user's training. ``w_global`` is this part's own copy of
    the global model: the model's memory, where the global model arrived, changes as it
    trains."""

    def __init__(self) -> None:
        self.mu = 0.0
        self.global_params: Dict[str, torch.Tensor] = {}
        self._hooks: Optional[GradientHooks] = None

    def before_train(self, model: torch.nn.Module, round_info: ClientRound) -> None:
        self.mu = float(round_info.config["mu"])
        self.global_params = cpu_copy(model)
        on_device = DeviceCache(self.global_params)
        self._hooks = replace_hooks(self._hooks, model, lambda name, p, grad: self.mu * (p.detach() - on_device.get(name, p)))

    def proximal_term(self, model: torch.nn.Module) -> float:
        """``mu / 2 * ||w - w_global||^2`` for the model's current parameters."""
        total = sum(float((p.detach().cpu().double() - self.global_params[name].double()).pow(2).sum())
                    for name, p in trainable_parameters(model))
        return self.mu / 2 * total

    def after_train(self, model: torch.nn.Module, state: Dict[str, torch.Tensor]) -> ClientReport:
        self._hooks.remove()
        return ClientReport()
