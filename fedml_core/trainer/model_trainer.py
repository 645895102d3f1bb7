"""The one class a user writes to federate a model: how to get, set, train and test it."""
from __future__ import annotations

from abc import ABC, abstractmethod
from argparse import Namespace
from typing import Any, Dict

import torch


class ModelTrainer(ABC):
    """Wraps one model instance per process; the federation only talks to it through here.

    Every process (server and clients) builds one in ``main_fedavg.py`` around the same
    architecture. The server uses it only to hold and hand out the global parameters; the
    clients also train and test with it. ``self.model`` is the wrapped ``torch.nn.Module``.
    """

    def __init__(self, model: torch.nn.Module, args: Namespace | None = None) -> None:
        self.model = model
        self.args = args

    def get_model_params(self) -> Dict[str, torch.Tensor]:
        """Return the model's full state: parameters AND buffers (BatchNorm statistics,
        ``num_batches_tracked`` counters), as ``state_dict()`` does. Tensors may share
        memory with the model; the framework copies them before the model changes."""
        return self.model.state_dict()

    def set_model_params(self, model_parameters: Dict[str, torch.Tensor]) -> None:
        """Load a full state (the global model) into ``self.model``; keys must match."""
        self.model.load_state_dict(model_parameters)

    @abstractmethod
    def get_local_sample_number(self, train_path: str) -> int:
        """Number of training samples under ``train_path``: this client's FedAvg weight."""

    @abstractmethod
    def train(self, device: torch.device, args: Namespace, train_path: str) -> None:
        """Train ``self.model`` in place on the data under ``train_path`` (local epochs,
        batch size, learning rate etc. come from ``args``)."""

    @abstractmethod
    def test(self, device: torch.device, args: Namespace, test_path: str) -> Dict[str, Any]:
        """Evaluate ``self.model`` on the data under ``test_path``.

        Returns a JSON-serialisable dict of metrics, e.g. ``{"accuracy": 0.91, "loss": 0.3}``.
        The server combines the clients' dicts with a :class:`ResultAggregator`.
        """
