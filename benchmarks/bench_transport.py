"""Round-trip cost of a ResNet18 state_dict through MpiTransport, against raw MPI.

    .venv/bin/python benchmarks/bench_transport.py [--reps 30] [--list-reps 3]

The script re-executes itself under ``mpirun -np 2`` (the ``mpirun`` next to
``sys.executable``). Rank 0 plays the server, rank 1 the client; rank 0 times every
round trip (0 -> 1 -> 0) of the 44.7 MB state of ``ResNet18(width=64)``:

- ``framework, echo``: the server sends its packed global model (as
  FedAVGServerManager does), the client sends the received message's tensors back,
  packed as they arrived. Both sides wait in ``MpiTransport.receive()``, whose
  spin-then-back-off polling is part of what is measured.
- ``framework, packed model's state_dict``: the realistic reply, as a FedAvg client
  sends it: the client's model was packed (``pack_module``, as FedAVGClientManager
  does) and receives the model straight into its own memory (``receive_into``); it
  replies with ``model.state_dict()``, whose views the transport recognises as the
  packed buffers.
- ``framework, unpacked state_dict``: the same reply from a model that was not packed
  (122 separate tensors, 122 sends), for comparison.
- ``raw Send/Recv``: mpi4py ``Send``/``Recv`` of one preallocated numpy float32 buffer
  of the same byte size: the reference the framework is held to. numpy backs an array
  this large with transparent huge pages; ``raw Send/Recv, torch-allocated`` repeats it
  with a buffer from torch's allocator (4 KiB pages, like every tensor of the
  framework unless ``THP_MEM_ALLOC_ENABLE=1``), which shows how much of any gap is
  the memory's page size rather than the framework (on this VM, Open MPI's
  single-copy transfer, CMA, is about twice as slow out of 4 KiB pages).
- ``pickled comm.send``: mpi4py's pickling ``send``/``recv`` of the state_dict.
- ``FedML lists``: FedML's ``is_mobile`` path: ``{k: v.tolist()}`` pickled through
  ``comm.send``, turned back into tensors (``torch.from_numpy(np.asarray(v)).float()``)
  on arrival; very slow, so it runs on fewer repetitions.

The cases are interleaved repetition by repetition (their order rotating), each round
trip preceded by a barrier so both ranks start it waiting in their receive, and each
fast case's first ``--warmup`` repetitions are discarded: machine noise hits all cases
alike.

Then, with header-only messages: the one-way latency (ping-pong / 2) through the
framework and through raw MPI; the one-way latency when the receiver has idled long
enough to be in its sleep back-off (the sender stamps ``time.perf_counter()``, a
system-wide monotonic clock, into the message); and the CPU time a rank burns while
idle in ``transport.receive(timeout=...)``, as a percentage of one core, beside that of
a rank idle in a blocking ``MPI_Recv``.

The last line is ``transport_overhead_ratio=<framework echo median / raw median>``.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from mpi_relaunch import is_mpi_child, relaunch_under_mpirun
from typing import Callable, Dict, List, NamedTuple, Sequence

NUM_RANKS = 2
RAW_TAG = 99
PING, PONG, ROUND_TRIP = 1, 2, 3  # message types
RAW = "raw Send/Recv (flat float32)"  # the reference
PACKED_REPLY = "framework, packed model's state_dict"

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=30, help="timed round trips per fast case")
    parser.add_argument("--list-reps", type=int, default=3, help="timed round trips of the FedML-lists case")
    parser.add_argument("--warmup", type=int, default=2, help="untimed round trips per case first")
    parser.add_argument("--pingpongs", type=int, default=500, help="header-only ping-pongs per transport")
    parser.add_argument("--late-messages", type=int, default=20, help="messages sent to a receiver idle for --late-after s")
    parser.add_argument("--late-after", type=float, default=0.1, help="seconds the receiver idles before a late message")
    parser.add_argument("--idle-seconds", type=float, default=5.0, help="length of the idle-CPU measurement")
    return parser.parse_args()


class Case(NamedTuple):
    """One way of moving the state 0 -> 1 -> 0: what each rank does for one round trip."""

    name: str
    server: Callable[[], None]  # rank 0: send, then receive the reply (timed)
    client: Callable[[], None]  # rank 1: receive, then reply
    reps: int
    warmup: int


def run_benchmark(args: argparse.Namespace) -> None:
    import numpy as np
    import torch
    from mpi4py import MPI

    from fedml_api.model.ResNet18.resnet import ResNet18
    from fedml_core.distributed.communication.message import Message
    from fedml_core.distributed.communication.mpi_transport import MpiTransport
    from fedml_core.distributed.communication.packed_tensors import PackedTensors, pack_module

    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    torch.set_num_threads(1)  # what init_training_device gives 2 ranks on 2 cores
    transport = MpiTransport(comm)
    model = ResNet18(num_classes=10, in_channels=3, width=64)
    state = model.state_dict()
    packed_model = ResNet18(num_classes=10, in_channels=3, width=64)
    packed_state = pack_module(packed_model)
    global_model = PackedTensors.from_tensors(state)
    nbytes = global_model.nbytes()
    # Preallocated and touched. numpy asks the kernel for transparent huge pages for an
    # array this big; torch (unless THP_MEM_ALLOC_ENABLE=1) does not, as for the models.
    flat = np.ones(-(-nbytes // 4), dtype=np.float32)
    flat_torch = torch.ones(flat.size).numpy()
    peer = 1 - rank

    # -- the cases -----------------------------------------------------------------
    def framework_server() -> None:
        message = Message(ROUND_TRIP, 0, 1)
        message.set_packed(global_model)
        transport.send(message)
        reply = transport.receive()
        assert reply is not None and reply.payload_bytes() == nbytes

    def framework_echo_client() -> None:
        received = transport.receive()
        reply = Message(ROUND_TRIP, 1, 0)
        reply.set_packed(received.packed)
        transport.send(reply)

    def framework_packed_state_dict_client() -> None:
        transport.receive_into(packed_state)
        transport.receive()
        transport.send(Message(ROUND_TRIP, 1, 0, tensors=packed_model.state_dict()))
        transport.receive_into(None)

    def framework_state_dict_client() -> None:
        transport.receive()
        transport.send(Message(ROUND_TRIP, 1, 0, tensors=model.state_dict()))

    def raw_round_trip(buffer: np.ndarray) -> None:
        if rank == 0:
            comm.Send([buffer, MPI.FLOAT], peer, RAW_TAG)
            comm.Recv([buffer, MPI.FLOAT], peer, RAW_TAG)
        else:
            comm.Recv([buffer, MPI.FLOAT], peer, RAW_TAG)
            comm.Send([buffer, MPI.FLOAT], peer, RAW_TAG)

    def raw_numpy() -> None:
        raw_round_trip(flat)

    def raw_torch() -> None:
        raw_round_trip(flat_torch)

    def pickled_round_trip() -> None:
        if rank == 0:
            comm.send(state, peer, RAW_TAG)
            comm.recv(source=peer, tag=RAW_TAG)
        else:
            comm.send(comm.recv(source=peer, tag=RAW_TAG), peer, RAW_TAG)

    def to_lists(tensors: Dict[str, torch.Tensor]) -> Dict[str, list]:
        return {k: v.tolist() for k, v in tensors.items()}  # FedML's transform_tensor_to_list

    def from_lists(lists: Dict[str, list]) -> Dict[str, torch.Tensor]:
        return {k: torch.from_numpy(np.asarray(v)).float() for k, v in lists.items()}  # transform_list_to_tensor

    def lists_round_trip() -> None:
        if rank == 0:
            comm.send(to_lists(state), peer, RAW_TAG)
            from_lists(comm.recv(source=peer, tag=RAW_TAG))
        else:
            received = from_lists(comm.recv(source=peer, tag=RAW_TAG))
            comm.send(to_lists(received), peer, RAW_TAG)

    cases = [
        Case("framework, echo", framework_server, framework_echo_client, args.reps, args.warmup),
        Case(PACKED_REPLY, framework_server, framework_packed_state_dict_client, args.reps, args.warmup),
        Case("framework, unpacked state_dict", framework_server, framework_state_dict_client, args.reps, args.warmup),
        Case(RAW, raw_numpy, raw_numpy, args.reps, args.warmup),
        Case("raw Send/Recv, torch-allocated", raw_torch, raw_torch, args.reps, args.warmup),
        Case("pickled comm.send (state_dict)", pickled_round_trip, pickled_round_trip, args.reps, args.warmup),
        # Seconds per round trip, dominated by tolist() and pickling: nothing to warm up.
        Case("FedML lists (tolist + comm.send)", lists_round_trip, lists_round_trip, args.list_reps, 0),
    ]
    times = time_interleaved(comm, cases)

    # -- small messages ---------------------------------------------------------------
    small = np.zeros(1, dtype=np.float64)

    def framework_pingpong() -> None:
        if rank == 0:
            transport.send(Message(PING, 0, 1))
            transport.receive()
        else:
            transport.receive()
            transport.send(Message(PONG, 1, 0))

    def raw_pingpong() -> None:
        if rank == 0:
            comm.Send([small, MPI.DOUBLE], peer, RAW_TAG)
            comm.Recv([small, MPI.DOUBLE], peer, RAW_TAG)
        else:
            comm.Recv([small, MPI.DOUBLE], peer, RAW_TAG)
            comm.Send([small, MPI.DOUBLE], peer, RAW_TAG)

    pingpong_cases = [
        Case("framework", framework_pingpong, framework_pingpong, args.pingpongs, 20),
        Case("raw Send/Recv", raw_pingpong, raw_pingpong, args.pingpongs, 20),
    ]
    pingpong = time_interleaved(comm, pingpong_cases)
    late = late_latencies(comm, transport, small, args.late_messages, args.late_after)
    idle = idle_cpu_percent(comm, transport, args.idle_seconds)

    if rank == 0:
        report(cases, times, pingpong_cases, pingpong, late, idle, nbytes, len(state), args)


def time_interleaved(comm, cases: Sequence[Case]) -> Dict[str, List[float]]:
    """Run every case's round trip rep by rep, in rotating order, each case's timed reps
    after its warm-up ones; rank 0's timings in seconds."""
    times: Dict[str, List[float]] = {case.name: [] for case in cases}
    rank = comm.Get_rank()
    for rep in range(max(case.warmup + case.reps for case in cases)):
        shift = rep % len(cases)
        for case in cases[shift:] + cases[:shift]:
            if rep >= case.warmup + case.reps:
                continue
            comm.Barrier()
            if rank == 0:
                start = time.perf_counter()
                case.server()
                if rep >= case.warmup:
                    times[case.name].append(time.perf_counter() - start)
            else:
                case.client()
    return times


