"""FedAvg: the sample-weighted mean of the clients' full model states.

Everything in the state is averaged — parameters AND buffers (BatchNorm running
statistics) — weighted by each client's sample number. Integer buffers (such as
``num_batches_tracked``) get the weighted mean rounded to the nearest integer, and
boolean ones a weighted majority vote. Updates holding NaN or Inf are left out.

Speed: the states arrive packed (one flat buffer per dtype), and the mean is computed
in cache-sized blocks: for each block, every buffered update is added into an
accumulator block that stays in L2 cache. Memory traffic is thus close to the minimum
of reading each update once and writing the result once, instead of re-reading and
re-writing a model-sized accumulator per update. The finiteness check rides on the
same pass: one sum of each block while it is in cache. The accumulator, which becomes
the result, is recycled from a round whose result nobody references any more: a fresh
model-sized buffer would page-fault on first touch, which costs more than the
arithmetic (see docs/BENCHMARKS.md).
"""
from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional, Tuple

import torch

from ..distributed.communication.packed_tensors import BufferPool, PackedTensors
from .blocks import BLOCK_ELEMENTS, BlockFinisher, _accumulator_dtype, from_accumulator
from .partial_sums import PartialSumAccumulator
from .strategy import AggregationStrategy, ClientUpdate
from .validation import layout_mismatch, non_finite_tensor

Shard = Tuple[torch.dtype, torch.Tensor, List[Tuple[torch.Tensor, float]], int, int]  # dtype, sums, sources, start, end


def aggregation_threads() -> int:
    """Threads for one aggregation: every core this process may run on. The server
    aggregates while the round's clients wait for it, so their cores are free."""
    return len(os.sched_getaffinity(0))


