"""The interface every federated algorithm implements: a server-side strategy and,
where the algorithm needs one, a client-side part (:class:`ClientAlgorithm`).

One round, as the server drives it::

    instructions = strategy.configure_round(round_idx, sampled_clients, global_model)
    # each sampled client: the global model + instructions[client] (config, tensors);
    #   on the client: ClientAlgorithm.before_train, the user's train(), after_train
    for update in the replies:          # checked first: layout, extra tensors, finiteness
        strategy.add(update)
    global_model = strategy.aggregate(global_model, round_idx)
    strategy.rejected_updates(), strategy.round_metrics()   # into metrics.jsonl
    # on test rounds, each tested client: the new global model + its test instructions
    instructions = strategy.configure_test(round_idx, tested_clients, global_model)
    #   on the client: ClientAlgorithm.before_test, the user's test()
    strategy.state_dict()                                    # into the checkpoint
"""
from __future__ import annotations

import os
from abc import ABC, abstractmethod
from argparse import Namespace
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from ..distributed.communication.packed_tensors import PackedTensors
from .client_state import ClientStateStore

#: ``(name, dtype, shape)`` of one tensor: what a layout is made of.
TensorEntry = Tuple[str, torch.dtype, Tuple[int, ...]]


@dataclass
class ClientUpdate:
    """One client's contribution to a round.

    Lifetime: ``params`` may be memory the client lent the server (its own model's
    memory, on the server's host). It is valid until the server next sends that client
    a message, which it does only after :meth:`AggregationStrategy.aggregate` returned:
    a strategy must not keep ``params`` (or views of it) beyond ``aggregate``; copy
    what it needs later. ``tensors`` is received memory; a strategy that keeps it (or
    views of it) beyond :meth:`add` copies it there, as SCAFFOLD does: under MPI the
    buffer may be the transport's to reuse for a later message.

    Attributes:
        client_id: the client's process id (1..CLIENT_NUM).
        params: its full model state after local training, packed per dtype (same
            names, order, dtypes and shapes as the global model: checked on arrival).
        sample_number: its number of training samples (its FedAvg weight).
        tensors: the extra named tensors its :class:`ClientAlgorithm` sent (e.g.
            SCAFFOLD's new control variate), or None; checked on arrival against
            :meth:`AggregationStrategy.expected_client_tensors`, and finite.
        metadata: plain JSON values its :class:`ClientAlgorithm` sent (e.g. FedNova's
            local step count); checked by :meth:`AggregationStrategy.check_update`.
    """

    client_id: int
    params: PackedTensors
    sample_number: int
    tensors: Optional[PackedTensors] = None
    metadata: Dict[str, Any] = field(default_factory=dict)


@dataclass
class ClientInstructions:
    """What the server sends one sampled client besides the global model.

    Attributes:
        config: plain JSON values (a proximal mu, a learning rate for this round, ...).
        tensors: extra named tensors (e.g. SCAFFOLD's control-variate correction); CPU
            tensors the strategy does not modify afterwards (they are sent concurrently).
    """

    config: Dict[str, Any] = field(default_factory=dict)
    tensors: Dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class FederationInfo:
    """The federation a strategy serves, given to :meth:`AggregationStrategy.setup`.

    Attributes:
        num_clients: CLIENT_NUM, the number of clients (process ids 1..CLIENT_NUM).
        clients_per_round: WORKER_NUM, the number sampled each round.
        seed: the run's seed (for a strategy's own randomness, e.g. DP noise).
        state_directory: where a strategy keeps per-client state on disk (a folder under
            the run directory; see :mod:`~fedml_core.aggregation.client_state`); None:
            in memory (a strategy used outside a run).
        model_names: the model's ``state_dict`` key of each global-model tensor whose
            name on the wire is another (a trainer whose ``get_model_params`` returns a
            list sends ``"0"``, ``"1"``, ...; see :meth:`model_name`).
    """

    num_clients: int
    clients_per_round: int
    seed: int = 0
    state_directory: Optional[str] = None
    model_names: Mapping[str, str] = field(default_factory=dict)

    def model_name(self, name: str) -> str:
        """The model's name (``state_dict`` key) of the global-model tensor ``name``."""
        return self.model_names.get(name, name)

    def client_store(self, name: str) -> ClientStateStore:
        """A store of per-client tensors of its own, ``<state_directory>/<name>`` (in
        memory without a state directory); ``name`` tells the stores of a run apart
        (e.g. the algorithm's name)."""
        return ClientStateStore(os.path.join(self.state_directory, name) if self.state_directory else None)