def late_latencies(comm, transport, small, count: int, idle_before: float) -> Dict[str, List[float]]:
    """One-way latencies (s) of header-only messages sent after the receiver has waited
    ``idle_before`` seconds, through the framework and raw MPI; valid on rank 0."""
    from mpi4py import MPI

    from fedml_core.distributed.communication.message import Message

    rank = comm.Get_rank()
    latencies: Dict[str, List[float]] = {"framework": [], "raw Recv": []}
    for _ in range(count):
        comm.Barrier()
        if rank == 0:
            time.sleep(idle_before)
            transport.send(Message(PING, 0, 1, params={"sent": time.perf_counter()}))
        else:
            message = transport.receive()
            latencies["framework"].append(time.perf_counter() - message.get("sent"))
        comm.Barrier()
        if rank == 0:
            time.sleep(idle_before)
            small[0] = time.perf_counter()
            comm.Send([small, MPI.DOUBLE], 1, RAW_TAG)
        else:
            comm.Recv([small, MPI.DOUBLE], 0, RAW_TAG)
            latencies["raw Recv"].append(time.perf_counter() - small[0])
    collected = comm.gather(latencies, root=0)
    return collected[1] if rank == 0 else {}


def idle_cpu_percent(comm, transport, seconds: float) -> Dict[str, float]:
    """CPU time, as % of one core, of both ranks idle ``seconds`` in
    ``transport.receive(timeout=seconds)``, then of rank 1 waiting as long in a blocking
    ``MPI_Recv`` (rank 0 sleeps, then releases it); valid on rank 0."""
    from mpi4py import MPI

    rank = comm.Get_rank()
    comm.Barrier()
    cpu, wall = time.process_time(), time.perf_counter()
    assert transport.receive(timeout=seconds) is None
    framework = 100 * (time.process_time() - cpu) / (time.perf_counter() - wall)

    comm.Barrier()
    cpu, wall = time.process_time(), time.perf_counter()
    token = bytearray(1)
    if rank == 0:
        time.sleep(seconds)
        comm.Send([token, MPI.BYTE], 1, RAW_TAG)
    else:
        comm.Recv([token, MPI.BYTE], 0, RAW_TAG)
    raw = 100 * (time.process_time() - cpu) / (time.perf_counter() - wall)
    per_rank = comm.gather((framework, raw), root=0)
    if rank != 0:
        return {}
    return {"transport.receive(timeout), rank 0": per_rank[0][0], "transport.receive(timeout), rank 1": per_rank[1][0],
            "blocking MPI_Recv, rank 1": per_rank[1][1]}


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:10.2f}"


