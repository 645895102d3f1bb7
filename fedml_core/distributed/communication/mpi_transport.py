"""Message transport over MPI (mpi4py).

Wire format of one message from rank ``s`` to rank ``r``:

1. a small pickled header on ``HEADER_TAG``: type, sender, receiver, plain params and
   the tensors' ``(name, dtype, shape)`` list plus how the payload is cut;
2. the payload as raw bytes on ``DATA_TAG``: either one buffer per tensor (when the
   sender's tensors are separate, e.g. a live ``state_dict``) or one buffer per dtype
   (when the sender already holds them packed, e.g. an aggregated global model).

The receiver allocates a :class:`PackedTensors` from the header and receives the bytes
straight into it, so a model arrives as flat per-dtype buffers with no extra copy. MPI
keeps messages of one (source, tag) in order, so payloads always follow their header.

Waiting never spins a core for long: a wait spins for ``spin_seconds`` (20 ms by
default: echoes and large transfers land within it), then probes with an exponential
sleep back-off capped at ``max_poll_interval`` (1 ms by default), which bounds the
added latency while keeping an idle rank near 0% CPU.
"""
from __future__ import annotations

import pickle
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from mpi4py import MPI

from .message import Message
from .packed_tensors import BufferPool, PackedTensors, byte_view, dtype_from_name, dtype_name
from .transport import Transport, TransportTimeout

HEADER_TAG = 17
DATA_TAG = 18


class MpiTransport(Transport):
    """Point-to-point messages between the ranks of an MPI communicator.

    Args:
        comm: the communicator (``MPI.COMM_WORLD`` by default); its rank 0 is the server.
        max_poll_interval: longest sleep between two probes while idle, in seconds.
        spin_seconds: how long a wait polls without sleeping before it backs off.
    """

    def __init__(self, comm: Optional[MPI.Comm] = None, max_poll_interval: float = 1e-3, spin_seconds: float = 0.02) -> None:
        self.comm = comm if comm is not None else MPI.COMM_WORLD
        self.rank = self.comm.Get_rank()
        self.world_size = self.comm.Get_size()
        self.max_poll_interval = max_poll_interval
        self.spin_seconds = spin_seconds
        self.pool = BufferPool()

    # -- sending -----------------------------------------------------------------
    def send(self, message: Message, timeout: Optional[float] = None) -> None:
        dest = message.receiver_id
        packed = message.packed
        if packed is not None:
            entries = [(s.name, dtype_name(s.dtype), s.shape) for s in packed.specs]
            buffers = [byte_view(g) for g in packed.groups.values()]
        else:
            tensors = {k: _cpu_contiguous(t) for k, t in message.tensors.items()}
            entries = [(k, dtype_name(t.dtype), tuple(t.shape)) for k, t in tensors.items()]
            buffers = [byte_view(t) for t in tensors.values()]
        header = {
            "type": message.msg_type,
            "sender": message.sender_id,
            "receiver": dest,
            "params": dict(message.params),
            "tensors": entries,
            "by_dtype": packed is not None,
        }
        requests = [self.comm.Isend([pickle.dumps(header, protocol=pickle.HIGHEST_PROTOCOL), MPI.BYTE], dest, HEADER_TAG)]
        requests += [self.comm.Isend([b.numpy(), MPI.BYTE], dest, DATA_TAG) for b in buffers]
        self._wait(requests, timeout, f"sending message type {message.msg_type} to rank {dest}")

    # -- receiving ---------------------------------------------------------------
    def receive(self, timeout: Optional[float] = None) -> Optional[Message]:
        status = MPI.Status()
        if not self._poll(lambda: self.comm.Iprobe(MPI.ANY_SOURCE, HEADER_TAG, status), timeout):
            return None
        source = status.Get_source()
        raw = bytearray(status.Get_count(MPI.BYTE))
        self.comm.Recv([raw, MPI.BYTE], source, HEADER_TAG)
        header: Dict[str, Any] = pickle.loads(raw)
        packed = PackedTensors.empty_like_specs(
            [(n, dtype_from_name(d), tuple(s)) for n, d, s in header["tensors"]], allocate=self.pool.take
        )
        if header["by_dtype"]:
            targets: Sequence[torch.Tensor] = list(packed.groups.values())
        else:
            targets = [packed.view(spec) for spec in packed.specs]
        requests = [self.comm.Irecv([byte_view(t).numpy(), MPI.BYTE], source, DATA_TAG) for t in targets]
        # The payload is already on its way; a deadline only guards against a sender
        # that died mid-message.
        self._wait(requests, timeout, f"receiving the tensors of message type {header['type']} from rank {source}")
        message = Message(header["type"], header["sender"], header["receiver"], header["params"])
        message.set_packed(packed)
        return message

    # -- waiting without burning a core --------------------------------------------
    def _poll(self, ready: Callable[[], bool], timeout: Optional[float]) -> bool:
        """Call ``ready()`` until it is true; False if ``timeout`` seconds pass first.

        Spins for ``spin_seconds`` (replies and large transfers usually come within
        that, and a transfer only advances while we call into MPI), then sleeps with an
        exponential back-off capped at ``max_poll_interval``.
        """
        now = time.monotonic()
        deadline = None if timeout is None else now + timeout
        spin_until = now + self.spin_seconds
        delay = 1e-5
        while not ready():
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                return False
            if now >= spin_until:
                time.sleep(delay)
                delay = min(delay * 2, self.max_poll_interval)
        return True

    def _wait(self, requests: List[MPI.Request], timeout: Optional[float], what: str) -> None:
        """Complete ``requests``; raise TransportTimeout after ``timeout`` seconds."""
        if not self._poll(lambda: MPI.Request.Testall(requests), timeout):
            for request in requests:
                request.Cancel()
            raise TransportTimeout(f"timed out after {timeout} s {what}")


def _cpu_contiguous(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to("cpu").contiguous()
