"""What the checkpoint's checksums cost: candidate hashes on a ResNet18-sized buffer,
and saving / resolving a ResNet18 checkpoint.

    .venv/bin/python benchmarks/bench_checksum.py [--repeats 15]

Candidates hash one 44,734,408-byte buffer (random bytes; a ResNet18's float32 weights
are as many bytes): zlib's crc32 and adler32, hashlib's blake2b and sha256, and xxhash's
xxh3_64 (the one the checkpoint uses) and xxh64. Then a ResNet18 (width 64) checkpoint
with 300 round records is saved with ``save_checkpoint`` over its predecessor's file (as
in a run) and loaded back with ``resolve_resume``. Medians of ``--repeats`` runs, wall
and CPU time (``time.process_time``) of this process, one torch thread.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import sys
import tempfile
import time
import zlib
from typing import Callable, Tuple

import numpy as np
import xxhash

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

BUFFER_BYTES = 44_734_408


def measure(work: Callable[[], object], repeats: int) -> Tuple[float, float]:
    """Median wall and CPU milliseconds of ``work()`` after one untimed call."""
    work()
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        work()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return statistics.median(wall) * 1e3, statistics.median(cpu) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15, help="timed runs of each case")
    args = parser.parse_args()

    import torch

    from fedml_api.distributed.fedavg.checkpoint import ServerCheckpoint, resolve_resume, save_checkpoint
    from fedml_api.model.ResNet18.resnet import ResNet18

    torch.set_num_threads(1)
    data = memoryview(np.random.default_rng(0).integers(0, 256, BUFFER_BYTES, dtype=np.uint8))
    candidates = {
        "zlib.crc32": lambda: zlib.crc32(data),
        "zlib.adler32": lambda: zlib.adler32(data),
        "hashlib.blake2b (16-byte digest)": lambda: hashlib.blake2b(data, digest_size=16).digest(),
        "hashlib.sha256": lambda: hashlib.sha256(data).digest(),
        "xxhash.xxh3_64 (the checkpoint's)": lambda: xxhash.xxh3_64_intdigest(data),
        "xxhash.xxh64": lambda: xxhash.xxh64_intdigest(data),
    }
    print(f"{'':40s} {'wall ms':>8s} {'CPU ms':>8s} {'GB/s':>6s}   ({BUFFER_BYTES:,} bytes)")
    for name, work in candidates.items():
        wall, cpu = measure(work, args.repeats)
        print(f"{name:40s} {wall:8.2f} {cpu:8.2f} {BUFFER_BYTES / wall / 1e6:6.1f}")

    run_dir = tempfile.mkdtemp(prefix="bench_checksum-")
    try:
        state = ResNet18(num_classes=10, in_channels=3, width=64).state_dict()
        checkpoint = ServerCheckpoint(round_idx=299, global_model=state, records=[{"round": r, "round_seconds": 0.03} for r in range(300)])
        for _ in range(2):  # a checkpoint and its spare, whose file the next one reuses
            save_checkpoint(run_dir, checkpoint)
        print()
        for name, work in (("save_checkpoint (ResNet18, 300 records)", lambda: save_checkpoint(run_dir, checkpoint)),
                           ("resolve_resume (the same)", lambda: resolve_resume(run_dir))):
            wall, cpu = measure(work, args.repeats)
            print(f"{name:40s} {wall:8.2f} {cpu:8.2f}")
    finally:
        shutil.rmtree(run_dir)


if __name__ == "__main__":
    main()
