"""Model-poisoning attacks, for showing what the robust aggregators defend against.

A chosen client (``--attackers 2,5``) trains as usual, then replaces its update
``delta = y - x`` (``y``: its trained state, ``x``: the round's global model; every
floating-point tensor) before sending it:

* ``sign_flip``: ``-delta`` (it pushes the model back the way the data pulls it);
* ``scale``: ``attack_scale * delta`` (one client outweighs the others);
* ``gaussian``: ``N(0, attack_std^2)`` per element instead of ``delta``, drawn from a
  generator seeded by (seed, round, client).
"""
from __future__ import annotations

from typing import Dict, Optional

import torch

from .strategy import ClientAlgorithm, ClientReport, ClientRound

ATTACKS = ("sign_flip", "scale", "gaussian")


class ModelPoisoning(ClientAlgorithm):
    """Replaces this client's update as ``attack`` says (see the module docstring).

    Args:
        attack: one of :data:`ATTACKS`.
        attack_scale: the factor of ``scale`` (dimensionless).
        attack_std: the standard deviation of ``gaussian`` (in the model's units).
        seed: the run's seed.
    """

    def __init__(self, attack: str, attack_scale: float = 10.0, attack_std: float = 1.0, seed: int = 0) -> None:
        if attack not in ATTACKS:
            raise ValueError(f"unknown attack {attack!r}; expected one of {', '.join(ATTACKS)}")
        self.attack, self.attack_scale, self.attack_std, self.seed = attack, attack_scale, attack_std, seed
        self._global: Dict[str, torch.Tensor] = {}
        self._round: Optional[ClientRound] = None

    def before_train(self, model: torch.nn.Module, round_info: ClientRound) -> None:
        self._round = round_info
        self._global = {name: t.detach().to("cpu", copy=True) for name, t in model.state_dict().items() if t.is_floating_point()}

    def after_train(self, model: torch.nn.Module, state: Dict[str, torch.Tensor]) -> ClientReport:
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + self._round.round_idx) * 1_000_003 + self._round.client_id)
        with torch.no_grad():
            for name, x in self._global.items():
                y = state[name]
                x = x.to(y.device)
                if self.attack == "sign_flip":
                    y.copy_(2 * x - y)
                elif self.attack == "scale":
                    y.copy_(x + self.attack_scale * (y - x))
                else:
                    noise = torch.randn(y.shape, generator=generator, dtype=torch.float32) * self.attack_std
                    y.copy_(x + noise.to(y.device, y.dtype))
        return ClientReport()
