"""The interface every aggregation strategy implements."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Dict

from ..distributed.communication.packed_tensors import PackedTensors


@dataclass
class ClientUpdate:
    """One client's contribution to a round.

    Attributes:
        client_id: the client's process id (1..CLIENT_NUM).
        params: its full model state after local training, packed per dtype.
        sample_number: its number of training samples (its FedAvg weight).
    """

    client_id: int
    params: PackedTensors
    sample_number: int


class AggregationStrategy(ABC):
    """Combines a round's client updates into the next global model.

    Updates arrive one at a time (:meth:`add`) so a strategy may fold them as they
    come instead of holding them all; :meth:`aggregate` returns the round's result and
    resets the strategy for the next round.
    """

    @abstractmethod
    def add(self, update: ClientUpdate) -> None:
        """Take one client's update for the current round."""

    @abstractmethod
    def aggregate(self, global_model: PackedTensors) -> PackedTensors:
        """The new global model from the updates added since the last call.

        ``global_model`` is the model the clients started the round from.
        """

    def rejected_updates(self) -> Dict[int, str]:
        """``{client_id: reason}`` of the updates the last :meth:`aggregate` left out
        (e.g. for holding NaN or Inf). A strategy that rejects nothing returns ``{}``."""
        return {}
