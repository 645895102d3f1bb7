"""DP-FedAvg: client-level differential privacy (McMahan et al., 2018, "Learning
Differentially Private Recurrent Language Models"), with the privacy spent computed by
Google's ``dp_accounting`` RDP accountant."""
from __future__ import annotations

from typing import Any, Dict, List, Mapping

import torch

from ..distributed.communication.packed_tensors import PackedTensors
from .norm_clipping import NormClipping
from .strategy import ClientUpdate

# Integer Renyi orders: the accountant computes them exactly (fractional ones may not converge).
RDP_ORDERS = list(range(2, 257))


def dp_epsilon(noise_multiplier: float, sampling_rate: float, rounds: int, delta: float) -> float:
    """Epsilon at ``delta`` after ``rounds`` Gaussian releases of noise multiplier
    ``noise_multiplier``, each over clients sampled at rate ``sampling_rate`` (accounted
    as Poisson sampling, as in McMahan et al.), by ``dp_accounting``'s RDP accountant."""
    import dp_accounting  # here: it loads scipy, which a run without DP need not wait for

    event = dp_accounting.GaussianDpEvent(noise_multiplier)
    if sampling_rate < 1:
        event = dp_accounting.PoissonSampledDpEvent(sampling_rate, event)
    accountant = dp_accounting.rdp.RdpAccountant(RDP_ORDERS)
    accountant.compose(dp_accounting.SelfComposedDpEvent(event, rounds))
    return float(accountant.get_epsilon(delta))


class DPFedAvg(NormClipping):
    """Each update ``delta_i = y_i - x`` (all floating-point tensors) is clipped to norm
    ``clip_norm`` = S; the server adds Gaussian noise to their sum::

        x <- x + server_lr * ( (1/K) * sum_i min(1, S / ||delta_i||) * delta_i
                               + N(0, (noise_multiplier * S / K)^2 I) )

    with K = WORKER_NUM, the expected number of clients per round (unweighted: a
    client's contribution is bounded by S whatever its sample number). Integer and
    boolean buffers are not released: they keep the global model's values. The noise is
    drawn from generators seeded by (seed, round, position), so a resumed run draws the
    same. Each round's record holds ``dp``: epsilon at ``delta`` so far, by the RDP
    accountant, with sampling rate K / CLIENT_NUM.

    Args:
        clip_norm: S, the clipping norm (in the model's units).
        noise_multiplier: z, the noise's standard deviation in units of S / K.
        delta: the delta at which epsilon is reported.
        server_lr: eta, the server step (1: the noised mean).
    """

    name = "DPFedAvg"

    def __init__(self, clip_norm: float = 1.0, noise_multiplier: float = 1.0, delta: float = 1e-5, server_lr: float = 1.0) -> None:
        if not noise_multiplier >= 0 or not 0 < delta < 1 or not server_lr > 0:
            raise ValueError(f"DPFedAvg needs noise_multiplier >= 0, 0 < delta < 1 and server_lr > 0, "
                             f"got {noise_multiplier}, {delta}, {server_lr}")
        super().__init__(clip_norm)
        self.noise_multiplier, self.delta, self.server_lr = noise_multiplier, delta, server_lr
        self.rounds = 0

    def base_weight(self, update: ClientUpdate) -> float:
        return 1.0

    def rate(self, used: List[tuple]) -> float:
        return self.server_lr * sum(s for _, s in used) / self.federation.clients_per_round

    def finish_block(self, dtype: torch.dtype, start: int, block: torch.Tensor) -> None:
        if not dtype.is_floating_point:
            block.copy_(self._x.groups[dtype].narrow(0, start, block.numel()))
            return
        super().finish_block(dtype, start, block)
        if self.noise_multiplier > 0:
            seed = ((self.federation.seed * 1_000_003 + self.round_idx) * 1_000_003 + start) * 16 + list(self._x.groups).index(dtype)
            noise = torch.randn(block.numel(), generator=torch.Generator().manual_seed(seed % (1 << 63)), dtype=block.dtype)
            block.add_(noise, alpha=self.server_lr * self.noise_multiplier * self.clip_norm / self.federation.clients_per_round)

    def aggregate(self, global_model: PackedTensors, round_idx: int = 0) -> PackedTensors:
        result = super().aggregate(global_model, round_idx)
        self.rounds += 1
        self._last["dp"] = {"epsilon": self.epsilon(), "delta": self.delta, "noise_multiplier": self.noise_multiplier,
                            "clip_norm": self.clip_norm, "rounds": self.rounds}
        return result

    def epsilon(self) -> float:
        """Epsilon at :attr:`delta` spent by the rounds aggregated so far (inf without noise)."""
        if self.noise_multiplier == 0:
            return float("inf")
        rate = self.federation.clients_per_round / self.federation.num_clients
        return dp_epsilon(self.noise_multiplier, rate, self.rounds, self.delta)

    def state_dict(self) -> Dict[str, Any]:
        return {"rounds": self.rounds}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.rounds = int(state["rounds"])

