"""The extra tensors of an algorithm, as messages of their own (see message_define.py).

Their names travel prefixed, so that no set of extra tensors can have the model's
layout: a client receives every message of the model's layout straight into its model.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping

import torch

from fedml_core.distributed.communication.message import Message
from fedml_core.distributed.communication.packed_tensors import PackedTensors

from .message_define import MyMessage

PREFIX = "extra:"


def tensors_message(msg_type: int, sender: int, receiver: int, round_idx: int, tensors: Mapping[str, torch.Tensor]) -> Message:
    """A message carrying ``tensors`` for round ``round_idx``."""
    message = Message(msg_type, sender, receiver, tensors={PREFIX + name: t for name, t in tensors.items()})
    message.add_params(MyMessage.MSG_ARG_KEY_ROUND_INDEX, round_idx)
    return message


def received_tensors(message: Message) -> PackedTensors:
    """The tensors of a message from :func:`tensors_message`, under their own names
    (views of the received memory). Raises ValueError for a name without the prefix."""
    packed = message.packed if message.packed is not None else PackedTensors.from_tensors(message.tensors)
    if not all(spec.name.startswith(PREFIX) for spec in packed.specs):
        raise ValueError(f"extra tensors must be named {PREFIX}<name>, got {[s.name for s in packed.specs][:5]}")
    specs = [dataclasses.replace(spec, name=spec.name[len(PREFIX):]) for spec in packed.specs]
    return PackedTensors(specs, packed.groups)
