"""Strategies that move the global model from a weighted mean of the client states.

Every server-side optimizer of the literature (FedAvgM, FedAdagrad, FedAdam, FedYogi,
SCAFFOLD's and FedNova's server steps, clipped and private means) has the same shape:
take a weighted mean of the client states, then on the trainable tensors compute the
new model from the mean, the old model ``x`` and the optimizer's own state (momentum,
moments), elementwise. :class:`ServerOptimizer` runs that step on each cache-sized
block of the mean inside the averaging pass itself (see
:meth:`~fedml_core.aggregation.fedavg.WeightedMeanAccumulator.result`), so it reads
the model and the optimizer state once and costs no pass of its own over the updates.
It runs on a whole block at a time (one call per contiguous run of updated tensors in
it): each torch op costs a few microseconds of Python and a turn at the GIL,
which the worker threads share, and on smaller pieces those costs outweighed keeping
the step's arrays in the core's own cache (see docs/BENCHMARKS.md).
Buffers (BatchNorm statistics, counters) take the weighted mean, as in FedAvg.
"""
from __future__ import annotations

import bisect
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from ..distributed.communication.packed_tensors import BufferPool, PackedTensors, dtype_from_name, dtype_name
from .fedavg import WeightedMeanAccumulator, _accumulator_dtype
from .partial_sums import PartialSumAccumulator
from .strategy import AggregationStrategy, ClientUpdate, FederationInfo

Run = Tuple[int, int, int]  # offset in the model's dtype buffer, offset in the state vector, length
StateSlices = Dict[str, torch.Tensor]


