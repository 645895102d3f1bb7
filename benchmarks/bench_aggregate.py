"""FedAvg of K ResNet18 states through the framework, against this machine's memcpy.

    .venv/bin/python benchmarks/bench_aggregate.py [--clients 10] [--reps 15] [--threads N]
        [--strategy-reps 7] [--strategies FedAvgM,FedAdam]

Builds K = ``--clients`` distinct states of ``ResNet18(width=64)`` (the initial state
plus per-client noise; ``num_batches_tracked`` differs per client), packs each with
``PackedTensors.from_tensors`` as the transport delivers them, and times
``FedAvg.add`` x K + ``FedAvg.aggregate`` with sample numbers as weights (one server
round's aggregation).

Aggregation must read K states of P float32 elements and write one: (K+1)·P·4 bytes.
Its achieved bandwidth, (K+1)·P·4 / time, is compared with this machine's memcpy
bandwidth measured in the same run: copying a warm (K+1)·P·4-byte buffer into another
with torch's ``Tensor.copy_`` (same thread count as the aggregation) and numpy's
``copyto``, between warm buffers in transparent huge pages as the framework's packed
states are; the faster of the two is the reference, reported as bytes copied / time.
(A memcpy reads and writes those bytes, so it moves twice the aggregation's traffic
for the same count: the comparison favours neither side by construction, it asks the
aggregation to run at most 1.25 times the time of one plain copy of its inputs.)

For reference, FedML's FedAVGAggregator is timed too: per key, ``state[k] * w`` then
``+=`` over dicts of separate tensors. All timed cases are interleaved repetition by
repetition. The framework's result is checked against a float64 reference
(``allclose``; integer buffers exactly), so a wrong result fails the benchmark.

Then every registered strategy's server step (``configure_round``, ``add`` x K and
``aggregate``, as one server round runs them) is timed the same way on the same K
states, interleaved with FedAvg's, and reported as a ratio to FedAvg's median and minimum
(``--strategy-reps`` repetitions each; SCAFFOLD gets per-client control variates,
FedNova step counts, as their clients send; ``--strategies`` picks some). The median
CPU time of the process's threads per round (``time.process_time``) is reported too:
on a shared machine it varies far less than the wall time, which waits whenever
another program holds a core one of the aggregation's threads needs.

The last line is ``aggregation_bandwidth_fraction=<achieved / memcpy>``.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from fedml_api.model.ResNet18.resnet import ResNet18  # noqa: E402
from fedml_core.aggregation import ClientUpdate, FedAvg, FederationInfo  # noqa: E402
from fedml_core.aggregation.registry import REGISTRY, add_optimizer_args  # noqa: E402
from fedml_core.distributed.communication.packed_tensors import PackedTensors  # noqa: E402

TensorDict = Dict[str, torch.Tensor]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=10, help="K: states averaged per round")
    parser.add_argument("--reps", type=int, default=15, help="timed repetitions per case")
    parser.add_argument("--fedml-reps", type=int, default=5, help="timed repetitions of FedML's baseline")
    parser.add_argument("--warmup", type=int, default=2, help="untimed repetitions per case first")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch threads (default: all cores)")
    parser.add_argument("--strategy-reps", type=int, default=7, help="timed repetitions of each strategy's server step")
    parser.add_argument("--strategies", type=str, default=None, help="comma-separated names to time (default: all registered)")
    return parser.parse_args()


def client_states(num_clients: int) -> List[TensorDict]:
    """Distinct full ResNet18 states: float tensors perturbed, counters offset per client."""
    torch.manual_seed(0)
    base = ResNet18(num_classes=10, in_channels=3, width=64).state_dict()
    states = []
    for client in range(num_clients):
        states.append({
            k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v + 100 * client
            for k, v in base.items()
        })
    return states


def fedml_average(states: Sequence[TensorDict], sample_numbers: Sequence[int]) -> TensorDict:
    """FedML's FedAVGAggregator.aggregate loop, verbatim in substance."""
    total = sum(sample_numbers)
    averaged = dict(states[0])
    for k in averaged:
        for i, (n, state) in enumerate(zip(sample_numbers, states)):
            w = n / total
            if i == 0:
                averaged[k] = state[k] * w
            else:
                averaged[k] += state[k] * w
    return averaged


