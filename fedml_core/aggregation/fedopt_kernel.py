"""FedOpt's server step (FedAdagrad, FedAdam, FedYogi) as one compiled loop.

In eager torch every op of the step streams the block once more: FedAdam's seven ops
cost 1.1-1.2 ns per element even with the block in cache, against 0.33 ns for this
loop, which reads each input and writes each output once (docs/BENCHMARKS.md). Numba,
the maintained JIT compiler for numeric Python, compiles it (cached on disk after the
first run); the loop releases the GIL, which the aggregation threads share.

This module imports numba, so it is imported only by a strategy that uses it.
"""
from __future__ import annotations

import numba
import numpy as np
import torch

from .fedopt import ADAGRAD, ADAM


def _compiled(function):
    """``function`` compiled, cached on disk where numba finds a writable place (beside
    this file, or the user's cache folder), else compiled afresh in each process."""
    try:
        return numba.njit(nogil=True, cache=True, error_model="numpy")(function)
    except RuntimeError:  # "no locator available": a read-only install and no writable home
        return numba.njit(nogil=True, error_model="numpy")(function)


@_compiled
def _fedopt_loop(rule, mean, x, m_old, v_old, m_new, v_new, m_share, v_share, server_lr, tau):
    for i in range(mean.shape[0]):
        delta = mean[i] - x[i]
        squared = delta * delta
        m = m_old[i] + (delta - m_old[i]) * m_share
        v = v_old[i]
        if rule == ADAGRAD:
            v = v + squared
        elif rule == ADAM:
            v = v + (squared - v) * v_share
        elif v > squared:  # YOGI: v - (1 - beta2) * delta^2 * sign(v - delta^2)
            v = v - v_share * squared
        elif v < squared:
            v = v + v_share * squared
        m_new[i] = m
        v_new[i] = v
        mean[i] = x[i] + server_lr * m / (np.sqrt(v) + tau)


def fedopt_step(rule: int, mean: torch.Tensor, x: torch.Tensor, m_old: torch.Tensor, v_old: torch.Tensor,
                m_new: torch.Tensor, v_new: torch.Tensor, beta1: float, beta2: float, server_lr: float, tau: float) -> None:
    """One step of :class:`~fedml_core.aggregation.fedopt.FedOpt` with second-moment
    ``rule`` on 1-D slices of one length: ``mean`` (the clients' mean, float32
    or float64) becomes the new model, ``m_new``/``v_new`` the new moments (of ``mean``'s
    dtype) from ``m_old``/``v_old``; ``x`` is the round's model (any float dtype: 16-bit
    ones are widened first). The constants are rounded to ``mean``'s dtype, so that the
    loop computes in it."""
    if x.dtype != mean.dtype:
        x = x.to(mean.dtype)
    scalar = np.dtype(str(mean.dtype).removeprefix("torch.")).type
    _fedopt_loop(rule, mean.numpy(), x.numpy(), m_old.numpy(), v_old.numpy(), m_new.numpy(), v_new.numpy(),
                 scalar(1 - beta1), scalar(1 - beta2), scalar(server_lr), scalar(tau))