class WeightedMeanAccumulator:
    """Weighted mean of packed states that share one layout.

    States holding NaN or Inf are left out of the mean and listed in :attr:`rejected`.
    The check costs almost nothing: the fold tests each accumulated block while it is
    still in cache, and only when a block is not finite does it look for the states
    responsible, then folds again without them.

    Args:
        max_buffered: updates held before they are folded into the running sums
            (``None``: hold all of a round's updates and fold them in one pass, which
            is fastest; a small number bounds the server's memory instead, and then
            each update after the first batch is checked on its own before its fold).
    """

    def __init__(self, max_buffered: Optional[int] = None) -> None:
        if max_buffered is not None and max_buffered < 1:
            raise ValueError(f"max_buffered must be None or >= 1, got {max_buffered}")
        self.max_buffered = max_buffered
        self._pending: List[Tuple[int, PackedTensors, float]] = []
        self._sums: Optional[Dict[torch.dtype, torch.Tensor]] = None
        self._template: Optional[PackedTensors] = None
        self._folded_weight = 0.0  # of the updates the sums hold
        #: ``{order_key: reason}``: the states left out of the mean being built, or of
        #: the last :meth:`result`.
        self.rejected: Dict[int, str] = {}
        # Steady state: the previous result (still the global model) and the one being built.
        self._pool = BufferPool(max_buffers=4)

    def add(self, params: PackedTensors, weight: float, order_key: int = 0) -> None:
        """Add one state with a positive ``weight``; its layout must match the first's.

        Buffered states are summed in ``order_key`` order, not arrival order, so that the
        float result does not depend on which client answered first (bit-reproducible
        runs). With ``max_buffered`` set, states folded in different batches still are.
        ``order_key`` also names the state in :attr:`rejected`.
        """
        if not weight > 0:
            raise ValueError(f"weight must be positive, got {weight}")
        if self._template is None:
            self._template = params
            self.rejected = {}
        elif params.layout_key() != self._template.layout_key():
            raise ValueError(layout_mismatch(self._template, params))
        self._pending.append((order_key, params, float(weight)))
        if self.max_buffered is not None and len(self._pending) >= self.max_buffered:
            self._fold()

    def result(self, finish: Optional[BlockFinisher] = None) -> PackedTensors:
        """The weighted mean of the finite states added; resets the accumulator.

        ``finish(dtype, start, block)``, if given, is called on every block of the
        result while it is still in cache, in the pass that completes the mean (so a
        server optimizer costs no extra pass over memory): ``block`` holds the weighted
        mean of elements ``start..start+len(block)`` of that dtype's buffer (in the
        accumulator's dtype: float32 for 16-bit floats, float64 for integers and
        bools) and may be overwritten with the final values. It runs in worker threads
        on disjoint blocks, and may run more than once on a block (a pass that met NaN
        is redone without the culprits): it must write only there, and into memory of
        its own that only it writes, from inputs it does not change.

        Raises ValueError if no state was added or every one was rejected.
        """
        if self._template is None:
            raise ValueError("no update was added: nothing to average")
        if not self._fold(finish) and finish is not None and self._sums is not None:
            self._fold_pending(finish)  # every update was folded already: a finishing pass alone
        template, sums = self._template, self._sums
        self._pending, self._sums, self._template, self._folded_weight = [], None, None, 0.0
        if sums is None:
            raise ValueError(f"no valid update to average; rejected: {self.rejected}")
        return PackedTensors(template.specs, {dtype: from_accumulator(dtype, total) for dtype, total in sums.items()})

    def _fold(self, finish: Optional[BlockFinisher] = None) -> bool:
        """Fold the pending updates into the running mean, leaving out non-finite ones;
        True if a pass ran (and ``finish`` with it)."""
        if self._sums is not None:
            # The sums hold earlier batches already, which a pass could not be redone
            # without: check each update of this batch on its own first.
            self._reject({key: reason for key, params, _ in self._pending if (reason := non_finite_tensor(params))})
        passed = False
        while self._pending:
            culprits = self._fold_pending(finish)
            passed = True
            if not culprits:
                break
            # Only on a first fold (the batches after it were checked first), so the
            # sums hold nothing but this pass: start them again without the culprits.
            self._reject(culprits)
            self._sums = None
            passed = False
        self._pending = []
        return passed

    def _reject(self, reasons: Dict[int, str]) -> None:
        self.rejected.update({key: reasons[key] for key, _, _ in self._pending if key in reasons})
        self._pending = [entry for entry in self._pending if entry[0] not in reasons]

    def _fold_pending(self, finish: Optional[BlockFinisher] = None) -> Dict[int, str]:
        """One blocked pass of the pending updates into the running mean. Returns
        ``{key: reason}`` for the pending updates found holding NaN or Inf; the pass's
        result is then garbage and must be redone without them.

        The sums always hold the weighted mean of what they have taken in, never a
        weighted sum: a mean of finite values cannot overflow, and no pass is needed
        at the end to divide.
        """
        first_fold = self._sums is None
        if first_fold:
            self._sums = {}
            for dtype, group in self._template.groups.items():
                accumulator = _accumulator_dtype(dtype)
                self._sums[dtype] = self._pool.take(group.numel() * accumulator.itemsize).view(accumulator)
        total_weight = self._folded_weight + sum(weight for _, _, weight in self._pending)
        keep = None if first_fold else self._folded_weight / total_weight  # the old mean's share
        ordered = [(key, params, weight / total_weight) for key, params, weight in sorted(self._pending, key=lambda entry: entry[0])]
        workers = aggregation_threads()
        shards: List[Shard] = []
        for dtype, total in self._sums.items():
            sources = [(p.groups[dtype], w) for _, p, w in ordered]
            if total.dtype != dtype:  # small non-float32/64 groups: convert once
                sources = [(s.to(total.dtype), w) for s, w in sources]
            blocks = -(-total.numel() // BLOCK_ELEMENTS)
            per_worker = -(-blocks // workers)
            for first_block in range(0, blocks, per_worker):
                start = first_block * BLOCK_ELEMENTS
                end = min(total.numel(), (first_block + per_worker) * BLOCK_ELEMENTS)
                shards.append((dtype, total, sources, start, end))
        # Each thread folds a contiguous shard with single-threaded ops. (Hundreds of small
        # ops each split over all threads stall whenever one core is busy elsewhere: the
        # server shares its host with clients.)
        previous_threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            if workers == 1 or len(shards) == 1:
                non_finite_blocks = [_fold_range(*shard, keep, finish) for shard in shards]
            else:
                with ThreadPoolExecutor(workers) as pool:
                    non_finite_blocks = list(pool.map(lambda shard: _fold_range(*shard, keep, finish), shards))
        finally:
            torch.set_num_threads(previous_threads)
        culprits: Dict[int, str] = {}
        for (_, total, sources, _, _), blocks in zip(shards, non_finite_blocks):
            for start, length in blocks:
                found = [key for (key, _, _), (source, _) in zip(ordered, sources)
                         if not torch.isfinite(source.narrow(0, start, length)).all()]
                if not found:
                    raise ValueError(f"the weighted mean of finite {total.dtype} updates overflowed by rounding "
                                     f"(elements {start}..{start + length} of that dtype's buffer)")
                culprits.update({key: non_finite_tensor(params) for key, params, _ in ordered if key in found})
        if not culprits:
            self._folded_weight = total_weight
        return culprits


def _fold_range(dtype: torch.dtype, total: torch.Tensor, sources: List[Tuple[torch.Tensor, float]], start: int, end: int,
                keep: Optional[float], finish: Optional[BlockFinisher]) -> List[Tuple[int, int]]:
    """Set ``total[start:end]`` to ``keep`` times itself plus the weighted ``sources``
    (``keep`` None: to the weighted sources alone), one cache-sized block at a time,
    then ``finish`` each finite block (``dtype``: the group's own dtype).

    Returns ``(start, length)`` of the floating-point blocks that came out holding NaN
    or Inf: a weighted mean of finite values is finite, so those blocks are where some
    source is not.
    """
    check = total.dtype.is_floating_point
    non_finite = []
    for block_start in range(start, end, BLOCK_ELEMENTS):
        length = min(BLOCK_ELEMENTS, end - block_start)
        block = total.narrow(0, block_start, length)
        rest = sources
        if keep is None:
            torch.mul(sources[0][0].narrow(0, block_start, length), sources[0][1], out=block)
            rest = sources[1:]
        elif keep != 1.0:
            block.mul_(keep)
        for source, weight in rest:
            block.add_(source.narrow(0, block_start, length), alpha=weight)
        # NaN and Inf propagate into the block's sum (which may also overflow: then the
        # exact test decides).
        if check and not math.isfinite(block.sum()) and not torch.isfinite(block).all():
            non_finite.append((block_start, length))
        elif finish is not None:
            finish(dtype, block_start, block)
    return non_finite


class FedAvg(AggregationStrategy):
    """Federated averaging (McMahan et al., 2017): the new global model is the mean of
    the clients' states weighted by their sample numbers; updates holding NaN or Inf are
    left out (see :meth:`rejected_updates`).

    Args:
        max_buffered_updates: see :class:`WeightedMeanAccumulator` (``None``: fastest).
    """

    accepts_partial_sums = True

    def __init__(self, max_buffered_updates: Optional[int] = None) -> None:
        self._accumulator = WeightedMeanAccumulator(max_buffered_updates)
        self._partial_sums = PartialSumAccumulator()

    def add(self, update: ClientUpdate) -> None:
        if update.sample_number <= 0:
            raise ValueError(f"client {update.client_id} reported {update.sample_number} samples; expected a positive count")
        self._accumulator.add(update.params, update.sample_number, order_key=update.client_id)

    def add_partial_sum(self, sums: Dict[torch.dtype, torch.Tensor], weight: float, order_key: int) -> None:
        self._partial_sums.add(sums, weight, order_key)

    def aggregate(self, global_model: PackedTensors, round_idx: int = 0) -> PackedTensors:
        if self._partial_sums:
            return self._partial_sums.result(global_model)
        return self._accumulator.result()

    def rejected_updates(self) -> Dict[int, str]:
        return dict(self._accumulator.rejected)
