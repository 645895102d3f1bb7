"""Rank 1 sends rank 0 a mixed-dtype state from lendable memory three times, changing
it in between, and waits for rank 0's acknowledgement each time (so the memory is not
touched while rank 0 may read it). Rank 0 accepts lent tensors, or not (``accept`` or
``refuse``), checks every value bit-exactly and notes which messages it read in rank
1's memory. Then rank 1 sends a header naming lent tensors outside that memory; rank 0
must treat it as failed.

    mpirun -np 2 python tests/programs/lending.py OUT_DIR accept|refuse
"""
import json
import os
import sys

import torch
from mpi4py import MPI

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "../..")))
sys.path.insert(0, os.path.dirname(__file__))

from fedml_core.distributed.communication.message import Message, encode_header  # noqa: E402
from fedml_core.distributed.communication.mpi_transport import HEADER_TAG, MpiTransport  # noqa: E402
from fedml_core.distributed.communication.packed_tensors import PackedTensors  # noqa: E402
from fedml_core.distributed.communication.transport import PeerFailure  # noqa: E402
from wire_roundtrip import mixed_state  # noqa: E402

SENDS = 3


def state_of_send(index: int) -> dict:
    """What rank 1 sends the ``index``-th time: the mixed state with changed values."""
    return {k: (v + index if v.dtype.is_floating_point else v) for k, v in mixed_state().items()}


def bits(t: torch.Tensor) -> list:
    return t.contiguous().reshape(-1).view(torch.uint8).tolist() if t.numel() else []


if __name__ == "__main__":
    out_dir, mode = sys.argv[1], sys.argv[2]
    transport = MpiTransport()
    if transport.rank == 0:
        if mode == "accept":
            transport.accept_lent_tensors()
        report = {"exact": [], "read_in_place": []}
        for index in range(SENDS):
            before = transport.borrowed_messages
            message = transport.receive(timeout=60)
            expected = state_of_send(index)
            report["exact"].append(all(bits(message.tensors[k]) == bits(v) for k, v in expected.items()))
            report["read_in_place"].append(transport.borrowed_messages > before)
            transport.send(Message(2, 0, 1, {"done": index}))
        try:
            transport.receive(timeout=60)
            report["out_of_bounds"] = "accepted"
        except PeerFailure as failure:
            report["out_of_bounds"] = f"failed {sorted(failure.ranks)}"
        with open(os.path.join(out_dir, f"lending-{mode}.json"), "w") as f:
            json.dump(report, f)
    else:
        shape = state_of_send(0)
        memory = PackedTensors.from_tensors(shape, allocate=transport.allocate_lendable)
        for index in range(SENDS):
            for name, value in state_of_send(index).items():
                memory.tensors()[name].copy_(value)
            message = Message(1, 1, 0)
            message.set_packed(memory)
            transport.send(message)
            assert transport.receive(timeout=60).params == {"done": index}
        # A header that names lent tensors far outside the memory rank 1 offered.
        header = {"type": 1, "sender": 1, "receiver": 0, "params": {}, "by_dtype": True, "layout": 0,
                  "lent": {"segment": 0, "offsets": [1 << 40] * len(memory.groups)}}
        transport.comm.Send([encode_header(header), MPI.BYTE], 0, HEADER_TAG)
