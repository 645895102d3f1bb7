"""Rank 1 sends bytes that are not a message header (e.g. a pickle); rank 0 must treat
rank 1 as failed and still receive rank 2's valid message.

    mpirun -np 3 python tests/programs/malformed_header.py OUT_FILE
"""
import os
import pickle
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "../..")))

from mpi4py import MPI  # noqa: E402

from fedml_core.distributed.communication.message import Message  # noqa: E402
from fedml_core.distributed.communication.mpi_transport import HEADER_TAG, MpiTransport  # noqa: E402
from fedml_core.distributed.communication.transport import PeerFailure  # noqa: E402

if __name__ == "__main__":
    transport = MpiTransport()
    if transport.rank == 1:
        transport.comm.Send([pickle.dumps({"type": 1, "__reduce__": "os.system"}), MPI.BYTE], 0, HEADER_TAG)
    elif transport.rank == 2:
        transport.send(Message(7, 2, 0, {"ok": True}))
    else:
        outcomes = []
        for _ in range(2):
            try:
                message = transport.receive(timeout=60)
                outcomes.append(f"message {message.msg_type} from {message.sender_id}")
            except PeerFailure as failure:
                outcomes.append(f"failed {sorted(failure.ranks)}")
        with open(sys.argv[1], "w") as f:
            f.write("\n".join(sorted(outcomes)))
