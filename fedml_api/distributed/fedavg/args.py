"""The federation's command-line arguments (the model adds its own after these)."""
from __future__ import annotations

import argparse
import os
import time


def add_federation_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the arguments every FedAvg experiment shares; returns ``parser``."""
    group = parser.add_argument_group("federation")
    group.add_argument("--client_num_in_total", type=int, required=True, help="CLIENT_NUM: number of clients (processes 1..CLIENT_NUM)")
    group.add_argument("--client_num_per_round", type=int, required=True, help="WORKER_NUM: clients sampled to train each round")
    group.add_argument("--comm_round", type=int, required=True, help="ROUND: number of federated rounds")
    group.add_argument("--frequency_of_the_test", type=int, default=1, help="test every N rounds (and always after the last)")
    group.add_argument("--data_path", type=str, required=True, help="client p reads <data_path>/<p>/train and <data_path>/<p>/test")
    group.add_argument("--run_dir", type=str, default=None, help="where the log, metrics, summary, plot and final model go (default: ./runs/<time>)")
    group.add_argument("--seed", type=int, default=0, help="seeds python/numpy/torch and the client sampling")
    group.add_argument("--wandb_mode", choices=["auto", "online", "offline", "disabled"], default="auto",
                       help="auto: online when logged in to wandb, else offline; never prompts")
    group.add_argument("--max_buffered_updates", type=int, default=None,
                       help="fold client updates into the average every N arrivals to bound server memory (default: all at once, fastest)")
    return parser


def check_federation_args(args: argparse.Namespace) -> None:
    """Raise ValueError naming the first inconsistent federation argument."""
    for name in ("client_num_in_total", "client_num_per_round", "comm_round", "frequency_of_the_test"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be a positive integer, got {getattr(args, name)}")
    if args.client_num_per_round > args.client_num_in_total:
        raise ValueError(
            f"WORKER_NUM (--client_num_per_round={args.client_num_per_round}) cannot exceed "
            f"CLIENT_NUM (--client_num_in_total={args.client_num_in_total})"
        )
    if args.max_buffered_updates is not None and args.max_buffered_updates < 1:
        raise ValueError(f"--max_buffered_updates must be at least 1, got {args.max_buffered_updates}")


def default_run_dir(experiment: str) -> str:
    return os.path.join("runs", f"{experiment}-{time.strftime('%Y%m%d-%H%M%S')}")
