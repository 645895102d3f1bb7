"""Checks on client updates: the layout before one is accepted, finiteness while it is
aggregated (see :class:`~fedml_core.aggregation.fedavg.WeightedMeanAccumulator`)."""
from __future__ import annotations

import math
from typing import Optional

import torch

from ..distributed.communication.packed_tensors import PackedTensors


class InvalidUpdate(ValueError):
    """A client update that must not be aggregated; the message says what is wrong."""


def check_layout(reference: PackedTensors, update: PackedTensors) -> None:
    """Raise :class:`InvalidUpdate` unless ``update`` has exactly ``reference``'s tensors
    (names, order, dtypes, shapes)."""
    if update.layout_key() != reference.layout_key():
        raise InvalidUpdate(layout_mismatch(reference, update))


def non_finite_tensor(update: PackedTensors) -> Optional[str]:
    """None if every floating-point value of ``update`` is finite, else a message naming
    the first tensor that holds NaN or Inf.

    One read of each float buffer: its float32-or-wider sum, into which NaN and Inf
    propagate; only when that sum is not finite (NaN, Inf, or an overflow of finite
    values) is each value tested.
    """
    for dtype, group in update.groups.items():
        if not dtype.is_floating_point or math.isfinite(group.sum(dtype=torch.promote_types(dtype, torch.float32))):
            continue
        finite = torch.isfinite(group)
        if finite.all():  # finite values whose sum overflowed
            continue
        first_bad = int((~finite).nonzero()[0])
        spec = next(s for s in update.specs if s.dtype == dtype and s.offset <= first_bad < s.offset + s.numel)
        return f"tensor {spec.name!r} holds NaN or Inf values"
    return None


def layout_mismatch(expected: PackedTensors, got: PackedTensors) -> str:
    """Describe the first difference between two layouts (for error messages)."""
    want = {s.name: (s.dtype, s.shape) for s in expected.specs}
    have = {s.name: (s.dtype, s.shape) for s in got.specs}
    missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
    if missing or extra:
        return f"update has different keys: missing {missing[:5]}, unexpected {extra[:5]}"
    for name, (dtype, shape) in want.items():
        if have[name] != (dtype, shape):
            return f"update tensor {name!r} is {have[name][0]} {list(have[name][1])}, expected {dtype} {list(shape)}"
    return "update tensors are in a different order than the global model's"
