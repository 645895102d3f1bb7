"""The federation's command-line arguments (the model adds its own after these)."""
from __future__ import annotations

import argparse
import difflib
import math
import os
import sys
import time
from typing import Any, Dict, List, NoReturn, Optional, Sequence

# The project's root: an experiment's default data path is relative to it.
PROJECT_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, whose errors name the closest valid option for each unknown
    one on the command line (``--lrr``: did you mean ``--lr``?; ``--data-path``: did you
    mean ``--data_path``?), whatever the error: an unknown option may also be why a
    required one is missing."""

    def parse_args(self, args: Optional[Sequence[str]] = None, namespace: Optional[argparse.Namespace] = None) -> argparse.Namespace:
        self._command_line = list(sys.argv[1:] if args is None else args)
        parsed, unknown = self.parse_known_args(args, namespace)
        if unknown:
            self.error(f"unrecognized arguments: {' '.join(unknown)}")
        return parsed

    def error(self, message: str) -> NoReturn:
        hints = [hint for hint in map(self._closest_option, getattr(self, "_command_line", [])) if hint]
        super().error(message + (f" ({'; '.join(hints)})" if hints else ""))

    def _closest_option(self, arg: str) -> Optional[str]:
        """"NAME: did you mean OPTION?" for an unknown ``--NAME`` with a close valid option."""
        name = arg.split("=", 1)[0]
        options: List[str] = [o for action in self._actions for o in action.option_strings if o.startswith("--")]
        if not name.startswith("--") or any(o.startswith(name) for o in options):  # known, or an abbreviation
            return None
        # Hyphens for underscores is the commonest slip; then plain typos.
        spelled = "--" + name.lstrip("-").replace("-", "_")
        match = spelled if spelled in options else next(iter(difflib.get_close_matches(spelled, options, n=1, cutoff=0.6)), None)
        return f"{name}: did you mean {match}?" if match else None

from fedml_core.aggregation.registry import add_optimizer_args, make_strategy


def add_federation_args(parser: argparse.ArgumentParser, default_data_path: Optional[str] = None) -> argparse.ArgumentParser:
    """Add the arguments every FedAvg experiment shares; returns ``parser``.

    Args:
        parser: the main's parser; the model's own arguments go after these.
        default_data_path: where the clients' folders are when ``--data_path`` is not
            given (relative to the project root, e.g. ``"fedml_api/model/ResNet18/cifar10"``);
            None makes ``--data_path`` required.
    """
    group = parser.add_argument_group("federation")
    group.add_argument("--client_num_in_total", type=int, required=True, help="CLIENT_NUM: number of clients (processes 1..CLIENT_NUM)")
    group.add_argument("--client_num_per_round", type=int, required=True, help="WORKER_NUM: clients sampled to train each round")
    group.add_argument("--comm_round", type=int, required=True, help="ROUND: number of federated rounds")
    group.add_argument("--frequency_of_the_test", type=int, default=1, help="test every N rounds (and always after the last)")
    data_help = "client p reads <data_path>/<p>/train and <data_path>/<p>/test"
    if default_data_path is None:
        group.add_argument("--data_path", type=str, required=True, help=data_help)
    else:
        group.add_argument("--data_path", type=str, default=os.path.join(PROJECT_ROOT, default_data_path),
                           help=data_help + " (default: %(default)s)")
    group.add_argument("--run_dir", type=str, default=None, help="where the log, metrics, summary, plot and final model go (default: ./runs/<time>)")
    group.add_argument("--seed", type=int, default=0, help="seeds python/numpy/torch and the client sampling")
    group.add_argument("--wandb_mode", choices=["auto", "online", "offline", "disabled"], default="auto",
                       help="auto: online when logged in to wandb, else offline; never prompts")
    group.add_argument("--round_timeout", type=float, default=None,
                       help="seconds the server waits for a round's replies; clients that miss it are marked failed (default: wait forever)")
    group.add_argument("--startup_timeout", type=float, default=600,
                       help="seconds the server waits for the clients to start (load torch and their data) before round 1; late ones are marked failed")
    group.add_argument("--min_clients_per_round", type=float, default=None,
                       help="fewest usable updates a round needs, as a count or a fraction (0-1) of WORKER_NUM; fewer stops the run (default: 1)")
    group.add_argument("--checkpoint_every", type=int, default=1,
                       help="write the checkpoint every N rounds (and always after the last); 1: every round. "
                            "Larger N saves the time of writing the model when rounds are short, and loses up to N-1 rounds on a crash")
    group.add_argument("--resume", type=str, default=None,
                       help="continue from a checkpoint: a run directory or its checkpoint.pt")
    group.add_argument("--shared_memory", choices=["on", "off"], default="on",
                       help="on: a client on the server's host lends it the trained model in shared memory, which the server "
                            "aggregates in place instead of receiving a copy; off: every update is sent as a copy")
    group.add_argument("--max_buffered_updates", type=int, default=None,
                       help="fold client updates into the average every N arrivals to bound server memory (default: all at once, fastest)")
    group.add_argument("--worker_processes", type=int, default=None, metavar="P",
                       help="serve the CLIENT_NUM clients with P worker processes (P+1 processes in all), each training its "
                            "share of a round's clients one after another (default: one process per client)")
    group.add_argument("--test_clients", type=int, default=None, metavar="K",
                       help="test rounds evaluate a sample of K clients, drawn anew each test round from --seed and "
                            "the round (default: every client)")
    group.add_argument("--client_cache_mb", type=float, default=None,
                       help="with --worker_processes: memory each worker may keep client datasets in, least recently "
                            "used first out (default: no limit)")
    group.add_argument("--combine_per_host", choices=["on", "off"], default="on",
                       help="with --worker_processes and an algorithm that takes partial sums: on: the workers of a "
                            "host other than the server's add their partial sums together, and one sum per host "
                            "reaches the server (the same model, bit for bit); off: every worker sends its own")
    add_optimizer_args(parser)
    return parser


# FineFL's mains named their argument function add_args. Theirs also parsed; this one
# only adds the federation's options, so a main adds its own after it, then parses.
add_args = add_federation_args


def federation_defaults() -> Dict[str, Any]:
    """The default of every federation option that has one (``--data_path`` and the
    three positionals have none), by attribute name."""
    parser = add_federation_args(argparse.ArgumentParser(add_help=False))
    # argparse has no public way to list a parser's options.
    return {action.dest: action.default for action in parser._actions if not action.required}


def fill_federation_defaults(args: argparse.Namespace, worker_number: int) -> List[str]:
    """Give ``args`` every federation option it lacks, at its default; returns their names.

    A main that parses only its own arguments (as FineFL's ``add_args`` did) still
    runs: ``client_num_in_total`` is taken from the process count (``worker_number - 1``).
    Raises ValueError naming ``client_num_per_round`` or ``comm_round`` if missing
    (they have no default: the launcher passes them).
    """
    missing = {name: positional for name, positional in (("client_num_per_round", "WORKER_NUM"), ("comm_round", "ROUND"))
               if not hasattr(args, name)}
    if missing:
        raise ValueError(f"the arguments lack {' and '.join(missing)} ({' and '.join(missing.values())}, which have no "
                         f"default): add them to your parser, or add them all with "
                         f"fedml_api.distributed.fedavg.args.add_args(parser)")
    filled = []
    for name, default in {"client_num_in_total": worker_number - 1, **federation_defaults()}.items():
        if not hasattr(args, name):
            setattr(args, name, default)
            filled.append(name)
    return filled


def check_federation_args(args: argparse.Namespace) -> None:
    """Raise ValueError naming the first inconsistent federation argument."""
    for name in ("client_num_in_total", "client_num_per_round", "comm_round", "frequency_of_the_test", "checkpoint_every"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be a positive integer, got {getattr(args, name)}")
    if args.client_num_per_round > args.client_num_in_total:
        raise ValueError(
            f"WORKER_NUM (--client_num_per_round={args.client_num_per_round}) cannot exceed "
            f"CLIENT_NUM (--client_num_in_total={args.client_num_in_total})"
        )
    for name in ("round_timeout", "startup_timeout"):
        value = getattr(args, name)
        if value is not None and not value > 0:
            raise ValueError(f"--{name} must be a positive number of seconds, got {value}")
    if args.min_clients_per_round is not None:
        resolve_min_clients(args.min_clients_per_round, args.client_num_per_round)
        if args.min_clients_per_round > args.client_num_per_round:
            raise ValueError(f"--min_clients_per_round ({args.min_clients_per_round:g}) cannot exceed WORKER_NUM ({args.client_num_per_round})")
    if args.max_buffered_updates is not None and args.max_buffered_updates < 1:
        raise ValueError(f"--max_buffered_updates must be at least 1, got {args.max_buffered_updates}")
    make_strategy(args)  # an unknown name or a bad option value
    if args.worker_processes is not None and not 1 <= args.worker_processes <= args.client_num_in_total:
        raise ValueError(f"--worker_processes must be between 1 and CLIENT_NUM={args.client_num_in_total}, got {args.worker_processes}")
    if args.test_clients is not None and not 1 <= args.test_clients <= args.client_num_in_total:
        raise ValueError(f"--test_clients must be between 1 and CLIENT_NUM={args.client_num_in_total}, got {args.test_clients}")
    if args.client_cache_mb is not None and not args.client_cache_mb >= 0:
        raise ValueError(f"--client_cache_mb must be at least 0 (megabytes), got {args.client_cache_mb}")
    if bool(args.attack) != bool(args.attackers):
        raise ValueError("--attack and --attackers go together (e.g. --attack sign_flip --attackers 2,5)")
    if args.attackers and max(args.attackers) > args.client_num_in_total:
        raise ValueError(f"--attackers {args.attackers} names a client above CLIENT_NUM={args.client_num_in_total}")


def process_count(args: argparse.Namespace) -> int:
    """The processes a run takes: the server plus one per client, or plus
    ``--worker_processes``."""
    return (args.worker_processes or args.client_num_in_total) + 1


def default_run_dir(experiment: Optional[str] = None) -> str:
    """``runs/<experiment>-<time>``, under the working directory; the experiment's name
    defaults to the folder of the main script (e.g. ``fedResNet18``)."""
    if experiment is None:
        experiment = os.path.basename(os.path.dirname(os.path.abspath(sys.argv[0])))
    return os.path.join("runs", f"{experiment}-{time.strftime('%Y%m%d-%H%M%S')}")


def resolve_min_clients(value: Optional[float], per_round: int) -> int:
    """``--min_clients_per_round``: a count (>= 1), or a fraction (0 < f < 1) of WORKER_NUM
    rounded up; None means 1."""
    if value is None:
        return 1
    if 0 < value < 1:
        return max(1, math.ceil(value * per_round))
    if value >= 1 and float(value).is_integer():
        return int(value)
    raise ValueError(f"--min_clients_per_round must be a positive integer or a fraction in (0, 1), got {value}")
