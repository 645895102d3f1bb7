"""Learning-rate schedules over federated rounds, shared by the experiments' trainers."""
from __future__ import annotations

import math

#: Values accepted for ``args.lr_schedule``.
LR_SCHEDULES = ("constant", "cosine")


def learning_rate_for_round(
    base_lr: float, schedule: str, round_idx: int, num_rounds: int
) -> float:
    """Learning rate of federated round ``round_idx`` (0-based) out of ``num_rounds``.

    ``"constant"`` keeps ``base_lr``; ``"cosine"`` decays it as
    ``base_lr * (1 + cos(pi * round_idx / num_rounds)) / 2``, from ``base_lr`` in round 0
    to just above zero in the last round. The rate is fixed within a round's local epochs.
    """
    if schedule == "constant":
        return base_lr
    if schedule == "cosine":
        if not 0 <= round_idx < num_rounds:
            raise ValueError(f"round_idx must be in [0, {num_rounds}), got {round_idx}")
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * round_idx / num_rounds))
    raise ValueError(f"unknown lr_schedule {schedule!r}; expected one of {', '.join(LR_SCHEDULES)}")
