"""The server's side of FedAvg computation: client sampling, aggregation, metrics."""
from __future__ import annotations

from argparse import Namespace
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch

from fedml_core.aggregation import AggregationStrategy, ClientUpdate, FedAvg
from fedml_core.distributed.communication.packed_tensors import PackedTensors
from fedml_core.trainer.model_trainer import ModelTrainer, as_named_tensors
from fedml_core.trainer.result_aggregator import ResultAggregator, aggregate_test_results


class FedAVGAggregator:
    """Holds the global model and turns client updates and test results into rounds.

    Args:
        model_trainer: the server's ModelTrainer; what its ``get_model_params()`` returns
            (tensors or numpy arrays) is the initial global model.
        result_aggregator: combines the clients' test metrics (``aggregate_result``, or
            FineFL's ``aggregate_test_result``).
        args: needs ``client_num_in_total``, ``client_num_per_round`` and ``seed``.
        strategy: how updates are combined (default :class:`FedAvg`).
    """

    def __init__(self, model_trainer: ModelTrainer, result_aggregator: ResultAggregator, args: Namespace, strategy: Optional[AggregationStrategy] = None) -> None:
        self.trainer = model_trainer
        self.result_aggregator = result_aggregator
        self.args = args
        self.strategy = strategy if strategy is not None else FedAvg(getattr(args, "max_buffered_updates", None))
        self.global_model = PackedTensors.from_tensors(as_named_tensors(model_trainer.get_model_params(), model_trainer))

    def set_global_model(self, state: Mapping[str, torch.Tensor]) -> None:
        """Replace the global model (e.g. with a checkpoint's)."""
        self.global_model = PackedTensors.from_tensors(state)

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

    def add_local_trained_result(self, client_id: int, params: PackedTensors, sample_number: int) -> None:
        self.strategy.add(ClientUpdate(client_id, params, sample_number))

    def aggregate(self) -> Dict[int, str]:
        """Replace the global model by the aggregate of this round's updates.

        Returns ``{client_id: reason}`` of the updates the strategy left out (holding
        NaN or Inf, for FedAvg). Raises ValueError, leaving the global model as it was,
        if no update could be used.
        """
        self.global_model = self.strategy.aggregate(self.global_model)
        return self.strategy.rejected_updates()

    def global_model_state(self) -> Dict[str, torch.Tensor]:
        """An independent copy of the global model's state_dict."""
        return self.global_model.copy_tensors()

    def aggregate_test_results(self, round_idx: int, results: Mapping[int, Mapping[str, Any]]) -> Dict[str, Any]:
        """Combine round ``round_idx``'s ``{client_id: {"result": ..., "sample_number": ...}}``
        with the ResultAggregator, which receives them keyed by client_idx from 0 (the contract)."""
        ordered = {idx: results[cid] for idx, cid in enumerate(sorted(results))}
        return aggregate_test_results(self.result_aggregator, round_idx, ordered)
