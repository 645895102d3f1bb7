"""Hierarchical FedAvg: a worker process folds its clients' states into one partial sum,
and the server adds the workers' partial sums.

With many clients per worker process (``--worker_processes``), sending every client's
state to the server would cost a model per client on the wire; instead each worker
sends ``S = sum_i n_i * x_i`` over its clients (``n_i``: the client's sample number,
``x_i``: its state) with ``N = sum_i n_i``, and the server computes
``mean = (sum_k S_k) / (sum_k N_k)``. On several hosts, the workers of a host may add
their sums together first (:meth:`PartialSum.add_sum`; see
fedml_api/distributed/fedavg/host_combining.py), which changes nothing below.

Exactness: the sums are kept in float64, with the model's grouping (one vector per
dtype of the model, in the model's packed order). A float32 value times an integer
sample number below 2**29 is exact in float64, and float64 sums of such terms are exact
unless one coordinate's terms span more than about 2**20 in magnitude; the mean is then
rounded once to the model's dtype. So the result does not depend on how the clients
were split among workers, or in which order the partial sums arrived: it is the
float64 mean rounded once, as a flat computation in float64 gives it (an inexact
float64 sum can flip the last bit of the float32 result only when its value lies
within 2**-53 of a float32 rounding midpoint). The one-client-per-process mode keeps
its own float32 fold (see :class:`~fedml_core.aggregation.fedavg.WeightedMeanAccumulator`),
whose results differ from these in the last bits.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch

from ..distributed.communication.packed_tensors import PackedTensors, dtype_from_name, dtype_name
from .blocks import BLOCK_ELEMENTS, BlockFinisher, _accumulator_dtype, from_accumulator
from .validation import non_finite_tensor

#: Tensor names of a partial sum on the wire: one float64 vector per model dtype.
PARTIAL_PREFIX = "sum:"


class PartialSum:
    """The running ``sum_i n_i * x_i`` of one worker's clients, over one model layout.

    Args:
        template: the round's global model (its layout: specs and per-dtype sizes).
    """

    def __init__(self, template: PackedTensors) -> None:
        self.sums: Dict[torch.dtype, torch.Tensor] = {dtype: torch.zeros(group.numel(), dtype=torch.float64)
                                                      for dtype, group in template.groups.items()}
        self.clients: List[int] = []

    def add(self, client_id: int, state: PackedTensors, sample_number: int) -> Optional[str]:
        """Fold one client's ``state`` (packed in the template's layout) with weight
        ``sample_number`` (an integer >= 1). Returns None, or the reason the state was
        left out: it holds NaN or Inf (a client's update is checked before it is
        folded, because a sum that held it could not be undone)."""
        reason = non_finite_tensor(state)
        if reason is not None:
            return reason
        for dtype, total in self.sums.items():
            # float64 arithmetic: the product of a float32 value and the integer weight is exact.
            total.add_(state.groups[dtype], alpha=sample_number)
        self.clients.append(client_id)
        return None

    def add_sum(self, clients: List[int], tensors: Dict[str, torch.Tensor]) -> None:
        """Fold another worker's partial sum of ``clients`` (its :meth:`tensors`, as
        received; none when it folded no client) into this one: per-host combining.
        Raises ValueError, folding nothing, unless the vectors are this sum's layout."""
        if not clients:
            return
        sums = _partial_sum_vectors(tensors, {dtype: total.numel() for dtype, total in self.sums.items()})
        for dtype, total in self.sums.items():
            total.add_(sums[dtype])  # float64 sums of exact products: exact, as the server's are
        self.clients.extend(clients)

    def tensors(self) -> Dict[str, torch.Tensor]:
        """The sums as named float64 vectors for a message (``sum:<dtype>``)."""
        return {PARTIAL_PREFIX + dtype_name(dtype): total for dtype, total in self.sums.items()}


