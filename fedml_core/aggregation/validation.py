"""Checks an incoming client update before it may touch the global model."""
from __future__ import annotations

import torch

from ..distributed.communication.packed_tensors import PackedTensors


class InvalidUpdate(ValueError):
    """A client update that must not be aggregated; the message says what is wrong."""


def check_update(reference: PackedTensors, update: PackedTensors) -> None:
    """Raise :class:`InvalidUpdate` unless ``update`` has exactly ``reference``'s tensors
    (names, order, dtypes, shapes) and only finite floating-point values.

    The finiteness test reads each float buffer once: a float64 sum of float32/16 values
    is finite exactly when every value is, since it cannot overflow.
    """
    if update.layout_key() != reference.layout_key():
        raise InvalidUpdate(layout_mismatch(reference, update))
    for dtype, group in update.groups.items():
        if not dtype.is_floating_point or torch.isfinite(group.sum(dtype=torch.float64)):
            continue
        finite = torch.isfinite(group)
        if finite.all():  # float64 values whose sum overflowed: fine
            continue
        first_bad = int((~finite).nonzero()[0])
        spec = next(s for s in update.specs if s.dtype == dtype and s.offset <= first_bad < s.offset + s.numel)
        raise InvalidUpdate(f"tensor {spec.name!r} holds NaN or Inf values")


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
