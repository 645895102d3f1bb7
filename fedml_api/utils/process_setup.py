"""Per-process setup shared by every experiment's main_fedavg.py."""
from __future__ import annotations

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


def init_training_device(process_id: int, comm) -> torch.device:
    """Pick this process's device and limit its CPU threads.

    Processes on one host share its cores and GPUs: the local rank (this process's
    index among the job's processes on the same host) picks ``cuda:<local_rank %
    gpu_count>`` when CUDA is available, else the CPU; torch's intra-op threads are
    set to ``cores // processes_on_this_host`` (at least 1) so ranks do not thrash.

    ``comm`` is the job's MPI communicator; every process must call this (collective).
    """
    from mpi4py import MPI

    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    local_rank, local_size = local.Get_rank(), local.Get_size()
    local.Free()
    cores = len(os.sched_getaffinity(0))
    torch.set_num_threads(max(1, cores // local_size))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
    else:
        device = torch.device("cpu")
    logging.info("process %d: local rank %d of %d on this host, %d torch threads, device %s",
                 process_id, local_rank, local_size, torch.get_num_threads(), device)
    return device
