"""Rank 0 sends a mixed-dtype state to rank 1, which echoes it back twice: once as it
arrived (packed per dtype) and once as separate tensors. Then rank 0 sends it again,
and rank 1, which has asked for that layout to arrive in a buffer of its own
(``receive_into``), replies with views of that buffer. Rank 0 saves what came back.

    mpirun -np 2 python tests/programs/wire_roundtrip.py OUT_DIR
"""
import os
import sys

import torch

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "../..")))

from fedml_core.distributed.communication.message import Message  # noqa: E402
from fedml_core.distributed.communication.mpi_transport import MpiTransport  # noqa: E402
from fedml_core.distributed.communication.packed_tensors import PackedTensors  # noqa: E402


def mixed_state() -> dict:
    g = torch.Generator().manual_seed(0)
    return {
        "conv.weight": torch.randn(4, 3, 3, 3, generator=g),
        "half": torch.randn(5, generator=g).half(),
        "bf16": torch.randn(7, generator=g).bfloat16(),
        "double": torch.randn(2, 2, generator=g).double(),
        "bn.num_batches_tracked": torch.tensor(123456789012, dtype=torch.int64),
        "int32": torch.tensor([-5, 7, 2**31 - 1], dtype=torch.int32),
        "uint8": torch.tensor([0, 255, 17], dtype=torch.uint8),
        "mask": torch.tensor([True, False, True]),
        "empty": torch.empty(0, 3),
        "scalar": torch.tensor(3.25),
        "transposed": torch.randn(3, 5, generator=g).t(),  # non-contiguous
        "special": torch.tensor([float("nan"), float("inf"), -0.0, 1e-45]),
    }


if __name__ == "__main__":
    transport = MpiTransport()
    if transport.rank == 0:
        transport.send(Message(1, 0, 1, {"note": "hello"}, mixed_state()))
        echoed_packed = transport.receive(timeout=60)
        echoed_separate = transport.receive(timeout=60)
        transport.send(Message(4, 0, 1, {}, mixed_state()))
        echoed_views = transport.receive(timeout=60)
        # Received tensors are views into one shared receive buffer: clone to save them.
        torch.save({"packed": {k: v.clone() for k, v in echoed_packed.tensors.items()},
                    "separate": {k: v.clone() for k, v in echoed_separate.tensors.items()},
                    "views": {k: v.clone() for k, v in echoed_views.tensors.items()},
                    "params": echoed_packed.params, "target_params": echoed_views.params}, os.path.join(sys.argv[1], "echo.pt"))
    else:
        received = transport.receive(timeout=60)
        packed_reply = Message(2, 1, 0, received.params)
        packed_reply.set_packed(received.packed)
        transport.send(packed_reply)
        transport.send(Message(3, 1, 0, received.params, {k: v.clone() for k, v in received.tensors.items()}))
        target = PackedTensors.from_tensors({k: torch.zeros_like(v) for k, v in received.tensors.items()})
        transport.receive_into(target)
        again = transport.receive(timeout=60)
        # Views of the target tile its buffers: they go back as one buffer per dtype.
        transport.send(Message(5, 1, 0, {"landed_in_target": again.packed is target}, target.tensors()))
