"""Accuracy curves of bench_federated_optimizers.sh's runs, one plot per set.

    python benchmarks/plot_federated_optimizers.py runs/bench-optimizers

For each ``<set>/<run>/metrics.jsonl`` under the folder: prints the run's final test
accuracy (and, for DP runs, the epsilon spent) and draws ``<set>.png`` with every
run's accuracy per round (DP: accuracy against epsilon).
"""
from __future__ import annotations

import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def records(path: str) -> list:
    with open(path) as f:
        return [json.loads(line) for line in f]


def main(folder: str) -> None:
    for set_name in sorted(os.listdir(folder)):
        set_dir = os.path.join(folder, set_name)
        if not os.path.isdir(set_dir):
            continue
        figure, axes = plt.subplots(figsize=(7, 4.5))
        for run in sorted(os.listdir(set_dir)):
            path = os.path.join(set_dir, run, "metrics.jsonl")
            if not os.path.exists(path):
                continue
            tested = [r for r in records(path) if "test" in r]
            if not tested:
                continue
            accuracy = [r["test"]["accuracy"] for r in tested]
            if "dp" in tested[-1]:
                epsilon = [r["dp"]["epsilon"] for r in tested]
                axes.plot(epsilon, accuracy, label=run)
                print(f"{set_name}/{run}: final accuracy {accuracy[-1]:.4f} at epsilon {epsilon[-1]:.2f} (delta {tested[-1]['dp']['delta']:g})")
            else:
                axes.plot([r["round"] + 1 for r in tested], accuracy, label=run)
                print(f"{set_name}/{run}: final accuracy {accuracy[-1]:.4f} after {tested[-1]['round'] + 1} rounds")
        axes.set_xlabel("epsilon" if set_name == "dp" else "round")
        axes.set_ylabel("test accuracy")
        axes.set_title(f"CIFAR-10, Dirichlet 0.1, 10 clients: {set_name}")
        axes.legend(fontsize=7)
        figure.tight_layout()
        figure.savefig(os.path.join(folder, f"{set_name}.png"), dpi=120)
        plt.close(figure)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/bench-optimizers")
