"""One FedAvg round (5 clients, ResNet18 width 64, no training) against raw MPI.

    .venv/bin/python benchmarks/bench_round.py [--rounds 8] [--blocks 4]

The script re-executes itself under ``mpirun -np 6`` (the ``mpirun`` next to
``sys.executable``): rank 0 is the server, ranks 1..5 the clients, each rank limited to
the torch threads ``init_training_device`` gives it, as in a real run.

Framework: ``FedML_FedAvg_distributed`` with the real FedAVGServerManager and
FedAVGClientManager over MpiTransport, 5 clients all sampled every round, and a
ModelTrainer whose ``train()`` does nothing and ``test()`` returns ``{}``. A round is
thus what the framework itself costs: the server sends the 44.7 MB global model to
each client, each client loads it into its model and sends back its ``state_dict()``,
and the server aggregates the five. Round times are the server's own records
(``round_seconds`` in ``metrics.jsonl``: from the first send to the end of
aggregation). Excluded: each run's first round (fresh receive buffers) and its last
(which always adds a test phase; ``frequency_of_the_test`` is set too large for any
other).

Raw MPI: the same bytes in the same pattern with mpi4py and nothing else: the server
pre-posts a receive per client, ``Send``s one flat preallocated buffer of the model's
byte size to each of the 5 clients in turn, each client ``Recv``s it and ``Send``s its
own buffer back, and the server waits for all five. A barrier precedes each repetition.

The two alternate in ``--blocks`` blocks (a framework run of ``--rounds`` rounds, then
as many raw repetitions after one untimed one), so machine noise hits both alike.

The last line is ``round_overhead_ratio=<median round time / median raw time>``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from argparse import Namespace
from typing import Any, Dict, List

CHILD_ENV = "FEDML_BENCH_MPI_CHILD"
NUM_CLIENTS = 5
RAW_TAG = 99

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))


def relaunch_under_mpirun(num_ranks: int) -> int:
    """Run this script on ``num_ranks`` local ranks; returns mpirun's exit status."""
    mpirun = os.path.join(os.path.dirname(sys.executable), "mpirun")
    command = [mpirun, "-np", str(num_ranks), "--oversubscribe", "--bind-to", "none"]
    if os.geteuid() == 0:
        command.append("--allow-run-as-root")
    command += ["-x", CHILD_ENV, sys.executable, os.path.abspath(__file__), *sys.argv[1:]]
    return subprocess.call(command, env={**os.environ, CHILD_ENV: "1"})


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8, help="rounds per framework run (the first and last are not timed)")
    parser.add_argument("--blocks", type=int, default=4, help="framework runs, each followed by as many raw repetitions")
    args = parser.parse_args()
    if args.rounds < 3:
        parser.error("--rounds must be at least 3: the first and last rounds of a run are not timed")
    return args


def run_benchmark(args: argparse.Namespace) -> None:
    import numpy as np
    import torch
    from mpi4py import MPI

    from fedml_api.distributed.fedavg.FedAvgAPI import FedML_FedAvg_distributed
    from fedml_api.model.ResNet18.resnet import ResNet18
    from fedml_api.utils.process_setup import init_training_device, seed_everything
    from fedml_core.trainer.model_trainer import ModelTrainer
    from fedml_core.trainer.result_aggregator import WeightedMeanResultAggregator

    class NoTraining(ModelTrainer):
        """Hands the model back untouched: a round then costs only the framework."""

        def get_local_sample_number(self, train_path: str) -> int:
            return 1000

        def train(self, device: torch.device, args: Namespace, train_path: str) -> None:
            pass

        def test(self, device: torch.device, args: Namespace, test_path: str) -> Dict[str, Any]:
            return {}

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    seed_everything(0)
    device = init_training_device(rank, comm)
    model = ResNet18(num_classes=10, in_channels=3, width=64)
    nbytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    work_dir = tempfile.mkdtemp(prefix="bench_round-") if rank == 0 else ""

    raw_out = np.ones(-(-nbytes // 4), dtype=np.float32)
    raw_in = [np.ones_like(raw_out) for _ in range(NUM_CLIENTS if rank == 0 else 1)]

    def raw_round() -> None:
        if rank == 0:
            replies = [comm.Irecv([raw_in[c - 1], MPI.FLOAT], c, RAW_TAG) for c in range(1, size)]
            for client in range(1, size):
                comm.Send([raw_out, MPI.FLOAT], client, RAW_TAG)
            MPI.Request.Waitall(replies)
        else:
            comm.Recv([raw_in[0], MPI.FLOAT], 0, RAW_TAG)
            comm.Send([raw_out, MPI.FLOAT], 0, RAW_TAG)

    round_records: List[Dict[str, Any]] = []
    raw_times: List[float] = []
    for block in range(args.blocks):
        run_args = Namespace(
            client_num_in_total=NUM_CLIENTS, client_num_per_round=NUM_CLIENTS, comm_round=args.rounds,
            frequency_of_the_test=10**9, seed=0, data_path=os.devnull, max_buffered_updates=None,
            run_dir=os.path.join(work_dir, f"block{block}"), wandb_mode="disabled",
        )
        comm.Barrier()
        FedML_FedAvg_distributed(rank, size, device, comm, model, run_args, os.devnull, os.devnull,
                                 WeightedMeanResultAggregator(), NoTraining(model, run_args))
        if rank == 0:
            with open(os.path.join(run_args.run_dir, "metrics.jsonl"), encoding="utf-8") as f:
                round_records += [json.loads(line) for line in f][1:-1]
        for rep in range(1 + args.rounds - 2):
            comm.Barrier()
            start = time.perf_counter()
            raw_round()
            if rank == 0 and rep > 0:
                raw_times.append(time.perf_counter() - start)

    if rank == 0:
        shutil.rmtree(work_dir)
        report(round_records, raw_times, nbytes, torch.get_num_threads())


def report(records: List[Dict[str, Any]], raw_times: List[float], nbytes: int, threads: int) -> None:
    def row(name: str, values: List[float]) -> str:
        return f"{name:44s} {len(values):5d} {statistics.median(values) * 1e3:10.2f} {min(values) * 1e3:10.2f} {statistics.mean(values) * 1e3:10.2f}"

    rounds = [r["round_seconds"] for r in records]
    print(f"One FedAvg round, {NUM_CLIENTS} clients, ResNet18(width=64) = {nbytes:,} bytes per message, "
          f"{2 * NUM_CLIENTS} messages ({2 * NUM_CLIENTS * nbytes / 1e6:.0f} MB) per round; "
          f"{NUM_CLIENTS + 1} ranks, {threads} torch thread(s) each")
    print(f"{'':44s} {'n':>5s} {'median ms':>10s} {'min ms':>10s} {'mean ms':>10s}")
    print(row("framework round (server's round_seconds)", rounds))
    print(row("  of which communication (server's record)", [r["communication_seconds"] for r in records]))
    print(row("  of which aggregation (server's record)", [r["aggregation_seconds"] for r in records]))
    print(row("raw MPI: 5 Sends out, 5 replies in", raw_times))
    print()
    print(f"round_overhead_ratio={statistics.median(rounds) / statistics.median(raw_times):.3f}")


if __name__ == "__main__":
    options = parse_args()
    if os.environ.get(CHILD_ENV) != "1":
        sys.exit(relaunch_under_mpirun(NUM_CLIENTS + 1))
    try:
        run_benchmark(options)
    except BaseException:  # one failed rank must not leave the others waiting forever
        traceback.print_exc()
        sys.stdout.flush()
        from mpi4py import MPI

        MPI.COMM_WORLD.Abort(1)
