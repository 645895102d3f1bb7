"""Per-process setup shared by every experiment's main_fedavg.py."""
from __future__ import annotations

import ctypes
import logging
import os
import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA). numpy takes the seed modulo 2**32."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


#: glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
#: Allocations up to this size come from the heap (glibc's largest allowed value on 64-bit).
MMAP_THRESHOLD_BYTES = 32 << 20
#: Free memory at the top of the heap up to this size stays mapped for reuse.
TRIM_THRESHOLD_BYTES = 256 << 20
#: Each setting: (mallopt parameter, value, the environment variable and the
#: GLIBC_TUNABLES name by which a user sets it instead).
_MALLOC_SETTINGS = (
    (_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES, "MALLOC_MMAP_THRESHOLD_", "glibc.malloc.mmap_threshold"),
    (_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES, "MALLOC_TRIM_THRESHOLD_", "glibc.malloc.trim_threshold"),
)


def keep_freed_memory_for_reuse() -> bool:
    """Make glibc's malloc reuse freed memory instead of handing it back to the kernel.

    Training frees and reallocates every batch's activations (hundreds of KiB to MiB
    each). With glibc's defaults such blocks are mapped afresh and unmapped when freed,
    so every batch pays page faults and the zeroing of new pages: in a worker training
    clients of the template CNN under mpirun the kernel's share was about 40% of the
    process's CPU and a round took twice the same training in a plain process, which
    gains from the setting too, less (docs/BENCHMARKS.md).
    A threshold the user set (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``, or
    its ``GLIBC_TUNABLES`` name) is left as set. Returns whether a setting was applied
    (False where the C library is not glibc).
    """
    libc = ctypes.CDLL(None)  # this process's own symbols, the C library's among them
    if not hasattr(libc, "mallopt") or not hasattr(libc, "gnu_get_libc_version"):  # not glibc
        return False
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    applied = False
    for parameter, value, variable, tunable in _MALLOC_SETTINGS:
        if variable not in os.environ and tunable not in tunables:
            applied = bool(libc.mallopt(parameter, value)) or applied
    return applied


def init_training_device(process_id: int, comm) -> torch.device:
    """Pick this process's device, limit its CPU threads and tune its allocator.

    Processes on one host share its cores and GPUs: the local rank (this process's
    index among the job's processes on the same host) picks ``cuda:<local_rank %
    gpu_count>`` when CUDA is available, else the CPU; torch's intra-op threads are
    set to ``cores // processes_on_this_host`` (at least 1) so ranks do not thrash.

    Freed memory is kept for reuse (:func:`keep_freed_memory_for_reuse`).

    ``comm`` is the job's MPI communicator; every process must call this (collective).
    """
    from mpi4py import MPI

    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    local_rank, local_size = local.Get_rank(), local.Get_size()
    local.Free()
    cores = len(os.sched_getaffinity(0))
    torch.set_num_threads(max(1, cores // local_size))
    keep_freed_memory_for_reuse()
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
    else:
        device = torch.device("cpu")
    logging.info("process %d: local rank %d of %d on this host, %d torch threads, device %s",
                 process_id, local_rank, local_size, torch.get_num_threads(), device)
    return device
