"""A message: a small header of plain metadata plus named tensors.

The header (type, sender, receiver, plain params) travels as JSON — cheap, and safe to
read from a peer, unlike pickle, which would let a peer run code on the receiver; the
tensors are moved by the transport as raw contiguous buffers. Nothing above the
transport knows how the bytes travel.
"""
from __future__ import annotations

import json
from typing import Any, Dict, Mapping, MutableMapping, Optional

import torch

from .packed_tensors import PackedTensors

TensorDict = Dict[str, torch.Tensor]


def encode_header(header: Mapping[str, Any]) -> bytes:
    """JSON bytes of a header; raises TypeError naming the value that is not plain data."""
    try:
        return json.dumps(header, allow_nan=True, separators=(",", ":")).encode()
    except (TypeError, ValueError) as error:
        raise TypeError(f"message params must be plain JSON data (numbers, strings, lists, dicts): {error}") from None


def decode_header(raw: bytes) -> Dict[str, Any]:
    """Parse a peer's header; raises ValueError if it is not one."""
    header = json.loads(raw)
    if not isinstance(header, dict) or not {"type", "sender", "receiver", "params"} <= header.keys():
        raise ValueError("not a message header")
    return header


class Message:
    """One protocol message between two ranks.

    Args:
        msg_type: protocol-defined message type (see ``message_define.py`` of an algorithm).
        sender_id: rank (process id) of the sender.
        receiver_id: rank (process id) of the receiver.
        params: plain JSON metadata (numbers, strings, lists, dicts with string keys); keep it small.
        tensors: named tensors (e.g. a model ``state_dict``); any dtype, any shape.
    """

    __slots__ = ("msg_type", "sender_id", "receiver_id", "params", "_tensors", "packed")

    def __init__(
        self,
        msg_type: int,
        sender_id: int,
        receiver_id: int,
        params: Optional[Mapping[str, Any]] = None,
        tensors: Optional[Mapping[str, torch.Tensor]] = None,
    ) -> None:
        self.msg_type = int(msg_type)
        self.sender_id = int(sender_id)
        self.receiver_id = int(receiver_id)
        self.params: MutableMapping[str, Any] = dict(params or {})
        self._tensors: Optional[TensorDict] = dict(tensors or {})
        # When set, ``tensors`` are views into these flat per-dtype buffers (see set_packed).
        self.packed: Optional[PackedTensors] = None

    @property
    def tensors(self) -> TensorDict:
        """Name -> tensor. For a packed message, views made on first access (a model has
        hundreds; a message that is only forwarded or aggregated never needs them)."""
        if self._tensors is None:
            self._tensors = self.packed.tensors()
        return self._tensors

    @tensors.setter
    def tensors(self, tensors: TensorDict) -> None:
        self._tensors = dict(tensors)
        self.packed = None

    def set_packed(self, packed: PackedTensors) -> None:
        """Carry ``packed``'s tensors. The transport then moves one buffer per dtype, and a
        receiver gets them packed the same way whatever the sender used."""
        self.packed = packed
        self._tensors = None

    def add_params(self, key: str, value: Any) -> None:
        """Attach one piece of plain metadata (FedML's name for it)."""
        self.params[key] = value

    def get(self, key: str) -> Any:
        """Return a metadata value; raises KeyError naming the message type if absent."""
        try:
            return self.params[key]
        except KeyError:
            raise KeyError(f"message type {self.msg_type} from rank {self.sender_id} has no param {key!r}") from None

    def get_type(self) -> int:
        return self.msg_type

    def get_sender_id(self) -> int:
        return self.sender_id

    def get_receiver_id(self) -> int:
        return self.receiver_id

    def header(self) -> Dict[str, Any]:
        """Type, sender, receiver and params as one JSON-ready dict."""
        return {"type": self.msg_type, "sender": self.sender_id, "receiver": self.receiver_id, "params": dict(self.params)}

    def payload_bytes(self) -> int:
        """Bytes of tensor data this message carries."""
        if self.packed is not None:
            return self.packed.nbytes()
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def __repr__(self) -> str:
        return (
            f"Message(type={self.msg_type}, {self.sender_id}->{self.receiver_id}, "
            f"params={sorted(self.params)}, bytes={self.payload_bytes()})"
        )
