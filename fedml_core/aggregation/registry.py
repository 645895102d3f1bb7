"""The algorithms ``--federated_optimizer NAME`` picks from, and their options.

Adding an algorithm: write its class (one file: the server strategy and, if it needs
one, its :class:`~fedml_core.aggregation.strategy.ClientAlgorithm`), then add one line
to :data:`REGISTRY` building it from the parsed arguments (and its option to
:func:`add_optimizer_args` if it needs a new one).
"""
from __future__ import annotations

import argparse
from typing import Any, Callable, Dict, List, Optional

from .attacks import ATTACKS, ModelPoisoning
from .dp_fedavg import DPFedAvg
from .fedadagrad import FedAdagrad
from .fedadam import FedAdam
from .fedavg import FedAvg
from .fedavgm import FedAvgM
from .fednova import FedNova
from .fedper import FedPer
from .fedprox import FedProx
from .fedyogi import FedYogi
from .krum import Krum, MultiKrum
from .median import FedMedian
from .norm_clipping import NormClipping
from .scaffold import SCAFFOLD
from .strategy import AggregationStrategy, ClientAlgorithm
from .trimmed_mean import FedTrimmedAvg


def _given(args: argparse.Namespace, *names: str) -> Dict[str, Any]:
    """The options among ``names`` set on the command line (the others keep the
    algorithm's own defaults)."""
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}


def _buffered(args: argparse.Namespace) -> Dict[str, Any]:
    return {"max_buffered_updates": getattr(args, "max_buffered_updates", None)}


#: name -> ``build(args)``.
REGISTRY: Dict[str, Callable[[argparse.Namespace], AggregationStrategy]] = {
    "FedAvg": lambda a: FedAvg(**_buffered(a)),
    "FedAvgM": lambda a: FedAvgM(**_given(a, "server_lr", "server_momentum"), **_buffered(a)),
    "FedProx": lambda a: FedProx(**_given(a, "mu"), **_buffered(a)),
    "FedAdagrad": lambda a: FedAdagrad(**_given(a, "server_lr", "beta1", "tau"), **_buffered(a)),
    "FedAdam": lambda a: FedAdam(**_given(a, "server_lr", "beta1", "beta2", "tau"), **_buffered(a)),
    "FedYogi": lambda a: FedYogi(**_given(a, "server_lr", "beta1", "beta2", "tau"), **_buffered(a)),
    "SCAFFOLD": lambda a: SCAFFOLD(**_given(a, "server_lr"), **_buffered(a)),
    "FedNova": lambda a: FedNova(**_buffered(a)),
    "FedPer": lambda a: FedPer(**_given(a, "personal_layers"), **_buffered(a)),
    "FedMedian": lambda a: FedMedian(),
    "FedTrimmedAvg": lambda a: FedTrimmedAvg(**_given(a, "trim_ratio")),
    "Krum": lambda a: Krum(**_given(a, "krum_f")),
    "MultiKrum": lambda a: MultiKrum(**_given(a, "krum_f", "krum_m")),
    "NormClipping": lambda a: NormClipping(**_given(a, "clip_norm"), **_buffered(a)),
    "DPFedAvg": lambda a: DPFedAvg(**_given(a, "clip_norm", "noise_multiplier", "server_lr"),
                                   **{"delta": value for value in _given(a, "dp_delta").values()}),
}


def make_strategy(args: argparse.Namespace) -> AggregationStrategy:
    """The strategy ``args.federated_optimizer`` names (default FedAvg), with its options."""
    name = getattr(args, "federated_optimizer", None) or "FedAvg"
    by_lower = {key.lower(): key for key in REGISTRY}
    if name.lower() not in by_lower:
        raise ValueError(f"unknown --federated_optimizer {name!r}; choose one of {', '.join(REGISTRY)}")
    return REGISTRY[by_lower[name.lower()]](args)


def client_algorithms(args: argparse.Namespace, strategy: AggregationStrategy, client_id: int) -> List[ClientAlgorithm]:
    """What client ``client_id`` runs around its training: the strategy's client part
    and, if it is one of ``args.attackers``, the ``args.attack``."""
    parts = [part for part in [strategy.client_algorithm(args)] if part is not None]
    attack: Optional[str] = getattr(args, "attack", None)
    if attack and client_id in (getattr(args, "attackers", None) or []):
        parts.append(ModelPoisoning(attack, **_given(args, "attack_scale", "attack_std"), seed=getattr(args, "seed", 0)))
    return parts


def client_list(text: str) -> List[int]:
    """``"2,5"`` -> ``[2, 5]`` (argparse type of ``--attackers``)."""
    try:
        ids = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated client ids such as 2,5, got {text!r}") from None
    if any(i < 1 for i in ids):
        raise argparse.ArgumentTypeError(f"client ids start at 1, got {text!r}")
    return ids


def add_optimizer_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``--federated_optimizer``, every algorithm's options and the attack options."""
    group = parser.add_argument_group("federated optimizer", "an option left unset takes the chosen algorithm's default")
    group.add_argument("--federated_optimizer", type=str, default="FedAvg", metavar="NAME",
                       help=f"the algorithm: {', '.join(REGISTRY)} (default FedAvg)")
    group.add_argument("--mu", type=float, default=None, help="FedProx: proximal coefficient mu (default 0.01)")
    group.add_argument("--server_lr", type=float, default=None,
                       help="server learning rate: FedAvgM 0.1, FedAdagrad/FedAdam 0.1, FedYogi 0.01, SCAFFOLD 1, DPFedAvg 1")
    group.add_argument("--server_momentum", type=float, default=None, help="FedAvgM: server momentum (default 0.9)")
    group.add_argument("--beta1", type=float, default=None, help="FedAdagrad/FedAdam/FedYogi: first-moment decay (default 0.9)")
    group.add_argument("--beta2", type=float, default=None, help="FedAdam/FedYogi: second-moment decay (default 0.99)")
    group.add_argument("--tau", type=float, default=None, help="FedAdagrad/FedAdam/FedYogi: adaptivity (default 1e-9; FedYogi 1e-3)")
    group.add_argument("--trim_ratio", type=float, default=None, help="FedTrimmedAvg: fraction trimmed at each end (default 0.1)")
    group.add_argument("--krum_f", type=int, default=None, help="Krum/MultiKrum: Byzantine clients tolerated (default 1)")
    group.add_argument("--krum_m", type=int, default=None, help="MultiKrum: updates averaged (default: valid updates - krum_f)")
    group.add_argument("--clip_norm", type=float, default=None, help="NormClipping/DPFedAvg: largest update norm (default 1.0)")
    group.add_argument("--noise_multiplier", type=float, default=None,
                       help="DPFedAvg: Gaussian noise std in units of clip_norm / WORKER_NUM (default 1.0)")
    group.add_argument("--dp_delta", type=float, default=None, help="DPFedAvg: delta of the reported epsilon (default 1e-5)")
    group.add_argument("--personal_layers", type=str, default=None, metavar="PREFIXES",
                       help="FedPer: the layers each client keeps, as comma-separated name prefixes (e.g. fc, or fc,layer4)")
    group.add_argument("--attack", choices=ATTACKS, default=None, help="make --attackers send a poisoned update (for testing defences)")
    group.add_argument("--attackers", type=client_list, default=None, metavar="IDS", help="the attacking clients, e.g. 2,5")
    group.add_argument("--attack_scale", type=float, default=None, help="scale attack: factor on the update (default 10)")
    group.add_argument("--attack_std", type=float, default=None, help="gaussian attack: noise std (default 1.0)")
    return parser