def check_against_float64(result: PackedTensors, states: Sequence[TensorDict], sample_numbers: Sequence[int]) -> None:
    """Raise AssertionError unless ``result`` is the sample-weighted mean of ``states``."""
    total = float(sum(sample_numbers))
    for name, got in result.tensors().items():
        want = sum(s[name].double() * (n / total) for s, n in zip(states, sample_numbers))
        if got.is_floating_point():
            assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-6), f"{name}: wrong weighted mean"
        else:
            assert torch.equal(got, want.round().to(got.dtype)), f"{name}: wrong rounded weighted mean"


def time_interleaved(cases: Dict[str, Callable[[], object]], reps: Dict[str, int], warmup: int,
                     cpu: Optional[Dict[str, List[float]]] = None) -> Dict[str, List[float]]:
    """Seconds per call of every case, rep by rep in rotating order, after ``warmup`` calls
    (and, into ``cpu`` if given, the CPU seconds of this process's threads per call)."""
    names = list(cases)
    times: Dict[str, List[float]] = {name: [] for name in names}
    for rep in range(warmup + max(reps.values())):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            if rep >= warmup + reps[name]:
                continue
            start, start_cpu = time.perf_counter(), time.process_time()
            cases[name]()
            if rep >= warmup:
                times[name].append(time.perf_counter() - start)
                if cpu is not None:
                    cpu.setdefault(name, []).append(time.process_time() - start_cpu)
    return times