def report(cases, times, pingpong_cases, pingpong, late, idle, nbytes: int, num_tensors: int, args) -> None:
    from mpi4py import MPI

    raw = statistics.median(times[RAW])
    print(f"MpiTransport round trip 0 -> 1 -> 0 of ResNet18(width=64): {num_tensors} tensors, {nbytes:,} bytes "
          f"({nbytes / 1e6:.1f} MB); {MPI.Get_library_version().splitlines()[0].rstrip(chr(0))}")
    print(f"{'case':36s} {'reps':>5s} {'median ms':>10s} {'min ms':>10s} {'x raw':>8s}")
    for case in cases:
        t = times[case.name]
        print(f"{case.name:36s} {len(t):5d} {ms(statistics.median(t))} {ms(min(t))} {statistics.median(t) / raw:8.2f}")
    raw_bandwidth = 2 * nbytes / raw / 1e9
    print(f"raw round trip moves {2 * nbytes / 1e6:.1f} MB: {raw_bandwidth:.2f} GB/s")
    print()
    print(f"header-only one-way latency (ping-pong / 2, {args.pingpongs} each; receiver waiting in receive):")
    for case in pingpong_cases:
        t = [s / 2 for s in pingpong[case.name]]
        print(f"  {case.name:34s} median {statistics.median(t) * 1e6:8.1f} us   min {min(t) * 1e6:8.1f} us")
    print(f"header-only one-way latency after the receiver idled {args.late_after * 1e3:.0f} ms ({args.late_messages} each):")
    for name, t in late.items():
        print(f"  {name:34s} median {statistics.median(t) * 1e6:8.1f} us   max {max(t) * 1e6:8.1f} us")
    print(f"CPU used while waiting {args.idle_seconds:.0f} s for nothing (% of one core):")
    for name, percent in idle.items():
        print(f"  {name:34s} {percent:6.1f}%")
    print()
    framework = statistics.median(times["framework, echo"])
    state_dict = statistics.median(times[PACKED_REPLY])
    print(f"state_dict_reply_overhead_ratio={state_dict / raw:.3f}")
    print(f"transport_overhead_ratio={framework / raw:.3f}")


if __name__ == "__main__":
    options = parse_args()
    if not is_mpi_child():
        sys.exit(relaunch_under_mpirun(NUM_RANKS, __file__))
    run_benchmark(options)
