"""The server's side of FedAvg computation: client sampling, aggregation, metrics."""
from __future__ import annotations

import os
from argparse import Namespace
from typing import AbstractSet, Any, Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch

from fedml_core.aggregation import AggregationStrategy, ClientInstructions, ClientUpdate, FedAvg, FederationInfo, InvalidUpdate
from fedml_core.aggregation.validation import non_finite_tensor
from fedml_core.distributed.communication.packed_tensors import PackedTensors
from fedml_core.trainer.model_trainer import ModelTrainer, as_named_tensors, keeps_client_state, model_keys
from fedml_core.trainer.result_aggregator import ResultAggregator, aggregate_test_results

from .checkpoint import ServerCheckpoint, check_same_model


class FedAVGAggregator:
    """Holds the global model and turns client updates and test results into rounds.

    Args:
        model_trainer: the server's ModelTrainer; what its ``get_model_params()`` returns
            (tensors or numpy arrays) is the initial global model.
        result_aggregator: combines the clients' test metrics (``aggregate_result``, or
            FineFL's ``aggregate_test_result``).
        args: needs ``client_num_in_total``, ``client_num_per_round`` and ``seed``.
        strategy: the algorithm's server side (default :class:`FedAvg`); set up here
            with the initial model, whose ``named_parameters()`` are its trainable tensors.

    Attributes:
        client_states: the latest client state of each client whose trainer keeps one
            (``ModelTrainer.get_client_state``), in a client-state store under the run
            directory (``client_state/trainer``), whatever the strategy.
    """

    def __init__(self, model_trainer: ModelTrainer, result_aggregator: ResultAggregator, args: Namespace, strategy: Optional[AggregationStrategy] = None) -> None:
        self.trainer = model_trainer
        self.result_aggregator = result_aggregator
        self.args = args
        self.strategy = strategy if strategy is not None else FedAvg(getattr(args, "max_buffered_updates", None))
        self.global_model = PackedTensors.from_tensors(as_named_tensors(model_trainer.get_model_params(), model_trainer))
        model = getattr(model_trainer, "model", None)
        names = model_names(model, self.global_model)
        trainable = trainable_names(model, self.global_model, names)
        run_dir = getattr(args, "run_dir", None)
        federation = FederationInfo(args.client_num_in_total, args.client_num_per_round, getattr(args, "seed", 0),
                                    os.path.join(run_dir, "client_state") if run_dir else None,
                                    {wire: name for wire, name in names.items() if wire != name})
        self.strategy.setup(self.global_model, trainable, federation)
        self.client_states = federation.client_store("trainer")
        self._new_client_states: Dict[int, Dict[str, torch.Tensor]] = {}  # this round's, until its updates are used

    def resume(self, checkpoint: ServerCheckpoint, path: str) -> None:
        """Continue from ``checkpoint`` (read from ``path``): its global model and the
        strategy's state. Raises ValueError naming ``path`` when the checkpoint is of
        another model, or its strategy state is not this strategy's."""
        check_same_model(checkpoint.global_model, self.global_model.tensors(), path)
        self.global_model = PackedTensors.from_tensors(checkpoint.global_model)
        try:
            self.strategy.load_state_dict(checkpoint.strategy_state)
            if checkpoint.client_states:
                if not keeps_client_state(self.trainer):
                    raise ValueError(f"{type(self.trainer).__name__} keeps no client state (no get_client_state), but the "
                                     f"checkpoint holds its clients' states")
                self.client_states.restore(checkpoint.client_states)
        except ValueError as error:
            raise ValueError(f"--resume {path}: {error}") from None

    def client_sampling(self, round_idx: int, candidates: Optional[Sequence[int]] = None) -> List[int]:
        """The process ids of the clients that train in ``round_idx``.

        ``args.client_num_per_round`` of ``candidates`` (default: all clients
        1..CLIENT_NUM; the server passes the ones that have not failed), drawn without
        replacement from a generator seeded by ``(args.seed, round_idx)``: a run is
        reproducible, and a resumed run samples as the original would.
        """
        pool = sorted(candidates) if candidates is not None else list(range(1, self.args.client_num_in_total + 1))
        per_round = self.args.client_num_per_round
        if per_round >= len(pool):
            return pool
        rng = np.random.default_rng([self.args.seed, round_idx])
        return sorted(pool[int(i)] for i in rng.choice(len(pool), per_round, replace=False))

    def test_sampling(self, round_idx: int, candidates: Sequence[int]) -> List[int]:
        """The clients that test in round ``round_idx``: all ``candidates``, or
        ``args.test_clients`` of them drawn without replacement from a generator seeded
        by ``(args.seed, round_idx, 1)`` (reproducible; another draw than the training's)."""
        pool = sorted(candidates)
        wanted = getattr(self.args, "test_clients", None)
        if wanted is None or wanted >= len(pool):
            return pool
        rng = np.random.default_rng([self.args.seed, round_idx, 1])
        return sorted(pool[int(i)] for i in rng.choice(len(pool), wanted, replace=False))

    def add_partial_sum(self, worker: int, sums: Mapping[torch.dtype, torch.Tensor], weight: int) -> None:
        """Hand one worker's partial sum of the round to the strategy (see
        :mod:`fedml_core.aggregation.partial_sums`); ``worker`` orders the sums."""
        self.strategy.add_partial_sum(dict(sums), float(weight), worker)

    def configure_round(self, round_idx: int, clients: Sequence[int]) -> Dict[int, ClientInstructions]:
        """Every sampled client's instructions; each config names the algorithm."""
        given = self.strategy.configure_round(round_idx, clients, self.global_model)
        instructions = {}
        for client in clients:
            own = given.get(client, ClientInstructions())
            instructions[client] = ClientInstructions({"algorithm": self.strategy.name, **own.config}, own.tensors)
        return instructions

    def configure_test(self, round_idx: int, clients: Sequence[int]) -> Dict[int, ClientInstructions]:
        """The strategy's instructions for the ``clients`` that test the new global model."""
        return self.strategy.configure_test(round_idx, clients, self.global_model)

    def client_state(self, client_id: int) -> Optional[Dict[str, torch.Tensor]]:
        """The trainer state kept for ``client_id`` (None: it has none yet)."""
        return self.client_states.get(client_id)

    def hold_client_state(self, client_id: int, state: Dict[str, torch.Tensor]) -> None:
        """Take the trainer state ``client_id`` sent with its update of this round (its
        own memory); :meth:`keep_client_states` stores it if the update is used."""
        self._new_client_states[client_id] = state

    def keep_client_states(self, round_idx: int, left_out: AbstractSet[int]) -> None:
        """Store the trainer states held this round as version ``round_idx``, but those of
        the clients in ``left_out`` (failed, or their update rejected: their training
        did not count, so their last kept state stays theirs)."""
        held, self._new_client_states = self._new_client_states, {}
        for client_id, state in sorted(held.items()):
            if client_id not in left_out:
                self.client_states.put(client_id, round_idx, state)

    def client_states_snapshot(self) -> Dict[str, Any]:
        """What the checkpoint keeps of :attr:`client_states` (nothing when it is empty)."""
        return self.client_states.snapshot() if len(self.client_states) else {}

    def add_local_trained_result(self, client_id: int, params: PackedTensors, sample_number: int,
                                 tensors: Optional[PackedTensors] = None, metadata: Optional[Mapping[str, Any]] = None) -> None:
        """Hand one update to the strategy after checking its extra tensors (the ones
        the strategy expects: names, order, dtypes, shapes; finite) and its metadata.
        Raises :class:`InvalidUpdate` naming what is wrong."""
        if metadata is not None and not isinstance(metadata, dict):
            raise InvalidUpdate(f"the update's metadata must be a JSON object, got {type(metadata).__name__}")
        update = ClientUpdate(client_id, params, sample_number, tensors, dict(metadata or {}))
        expected = [(name, dtype, tuple(shape)) for name, dtype, shape in self.strategy.expected_client_tensors()]
        got = list(tensors.layout_key()) if tensors is not None else []
        if got != expected:
            raise InvalidUpdate(f"{self.strategy.name} expects the extra tensors {[e[0] for e in expected][:5]} "
                                f"({len(expected)}), got {[g[0] for g in got][:5]} ({len(got)}), or other dtypes or shapes")
        reason = non_finite_tensor(tensors) if tensors is not None else None
        if reason is not None:
            raise InvalidUpdate(f"extra {reason}")
        self.strategy.check_update(update)
        self.strategy.add(update)

    def aggregate(self, round_idx: int = 0) -> Dict[int, str]:
        """Replace the global model by the aggregate of this round's updates.

        Returns ``{client_id: reason}`` of the updates the strategy left out (holding
        NaN or Inf, for FedAvg). Raises ValueError, leaving the global model as it was,
        if no update could be used.
        """
        self.global_model = self.strategy.aggregate(self.global_model, round_idx)
        return self.strategy.rejected_updates()

    def global_model_state(self) -> Dict[str, torch.Tensor]:
        """An independent copy of the global model's state_dict."""
        return self.global_model.copy_tensors()

    def aggregate_test_results(self, round_idx: int, results: Mapping[int, Mapping[str, Any]]) -> Dict[str, Any]:
        """Combine round ``round_idx``'s ``{client_id: {"result": ..., "sample_number": ...}}``
        with the ResultAggregator, which receives them keyed by client_idx from 0 (the contract)."""
        ordered = {idx: results[cid] for idx, cid in enumerate(sorted(results))}
        return aggregate_test_results(self.result_aggregator, round_idx, ordered)


def model_names(model: Optional[torch.nn.Module], global_model: PackedTensors) -> Dict[str, str]:
    """The model's name (``state_dict`` key) of each global-model tensor, matched as
    :func:`~fedml_core.trainer.model_trainer.model_keys` matches them (a list's ``"0"``,
    ``"1"``, ... by position); empty without a model to ask, or a result it cannot match."""
    if not isinstance(model, torch.nn.Module):
        return {}
    return model_keys([spec.name for spec in global_model.specs], model)


def trainable_names(model: Optional[torch.nn.Module], global_model: PackedTensors, names: Mapping[str, str]) -> List[str]:
    """The names of the global model's tensors that are the model's parameters (the
    others are buffers), by their model's ``names`` (:func:`model_names`). Without
    those, every floating-point tensor counts as a parameter."""
    if names:
        parameters = {name for name, _ in model.named_parameters()}
        return [spec.name for spec in global_model.specs if names.get(spec.name) in parameters]
    return [spec.name for spec in global_model.specs if spec.dtype.is_floating_point]