def strategy_cases(packed: Sequence[PackedTensors], sample_numbers: Sequence[int], global_model: PackedTensors,
                   trainable: Sequence[str]) -> Dict[str, Callable[[], object]]:
    """One server round of every registered strategy (defaults, --krum_f 1, FedPer's
    personal layer ResNet18's head), as callables."""
    clients = list(range(1, len(packed) + 1))
    controls = [PackedTensors.from_tensors({name: p.tensors()[name] for name in trainable}) for p in packed]
    defaults = add_optimizer_args(argparse.ArgumentParser()).parse_args(["--krum_f", "1", "--personal_layers", "fc"])
    cases: Dict[str, Callable[[], object]] = {}
    for name, build in REGISTRY.items():
        strategy = build(defaults)
        strategy.setup(global_model, trainable, FederationInfo(len(packed), len(packed)))
        kept: List[PackedTensors] = []

        def one_round(strategy=strategy, kept=kept) -> None:
            strategy.configure_round(0, clients, global_model)
            for client, state, n, control in zip(clients, packed, sample_numbers, controls):
                extra = control if strategy.expected_client_tensors() else None
                strategy.add(ClientUpdate(client, state, n, extra, {"local_steps": 3, "a_norm": 3.0}))
            # Like the server, the previous global model lives on while the next one is computed.
            kept[:] = kept[-1:] + [strategy.aggregate(global_model, 0)]

        cases[name] = one_round
    return cases


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    states = client_states(args.clients)
    packed = [PackedTensors.from_tensors(s) for s in states]
    sample_numbers = [600 + 37 * k for k in range(args.clients)]
    global_model = PackedTensors.from_tensors(states[0])
    float_elements = global_model.groups[torch.float32].numel()
    touched = (args.clients + 1) * float_elements * 4

    strategy = FedAvg()
    results: List[PackedTensors] = []

    def framework() -> None:
        for client_id, (state, n) in enumerate(zip(packed, sample_numbers), start=1):
            strategy.add(ClientUpdate(client_id, state, n))
        # Like the server, the previous global model lives on while the next one is computed.
        results[:] = results[-1:] + [strategy.aggregate(global_model)]

    # Warm buffers in transparent huge pages (numpy asks for them), like the framework's
    # packed states and accumulator: the reference copy gets every advantage they get.
    source = torch.from_numpy(np.ones(touched // 4, dtype=np.float32))
    target = torch.from_numpy(np.zeros(touched // 4, dtype=np.float32))
    cases: Dict[str, Callable[[], object]] = {
        "framework FedAvg (packed)": framework,
        "memcpy, torch copy_": lambda: target.copy_(source),
        "memcpy, numpy copyto": lambda: np.copyto(target.numpy(), source.numpy()),
        "FedML baseline (per key)": lambda: fedml_average(states, sample_numbers),
    }
    reps = {name: args.reps for name in cases}
    reps["FedML baseline (per key)"] = args.fedml_reps
    times = time_interleaved(cases, reps, args.warmup)
    check_against_float64(results[-1], states, sample_numbers)

    median = {name: statistics.median(t) for name, t in times.items()}
    memcpy_name = min(("memcpy, torch copy_", "memcpy, numpy copyto"), key=median.get)
    memcpy_bandwidth = touched / median[memcpy_name]
    achieved = touched / median["framework FedAvg (packed)"]

    print(f"FedAvg of K={args.clients} ResNet18(width=64) states, P={float_elements:,} float32 elements each; "
          f"{torch.get_num_threads()} torch thread(s)")
    print(f"bytes touched (K+1)*P*4 = {touched:,} ({touched / 1e6:.0f} MB)")
    print(f"{'case':28s} {'reps':>5s} {'median ms':>10s} {'min ms':>10s} {'GB/s (median)':>14s}")
    for name, t in times.items():
        print(f"{name:28s} {len(t):5d} {median[name] * 1e3:10.2f} {min(t) * 1e3:10.2f} {touched / median[name] / 1e9:14.2f}")
    print(f"memcpy reference: {memcpy_name} at {memcpy_bandwidth / 1e9:.2f} GB/s (bytes copied / time)")
    print("framework result matches the float64 reference (allclose rtol=1e-5, integers exact)")
    print(f"framework vs FedML baseline: {median['FedML baseline (per key)'] / median['framework FedAvg (packed)']:.1f}x faster")
    trainable = [name for name, _ in ResNet18(num_classes=10, in_channels=3, width=64).named_parameters()]
    cases = strategy_cases(packed, sample_numbers, global_model, trainable)
    if args.strategies:
        cases = {name: cases[name] for name in ["FedAvg", *args.strategies.split(",")]}
    cpu: Dict[str, List[float]] = {}
    times = time_interleaved(cases, {name: args.strategy_reps for name in cases}, warmup=1, cpu=cpu)
    fedavg, fastest_fedavg, fedavg_cpu = statistics.median(times["FedAvg"]), min(times["FedAvg"]), statistics.median(cpu["FedAvg"])
    print()
    print(f"server step of each strategy, K={args.clients} updates ({args.strategy_reps} reps, interleaved)")
    print(f"{'strategy':16s} {'median ms':>10s} {'min ms':>10s} {'x FedAvg (median)':>18s} {'x FedAvg (min)':>15s} "
          f"{'CPU ms':>8s} {'x FedAvg (CPU)':>15s}")
    for name, t in times.items():
        print(f"{name:16s} {statistics.median(t) * 1e3:10.2f} {min(t) * 1e3:10.2f} "
              f"{statistics.median(t) / fedavg:18.2f} {min(t) / fastest_fedavg:15.2f} "
              f"{statistics.median(cpu[name]) * 1e3:8.2f} {statistics.median(cpu[name]) / fedavg_cpu:15.2f}")
    print()
    print(f"aggregation_bandwidth_fraction={achieved / memcpy_bandwidth:.3f}")


if __name__ == "__main__":
    main()
