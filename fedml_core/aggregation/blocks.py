"""What the averaging passes share: their block size, the dtype they sum each model
dtype in (and back), and the hook that finishes each block of a mean (a server
optimizer's step)."""
from __future__ import annotations

from typing import Callable

import torch

# 512 Ki elements: a 2 MiB float32 accumulator block, which stays in cache (L2 or L3)
# while every source's block is added to it; larger blocks mean fewer Python-level ops.
BLOCK_ELEMENTS = 1 << 19

#: ``finish(dtype, start, block)``: see :meth:`~fedml_core.aggregation.fedavg.WeightedMeanAccumulator.result`.
BlockFinisher = Callable[[torch.dtype, int, torch.Tensor], None]


def _accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    if dtype in (torch.float32, torch.float64):
        return dtype
    if dtype.is_floating_point:  # float16 / bfloat16: sum in float32, cast back at the end
        return torch.float32
    return torch.float64  # integers and bools


def from_accumulator(dtype: torch.dtype, mean: torch.Tensor) -> torch.Tensor:
    """A mean computed in ``_accumulator_dtype(dtype)`` as a ``dtype`` tensor: integers
    rounded to the nearest, booleans by majority (may reuse ``mean``'s memory)."""
    if dtype == torch.bool:
        return mean >= 0.5
    if not dtype.is_floating_point:
        return mean.round_().to(dtype)
    return mean if mean.dtype == dtype else mean.to(dtype)