def received_partial_sum(tensors: Dict[str, torch.Tensor], template: PackedTensors) -> Dict[torch.dtype, torch.Tensor]:
    """A partial sum's vectors from a message, by the model dtype they sum; raises
    ValueError unless there is one float64 vector per dtype of ``template``, of its size."""
    return _partial_sum_vectors(tensors, {dtype: group.numel() for dtype, group in template.groups.items()})


def _partial_sum_vectors(tensors: Dict[str, torch.Tensor], expected: Dict[torch.dtype, int]) -> Dict[torch.dtype, torch.Tensor]:
    """``tensors`` by the model dtype they sum, checked against ``expected`` (dtype -> elements)."""
    sums = {}
    for name, tensor in tensors.items():
        if not name.startswith(PARTIAL_PREFIX):
            raise ValueError(f"a partial sum's tensors are named {PARTIAL_PREFIX}<dtype>, got {name!r}")
        sums[dtype_from_name(name[len(PARTIAL_PREFIX):])] = tensor
    got = {dtype: t.numel() for dtype, t in sums.items() if t.dtype == torch.float64 and t.dim() == 1}
    if got != expected or len(got) != len(sums):
        raise ValueError(f"the partial sum holds {[(dtype_name(d), t.dtype, tuple(t.shape)) for d, t in sums.items()]}, "
                         f"expected one float64 vector per model dtype: {[(dtype_name(d), n) for d, n in expected.items()]}")
    return sums


class PartialSumAccumulator:
    """Adds the workers' partial sums of one round and turns them into the mean."""

    def __init__(self) -> None:
        self._pending: List[Tuple[int, Dict[torch.dtype, torch.Tensor], float]] = []

    def __bool__(self) -> bool:
        return bool(self._pending)

    def add(self, sums: Dict[torch.dtype, torch.Tensor], weight: float, order_key: int = 0) -> None:
        """Take one worker's sums (float64 per model dtype) of total weight ``weight`` > 0."""
        if not weight > 0:
            raise ValueError(f"a partial sum's weight must be positive, got {weight}")
        self._pending.append((order_key, sums, float(weight)))

    def result(self, template: PackedTensors, finish: Optional[BlockFinisher] = None) -> PackedTensors:
        """The mean of everything added, in ``template``'s layout; resets the accumulator.

        ``finish(dtype, start, block)`` is called on every block of the mean, as
        :meth:`~fedml_core.aggregation.fedavg.WeightedMeanAccumulator.result` does
        (``block`` in the accumulator's dtype: float32 for 16-bit floats, float64 for
        integers and bools). Raises ValueError if nothing was added or the mean is not finite.
        """
        pending, self._pending = sorted(self._pending, key=lambda entry: entry[0]), []
        if not pending:
            raise ValueError("no partial sum was added: nothing to average")
        total_weight = sum(weight for _, _, weight in pending)
        groups = {}
        for dtype, group in template.groups.items():
            accumulator = _accumulator_dtype(dtype)
            mean = torch.empty(group.numel(), dtype=accumulator)
            scratch = torch.empty(min(BLOCK_ELEMENTS, group.numel()), dtype=torch.float64)
            for start in range(0, group.numel(), BLOCK_ELEMENTS):
                length = min(BLOCK_ELEMENTS, group.numel() - start)
                block = scratch[:length].copy_(pending[0][1][dtype].narrow(0, start, length))
                for _, sums, _ in pending[1:]:
                    block.add_(sums[dtype].narrow(0, start, length))
                block.div_(total_weight)
                if dtype.is_floating_point and not torch.isfinite(block).all():
                    raise ValueError(f"the mean of the partial sums is not finite ({dtype_name(dtype)} elements "
                                     f"{start}..{start + length})")
                out = mean.narrow(0, start, length).copy_(block)  # the one rounding to the accumulator's dtype
                if finish is not None:
                    finish(dtype, start, out)
            groups[dtype] = from_accumulator(dtype, mean)
        return PackedTensors(list(template.specs), groups)

