"""The training floor of a bench_scale.py round: the template's own training of K
clients, in one process with one torch thread, no federation around it.

    .venv/bin/python benchmarks/bench_training_floor.py N K [--work_dir benchmarks/.bench_scale] [--cores 2]

Trains ``MyModel`` with the template's ``MyModelTrainer.train`` (1 epoch, batch 32,
lr 0.05: bench_scale.py's settings) on K clients of bench_scale.py's cached Dirichlet(0.5)
split of N clients (a seeded draw), each from the same initial model, with the allocator
set up as in a run's ranks, twice: the first pass reads every client's data from disk, the second finds it cached. A federated round
of K clients on ``--cores`` processes cannot take less than this time divided by the
cores: ``floor=`` is that, for the first pass (each round of a large federation meets
mostly clients it has not read yet).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench_scale import load_template  # noqa: E402
from fedml_api.utils.process_setup import keep_freed_memory_for_reuse  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("clients", type=int, help="N: clients in the split")
    parser.add_argument("per_round", type=int, help="K: clients trained")
    parser.add_argument("--work_dir", type=Path, default=Path(__file__).resolve().parent / ".bench_scale")
    parser.add_argument("--cores", type=int, default=2)
    opts = parser.parse_args()
    split = opts.work_dir / "splits" / f"cifar10_dirichlet0.5_seed0_n{opts.clients}"
    if not split.is_dir():
        raise SystemExit(f"no split at {split}: run bench_scale.py --clients {opts.clients} first")
    torch.set_num_threads(1)
    keep_freed_memory_for_reuse()  # as every rank of a run does: the floor is the training's own time
    template = load_template()
    args = argparse.Namespace(lr=0.05, epochs=1, batch_size=32, momentum=0.9)
    model = template.MyModel(3, 10)
    trainer = template.MyModelTrainer(model)
    initial = {name: value.clone() for name, value in model.state_dict().items()}
    clients = sorted(int(c) + 1 for c in np.random.default_rng(1).choice(opts.clients, opts.per_round, replace=False))
    trainer.train(torch.device("cpu"), args, str(split / "1" / "train"))  # first passes, imports
    seconds = []
    for _ in range(2):
        start = time.perf_counter()
        for client in clients:
            model.load_state_dict(initial)
            trainer.train(torch.device("cpu"), args, str(split / str(client) / "train"))
        seconds.append(time.perf_counter() - start)
    print(f"N={opts.clients} K={opts.per_round}: one thread, first pass {seconds[0]:.2f} s, data cached {seconds[1]:.2f} s")
    print(f"floor={seconds[0] / opts.cores:.2f}")


if __name__ == "__main__":
    main()
