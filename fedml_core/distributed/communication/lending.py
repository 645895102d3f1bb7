"""Tensors lent between the processes of one host: memory a peer reads in place.

A rank that sends the same memory again and again (a client's packed model, after
every round of training) can keep it in a :class:`LendableSegment`: a sealed memfd,
mapped shared. The first time it sends from that memory to a peer it attaches an
offer (:meth:`LendableSegment.offer`): its pid, the file descriptor, the file's inode
and size, and the identity of its host and pid namespace. A peer in the same host and
pid namespace maps the file through ``/proc/<pid>/fd/<fd>`` (:func:`borrow`), which
the kernel allows only to a process that could ptrace the sender (the same user, who
could read and write the sender's memory anyway: lending gives a peer nothing it did
not have). From then on the sender's messages name offsets into the memory instead
of carrying the bytes, and the receiver reads them where they are.

The seals (the file can neither shrink nor grow) mean a mapping can never fault with
SIGBUS, even after the sender died: its pages live as long as some process maps them.
"""
from __future__ import annotations

import fcntl
import functools
import mmap
import os
import stat
from typing import Any, Dict, Iterable, List, Optional

import torch

_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW


class CannotBorrow(Exception):
    """A well-formed offer this process cannot take (another host, no permission, a
    file that is not what was offered): the sender goes on sending copies."""


@functools.lru_cache(maxsize=None)
def host_identity() -> Dict[str, Any]:
    """What two processes must share to map each other's memfds by pid: the running
    kernel (its boot id) and the pid namespace."""
    with open("/proc/sys/kernel/random/boot_id") as f:
        boot_id = f.read().strip()
    pid_namespace = os.stat("/proc/self/ns/pid")
    return {"boot_id": boot_id, "pid_namespace": [pid_namespace.st_dev, pid_namespace.st_ino]}


class LendableSegment:
    """``nbytes`` (> 0) bytes of shared memory that peers on this host may map.

    Attributes:
        memory: the whole segment as a 1-D uint8 CPU tensor (zeroed).
    """

    def __init__(self, nbytes: int) -> None:
        if nbytes <= 0:
            raise ValueError(f"a lendable segment needs a positive size, got {nbytes} bytes")
        # The descriptor stays open for the life of the process: it is how a peer finds the memory.
        self.fd = os.memfd_create("fedml-lendable", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(self.fd, nbytes)
        fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, _SEALS | fcntl.F_SEAL_SEAL)
        self.nbytes = nbytes
        self.inode = os.fstat(self.fd).st_ino
        self.memory = torch.frombuffer(mmap.mmap(self.fd, nbytes), dtype=torch.uint8)

    def offsets_of(self, buffers: Iterable[torch.Tensor]) -> Optional[List[int]]:
        """The byte offset of each contiguous CPU buffer in this segment; None unless
        every one lies wholly inside it."""
        base, offsets = self.memory.data_ptr(), []
        for buffer in buffers:
            start = buffer.data_ptr() - base
            if buffer.device.type != "cpu" or not buffer.is_contiguous() or \
                    not 0 <= start <= start + buffer.numel() * buffer.element_size() <= self.nbytes:
                return None
            offsets.append(start)
        return offsets

    def offer(self, segment_id: int) -> Dict[str, Any]:
        """What a peer needs to map this segment (plain JSON), under ``segment_id``."""
        return {"segment": segment_id, "pid": os.getpid(), "fd": self.fd, "inode": self.inode,
                "nbytes": self.nbytes, **host_identity()}


def borrow(offer: Dict[str, Any]) -> torch.Tensor:
    """Map the segment a peer offered; returns it as a 1-D uint8 tensor that keeps the
    mapping alive. Raises ValueError if ``offer`` is malformed, :class:`CannotBorrow`
    if it cannot be mapped here."""
    if not isinstance(offer, dict):
        raise ValueError(f"malformed memory offer {offer!r}")
    segment, pid, fd, inode, nbytes = (offer.get(key) for key in ("segment", "pid", "fd", "inode", "nbytes"))
    if not all(type(value) is int and value > 0 for value in (pid, inode, nbytes)) or \
            not all(type(value) is int and value >= 0 for value in (segment, fd)):
        raise ValueError(f"malformed memory offer {offer!r}")
    if {key: offer.get(key) for key in ("boot_id", "pid_namespace")} != host_identity():
        raise CannotBorrow("the peer runs on another host or in another pid namespace")
    try:
        file = os.open(f"/proc/{pid}/fd/{fd}", os.O_RDWR | os.O_CLOEXEC)
    except OSError as error:
        raise CannotBorrow(f"cannot open the peer's memory: {error}") from None
    try:
        info = os.fstat(file)
        if not stat.S_ISREG(info.st_mode) or info.st_ino != inode or info.st_size != nbytes:
            raise CannotBorrow("the peer's descriptor is not the memory it offered")
        try:
            seals = fcntl.fcntl(file, fcntl.F_GET_SEALS)
        except OSError:
            seals = 0
        if seals & _SEALS != _SEALS:
            raise CannotBorrow("the peer's memory is not sealed against resizing")
        return torch.frombuffer(mmap.mmap(file, nbytes), dtype=torch.uint8)
    finally:
        os.close(file)