class ServerOptimizer(AggregationStrategy):
    """Base of the strategies whose new model is ``step(x, mean, state)`` elementwise.

    Subclasses name their state vectors in :attr:`state_names` (each is one value per
    trainable element, starting at :meth:`initial_state`), give each update its weight
    in the mean (:meth:`weight`, default its sample number) and implement :meth:`step`.

    Args:
        max_buffered_updates: see :class:`~fedml_core.aggregation.fedavg.WeightedMeanAccumulator`.
    """

    state_names: Tuple[str, ...] = ()

    def __init__(self, max_buffered_updates: Optional[int] = None) -> None:
        self._accumulator = WeightedMeanAccumulator(max_buffered_updates)
        self._partial_sums = PartialSumAccumulator()
        self._runs: Dict[torch.dtype, List[Run]] = {}
        self._run_starts: Dict[torch.dtype, List[int]] = {}
        self._state: Dict[str, Dict[torch.dtype, torch.Tensor]] = {}
        self._next: Dict[str, Dict[torch.dtype, torch.Tensor]] = {}
        # A round's new state is built in buffers nobody references any more (the
        # checkpoint thread may still be writing the previous ones): per state vector and
        # dtype, the current, the next, one being written and a spare.
        self._pool = BufferPool(max_buffers=4 * len(self.state_names) * 4 or 1)
        self._x: Optional[PackedTensors] = None
        self.federation: Optional[FederationInfo] = None

    # -- what subclasses define -----------------------------------------------------
    def weight(self, update: ClientUpdate) -> float:
        """The update's weight in the mean (default: its sample number)."""
        if update.sample_number <= 0:
            raise ValueError(f"client {update.client_id} reported {update.sample_number} samples; expected a positive count")
        return float(update.sample_number)

    def initial_state(self, name: str) -> float:
        """The value every element of state vector ``name`` starts from (default 0)."""
        return 0.0

    def step(self, mean: torch.Tensor, x: torch.Tensor, old: StateSlices, new: StateSlices) -> None:
        """Write the new model into ``mean`` (which holds the weighted mean of the
        client states) from it, the old model ``x`` (do not modify) and the old state
        ``old[name]``; write the new state into ``new[name]``. All are 1-D slices of one
        length, within one cache-sized block; ``mean`` and the state vectors are
        float32 (float64 for float64 models), ``x`` has the model's dtype. ``mean`` and
        ``new`` may serve as temporaries on the way (a separate temporary would take
        cache from the step's own arrays), ``x`` and ``old`` may not: a block's step
        may be run again from them (see
        :meth:`~fedml_core.aggregation.fedavg.WeightedMeanAccumulator.result`)."""
        raise NotImplementedError

    def updated_names(self, global_model: PackedTensors, trainable: Sequence[str]) -> List[str]:
        """The tensors :meth:`step` applies to (default: the trainable floating-point ones)."""
        wanted = set(trainable)
        return [s.name for s in global_model.specs if s.name in wanted and s.dtype.is_floating_point]

    # -- the strategy ---------------------------------------------------------------
    def setup(self, global_model: PackedTensors, trainable: Sequence[str], federation: FederationInfo) -> None:
        self.federation = federation
        names = set(self.updated_names(global_model, trainable))
        self._runs, sizes = {}, {}
        for spec in sorted((s for s in global_model.specs if s.name in names), key=lambda s: (str(s.dtype), s.offset)):
            runs = self._runs.setdefault(spec.dtype, [])
            size = sizes.get(spec.dtype, 0)
            if runs and runs[-1][0] + runs[-1][2] == spec.offset:  # adjacent: one run
                runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + spec.numel)
            else:
                runs.append((spec.offset, size, spec.numel))
            sizes[spec.dtype] = size + spec.numel
        self._run_starts = {dtype: [run[0] for run in runs] for dtype, runs in self._runs.items()}
        self._state = {name: {dtype: torch.full((n,), self.initial_state(name), dtype=_accumulator_dtype(dtype))
                              for dtype, n in sizes.items()} for name in self.state_names}

    def add(self, update: ClientUpdate) -> None:
        self._accumulator.add(update.params, self.weight(update), order_key=update.client_id)

    def add_partial_sum(self, sums: Dict[torch.dtype, torch.Tensor], weight: float, order_key: int) -> None:
        if not self.accepts_partial_sums:  # a subclass that weighs or transforms each update
            super().add_partial_sum(sums, weight, order_key)
        self._partial_sums.add(sums, weight, order_key)

    def aggregate(self, global_model: PackedTensors, round_idx: int = 0) -> PackedTensors:
        self._x, self.round_idx = global_model, round_idx
        self._next = {name: {dtype: self._pool.take(v.numel() * v.element_size()).view(v.dtype) for dtype, v in vectors.items()}
                      for name, vectors in self._state.items()}
        try:
            if self._partial_sums:
                result = self._partial_sums.result(global_model, self.finish_block)
            else:
                result = self._accumulator.result(self.finish_block)
        finally:
            self._x = None
        self._state, self._next = self._next, {}
        return result

    def rejected_updates(self) -> Dict[int, str]:
        return dict(self._accumulator.rejected)

    def finish_block(self, dtype: torch.dtype, start: int, block: torch.Tensor) -> None:
        """Apply :meth:`step` to the pieces of ``block`` that are updated tensors: one
        call per run of adjacent updated tensors, in the block while it is in cache."""
        runs = self._runs.get(dtype)
        if not runs:
            return
        end = start + block.numel()
        first = max(0, bisect.bisect_right(self._run_starts[dtype], start) - 1)
        x = self._x.groups[dtype]
        for offset, state_offset, length in runs[first:]:
            if offset >= end:
                break
            lo, hi = max(offset, start), min(offset + length, end)
            at = state_offset + lo - offset
            self.step(block[lo - start:hi - start], x[lo:hi],
                      {name: vectors[dtype][at:at + hi - lo] for name, vectors in self._state.items()},
                      {name: vectors[dtype][at:at + hi - lo] for name, vectors in self._next.items()})

    def state_dict(self) -> Dict[str, Any]:
        return {"state": {name: {dtype_name(dtype): v for dtype, v in vectors.items()} for name, vectors in self._state.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        stored = state.get("state", {})
        if set(stored) != set(self._state):
            raise ValueError(f"{self.name}: the checkpoint's strategy state holds {sorted(stored)}, expected {sorted(self._state)}")
        for name, vectors in stored.items():
            loaded = {dtype_from_name(d): v for d, v in vectors.items()}
            mine = self._state[name]
            if {d: (v.dtype, v.numel()) for d, v in loaded.items()} != {d: (v.dtype, v.numel()) for d, v in mine.items()}:
                raise ValueError(f"{self.name}: the checkpoint's {name!r} state is for another model")
            self._state[name] = loaded


def global_step(mean: torch.Tensor, x: torch.Tensor, rate: float) -> None:
    """``mean <- x + rate * (mean - x)`` (the plain server step; rate 1 keeps the mean)."""
    if rate != 1.0:
        torch.lerp(x.to(mean.dtype), mean, rate, out=mean)