class AggregationStrategy(ABC):
    """The server side of one federated algorithm.

    Updates arrive one at a time (:meth:`add`) so a strategy may fold them as they
    come instead of holding them all; :meth:`aggregate` returns the round's result and
    resets the strategy for the next round.

    Two rules the server relies on:

    * :meth:`aggregate` returns a new model and never modifies ``global_model`` in
      place: the checkpoint thread may still be writing it from its own memory. The
      same goes for the tensors :meth:`state_dict` returns: build new ones each round
      instead of updating them in place.
    * The updates' ``params`` are lent until :meth:`aggregate` returns (see
      :class:`ClientUpdate`).

    Attributes:
        name: the algorithm's name (``--federated_optimizer``); clients check that the
            server runs the algorithm they do.
    """

    name = "FedAvg"
    #: True if the new model depends on the updates only through their mean weighted by
    #: sample number: with ``--worker_processes``, each worker then sends one partial sum
    #: of its clients (:meth:`add_partial_sum`) instead of every client's update.
    accepts_partial_sums = False

    def setup(self, global_model: PackedTensors, trainable: Sequence[str], federation: FederationInfo) -> None:
        """Called once before the first round (and before :meth:`load_state_dict` on a
        resume). ``global_model``: the initial model (its layout is every round's);
        ``trainable``: the names of its tensors that are parameters (the others are
        buffers, e.g. BatchNorm statistics)."""

    def configure_round(self, round_idx: int, clients: Sequence[int], global_model: PackedTensors) -> Dict[int, ClientInstructions]:
        """``{client_id: instructions}`` for the sampled ``clients`` of round
        ``round_idx`` (0-based); a client left out gets none (empty config, no tensors)."""
        return {}

    def configure_test(self, round_idx: int, clients: Sequence[int], global_model: PackedTensors) -> Dict[int, ClientInstructions]:
        """``{client_id: instructions}`` for the ``clients`` that test ``global_model``
        (the aggregate of round ``round_idx``), which their :class:`ClientAlgorithm`
        gets in :meth:`~ClientAlgorithm.before_test` (e.g. a client's personal layers,
        so that it tests its own model); a client left out gets none (none by default)."""
        return {}

    def expected_client_tensors(self) -> List[TensorEntry]:
        """The extra tensors every update must carry, in order (none by default)."""
        return []

    def check_update(self, update: ClientUpdate) -> None:
        """Raise :class:`~fedml_core.aggregation.validation.InvalidUpdate` if the
        update's metadata is not what this algorithm's client part sends."""

    @abstractmethod
    def add(self, update: ClientUpdate) -> None:
        """Take one client's update for the current round."""

    def add_partial_sum(self, sums: Dict[torch.dtype, torch.Tensor], weight: float, order_key: int) -> None:
        """Take one worker's partial sum of the round (see
        :mod:`~fedml_core.aggregation.partial_sums`): ``sums`` holds, per dtype of the
        model's packed groups, the float64 vector ``sum_i n_i * x_i`` over that worker's
        clients, and ``weight`` is ``sum_i n_i``; ``order_key`` orders the sums (the
        worker's rank). Only strategies with :attr:`accepts_partial_sums` get these."""
        raise NotImplementedError(f"{self.name} needs every client's update (accepts_partial_sums is False)")

    @abstractmethod
    def aggregate(self, global_model: PackedTensors, round_idx: int = 0) -> PackedTensors:
        """The new global model from the updates added since the last call.

        ``global_model`` is the model the clients started round ``round_idx`` from; it
        must not be modified. Raises ValueError if no update can be used.
        """

    def rejected_updates(self) -> Dict[int, str]:
        """``{client_id: reason}`` of the updates the last :meth:`aggregate` left out
        (e.g. for holding NaN or Inf). A strategy that rejects nothing returns ``{}``."""
        return {}

    def round_metrics(self) -> Dict[str, Any]:
        """Plain JSON values the last :meth:`aggregate` reports, added to the round's
        record in ``metrics.jsonl`` (e.g. the privacy spent, the clipped clients)."""
        return {}

    def state_dict(self) -> Dict[str, Any]:
        """The strategy's state between rounds (tensors and plain values), saved with
        the checkpoint; a resumed run continues bit-exactly from it."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s result (after :meth:`setup`)."""
        if state:
            raise ValueError(f"{self.name} keeps no state, but the checkpoint holds {sorted(state)}")

    def client_algorithm(self, args: Namespace) -> Optional["ClientAlgorithm"]:
        """The client-side part of this algorithm (None: the user's train() alone)."""
        return None


