"""One FedAvg round (5 clients, ResNet18 width 64, no training) against raw MPI.

    .venv/bin/python benchmarks/bench_round.py [--rounds 8] [--blocks 4] [--clients 5] [--checkpoint_every 1] [--shared_memory on]

The script re-executes itself under ``mpirun -np 6`` (the ``mpirun`` next to
``sys.executable``): rank 0 is the server, ranks 1..5 the clients, each rank limited to
the torch threads ``init_training_device`` gives it, as in a real run. (``--clients N``
runs N clients on N + 1 ranks instead; the description below says 5.)

Framework: ``FedML_FedAvg_distributed`` with the real FedAVGServerManager and
FedAVGClientManager over MpiTransport, 5 clients all sampled every round, and a
ModelTrainer whose ``train()`` does nothing and ``test()`` returns ``{}``. A round is
thus what the framework itself costs: the server sends the 44.7 MB global model to
the 5 clients at once (each receives it straight into its packed model, as a real
client does) and each sends back its ``state_dict()`` (all ranks share one host, so
after the first round a client lends its update in shared memory and the server
aggregates it in place; ``--shared_memory off`` makes every update travel as a copy, as
between hosts); the server aggregates the five,
logs the round and hands its checkpoint (``checkpoint.pt``, fsync'ed) to the
background writer, whose CPU time competes with the next round.

The round time is the full period: from one round's first ``train()`` call (on any
client) to the next round's, on the host-wide ``time.perf_counter`` clock, so
nothing the server does between rounds escapes it. The server's own records
(``metrics.jsonl``: ``round_seconds``, from its first send to the end of aggregation,
and its communication / aggregation split) are shown beside it. Excluded: each run's
first round (fresh receive buffers) and its last (which always adds a test phase;
``frequency_of_the_test`` is set too large for any other).

Raw MPI: the same bytes in the same pattern with mpi4py and nothing else: the server
pre-posts a receive per client and sends one flat preallocated buffer of the model's
byte size to each of the 5 clients, either with 5 ``Isend`` at once (as the
framework's ``send_many``) or with 5 blocking ``Send`` in turn; each client ``Recv``s
it and ``Send``s its own buffer back; the server waits for all five. A barrier
precedes each repetition. The faster variant is the reference.

Framework runs and raw repetitions alternate in ``--blocks`` blocks (a run of
``--rounds`` rounds, then one untimed and ``rounds - 2`` timed raw repetitions of each
variant), so machine noise hits both alike.

Also reported: the CPU time one round costs all ranks together (``time.process_time``:
user + system time of every thread, the checkpoint writer's included), from each rank's
own marks at rounds 1 and R-2, beside that of a raw repetition. With more ranks than
cores, the round's time follows that total.

The last line is ``round_overhead_ratio=<median full period / raw>``.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from argparse import Namespace
from mpi_relaunch import is_mpi_child, relaunch_under_mpirun
from typing import Any, Dict, List, Tuple

RAW_TAG = 99

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8, help="rounds per framework run (the first and last are not timed)")
    parser.add_argument("--blocks", type=int, default=4, help="framework runs, each followed by as many raw repetitions")
    parser.add_argument("--clients", type=int, default=5, help="clients, all sampled every round (the target is stated for 5)")
    parser.add_argument("--checkpoint_every", type=int, default=1, help="the run's --checkpoint_every (1: a checkpoint every round, the default)")
    parser.add_argument("--shared_memory", choices=["on", "off"], default="on", help="the run's --shared_memory (on, the default: updates lent in place)")
    args = parser.parse_args()
    if args.rounds < 4:
        parser.error("--rounds must be at least 4: the first and last rounds of a run are not timed")
    return args


def federation_args(clients: int, rounds: int, checkpoint_every: int, shared_memory: str, run_dir: str) -> Namespace:
    """The run's arguments as main_fedavg.py would parse them: every client every round,
    no test round but the last (which always tests), nothing written outside ``run_dir``."""
    from fedml_api.distributed.fedavg.args import add_federation_args

    return add_federation_args(argparse.ArgumentParser()).parse_args([
        "--client_num_in_total", str(clients), "--client_num_per_round", str(clients),
        "--comm_round", str(rounds), "--frequency_of_the_test", str(10**9),
        "--data_path", os.devnull, "--run_dir", run_dir, "--wandb_mode", "disabled", "--checkpoint_every", str(checkpoint_every),
        "--shared_memory", shared_memory,
    ])


def run_benchmark(args: argparse.Namespace) -> None:
    import numpy as np
    import torch
    from mpi4py import MPI

    from fedml_api.distributed.fedavg.FedAvgAPI import FedML_FedAvg_distributed
    from fedml_api.model.ResNet18.resnet import ResNet18
    from fedml_api.utils.process_setup import init_training_device, seed_everything
    from fedml_core.distributed.communication.mpi_transport import MpiTransport
    from fedml_core.trainer.model_trainer import ModelTrainer
    from fedml_core.trainer.result_aggregator import WeightedMeanResultAggregator

    class NoTraining(ModelTrainer):
        """Hands the model back untouched, so a round costs only the framework; notes
        when each round's train() starts (``time.perf_counter``: one clock host-wide)."""

        def __init__(self, model: torch.nn.Module) -> None:
            super().__init__(model)
            self.train_starts: List[float] = []

        def get_local_sample_number(self, train_path: str) -> int:
            return 1000

        def train(self, device: torch.device, args: Namespace, train_path: str) -> None:
            self.train_starts.append(time.perf_counter())

        def test(self, device: torch.device, args: Namespace, test_path: str) -> Dict[str, Any]:
            return {}

    class CpuMarkingTransport(MpiTransport):
        """Notes this process's CPU time (all threads, user + system) whenever it sends a
        model: the server once per round (and for the final test), a client once per
        round with its update."""

        def __init__(self, comm) -> None:
            super().__init__(comm)
            self.cpu_marks: List[float] = []

        def send_many(self, messages, timeout=None):
            if any(message.payload_bytes() for message in messages):
                self.cpu_marks.append(time.process_time())
            return super().send_many(messages, timeout)

    logging.disable(logging.INFO)  # the framework's per-round log lines would bury the table
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    seed_everything(0)
    device = init_training_device(rank, comm)
    model = ResNet18(num_classes=10, in_channels=3, width=64)
    nbytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    work_dir = tempfile.mkdtemp(prefix="bench_round-") if rank == 0 else ""

    # -- raw MPI: the same bytes, the same pattern, nothing else ------------------------
    raw_out = np.ones(-(-nbytes // 4), dtype=np.float32)
    raw_in = [np.ones_like(raw_out) for _ in range(size - 1 if rank == 0 else 1)]

    def raw_round(concurrent: bool) -> None:
        if rank == 0:
            requests = [comm.Irecv([raw_in[c - 1], MPI.FLOAT], c, RAW_TAG) for c in range(1, size)]
            for client in range(1, size):
                if concurrent:  # like MpiTransport.send_many
                    requests.append(comm.Isend([raw_out, MPI.FLOAT], client, RAW_TAG))
                else:
                    comm.Send([raw_out, MPI.FLOAT], client, RAW_TAG)
            MPI.Request.Waitall(requests)
        else:
            comm.Recv([raw_in[0], MPI.FLOAT], 0, RAW_TAG)
            comm.Send([raw_out, MPI.FLOAT], 0, RAW_TAG)

    raw_cases = {"raw MPI, all Isends at once": True, "raw MPI, Sends in turn": False}
    raw_times: Dict[str, List[float]] = {name: [] for name in raw_cases}
    records: List[Dict[str, Any]] = []
    periods: List[float] = []
    cpu_per_round: List[float] = []  # this rank's, one per block
    raw_cpu = 0.0  # this rank's, over the timed repetitions of the reference case
    for block in range(args.blocks):
        run_args = federation_args(size - 1, args.rounds, args.checkpoint_every, args.shared_memory, os.path.join(work_dir, f"block{block}"))
        trainer = NoTraining(model)
        transport = CpuMarkingTransport(comm)
        comm.Barrier()
        FedML_FedAvg_distributed(rank, size, device, comm, model, run_args, os.devnull, os.devnull,
                                 WeightedMeanResultAggregator(), trainer, transport=transport)
        # Over the timed rounds 1..R-2, from round 1's mark to round R-2's.
        marks = transport.cpu_marks
        cpu_per_round.append((marks[args.rounds - 2] - marks[1]) / (args.rounds - 3))
        starts = comm.gather(trainer.train_starts, root=0)
        if rank == 0:
            with open(os.path.join(run_args.run_dir, "metrics.jsonl"), encoding="utf-8") as f:
                records += [json.loads(line) for line in f][1:-1]
            # Round r's period: from its first train() start to round r+1's (rounds 1..R-2).
            first = [min(s[r] for s in starts[1:]) for r in range(args.rounds)]
            periods += [first[r + 1] - first[r] for r in range(1, args.rounds - 1)]
        for rep in range(1 + args.rounds - 2):
            for name, concurrent in raw_cases.items():
                comm.Barrier()
                start, cpu = time.perf_counter(), time.process_time()
                raw_round(concurrent)
                if rep > 0 and concurrent:
                    raw_cpu += time.process_time() - cpu
                if rank == 0 and rep > 0:
                    raw_times[name].append(time.perf_counter() - start)

    cpu = comm.gather((statistics.median(cpu_per_round), raw_cpu / (args.blocks * (args.rounds - 2))), root=0)
    if rank == 0:
        shutil.rmtree(work_dir)
        report(periods, records, raw_times, cpu, nbytes, torch.get_num_threads(), args)


def report(periods: List[float], records: List[Dict[str, Any]], raw_times: Dict[str, List[float]],
           cpu: List[Tuple[float, float]], nbytes: int, threads: int, args: argparse.Namespace) -> None:
    def row(name: str, values: List[float]) -> str:
        return (f"{name:50s} {len(values):4d} {statistics.median(values) * 1e3:10.2f} "
                f"{min(values) * 1e3:10.2f} {statistics.mean(values) * 1e3:10.2f}")

    round_seconds = [r["round_seconds"] for r in records]
    raw_name = min(raw_times, key=lambda name: statistics.median(raw_times[name]))
    raw = statistics.median(raw_times[raw_name])
    clients = len(cpu) - 1
    print(f"One FedAvg round, {clients} clients, ResNet18(width=64) = {nbytes:,} bytes per message, "
          f"{2 * clients} messages ({2 * clients * nbytes / 1e6:.0f} MB) per round; "
          f"{clients + 1} ranks, {threads} torch thread(s) each; "
          f"--checkpoint_every {args.checkpoint_every} --shared_memory {args.shared_memory}")
    print(f"{'':50s} {'n':>4s} {'median ms':>10s} {'min ms':>10s} {'mean ms':>10s}")
    print(row("framework round, full period (train() to train())", periods))
    print(row("  server's round_seconds (first send -> aggregated)", round_seconds))
    print(row("    of which communication", [r["communication_seconds"] for r in records]))
    print(row("    of which aggregation", [r["aggregation_seconds"] for r in records]))
    for name, times in raw_times.items():
        print(row(name + (" (reference)" if name == raw_name else ""), times))
    framework_cpu, raw_cpu = (sum(per_rank[i] for per_rank in cpu) for i in (0, 1))
    print(f"CPU time per round, all {len(cpu)} ranks together (user + system, every thread; medians over runs):")
    print(f"  framework {framework_cpu * 1e3:7.1f} ms (server {cpu[0][0] * 1e3:.1f} ms, clients "
          f"{', '.join(f'{c * 1e3:.1f}' for c, _ in cpu[1:])} ms)")
    print(f"  raw MPI, all Isends at once {raw_cpu * 1e3:7.1f} ms")
    print()
    print(f"round_overhead_ratio={statistics.median(periods) / raw:.3f}")


if __name__ == "__main__":
    options = parse_args()
    if not is_mpi_child():
        sys.exit(relaunch_under_mpirun(options.clients + 1, __file__))
    try:
        run_benchmark(options)
    except BaseException:  # one failed rank must not leave the others waiting forever
        traceback.print_exc()
        sys.stdout.flush()
        from mpi4py import MPI

        MPI.COMM_WORLD.Abort(1)