@dataclass
class ClientRound:
    """What a client's algorithm part knows of the round it trains (or tests in).

    Attributes:
        round_idx: the round (0-based).
        client_id: this client's process id.
        config: the server's :attr:`ClientInstructions.config` for this client (of
            :meth:`AggregationStrategy.configure_round`, or of ``configure_test`` for a test).
        tensors: the server's :attr:`ClientInstructions.tensors` for this client (CPU);
            those named like the global model's entries by the model's own names (its
            ``state_dict`` keys) even where ``get_model_params`` returns a list, and so
            are the :class:`ClientReport` tensors the part returns.
        args: the run's arguments (the same on every process).
    """

    round_idx: int
    client_id: int
    config: Mapping[str, Any]
    tensors: Mapping[str, torch.Tensor]
    args: Namespace


@dataclass
class ClientReport:
    """What a client's algorithm part sends the server besides the trained model.

    Attributes:
        tensors: extra named tensors (see :meth:`AggregationStrategy.expected_client_tensors`).
        metadata: plain JSON values (see :meth:`AggregationStrategy.check_update`).
        client_state: set by the framework, not by algorithm parts: what the user's
            trainer's ``get_client_state()`` returned after ``train()`` (CPU copies), which
            the server keeps for this client and hands back before its next training;
            None when the trainer keeps no client state.
    """

    tensors: Dict[str, torch.Tensor] = field(default_factory=dict)
    metadata: Dict[str, Any] = field(default_factory=dict)
    client_state: Optional[Dict[str, torch.Tensor]] = None


class ClientAlgorithm:
    """The client side of an algorithm: what it does around the user's
    ``ModelTrainer.train()``, which does not know about it.

    :meth:`before_train` runs after the global model was loaded into the model (with
    the trainer's ``set_model_params``), :meth:`after_train` after ``train()`` returned;
    on test rounds, :meth:`before_test` runs after the new global model was loaded, before
    the user's ``test()``.
    The model's tensors there may be the very memory the global model arrived in: an
    algorithm that needs the global model during training (a proximal term) keeps its
    own copy.
    """

    def before_train(self, model: torch.nn.Module, round_info: ClientRound) -> None:
        """Prepare for local training of ``model`` (e.g. register gradient hooks)."""

    def after_train(self, model: torch.nn.Module, state: Dict[str, torch.Tensor]) -> ClientReport:
        """Finish the round: ``state`` is the trained state about to be sent (it may be
        modified in place, e.g. by an attack). Returns what to send besides it."""
        return ClientReport()

    def before_test(self, model: torch.nn.Module, round_info: ClientRound) -> None:
        """Prepare ``model`` for the user's ``test()``: ``round_info`` holds the server's
        :meth:`AggregationStrategy.configure_test` instructions for this client."""
