"""Accuracy curves and tables of bench_federated_optimizers.sh's runs, one plot per set.

    python benchmarks/plot_federated_optimizers.py runs/bench-optimizers

For each ``<set>/<run>/metrics.jsonl`` under the folder, prints a Markdown table (final
and best test accuracy; the robustness set as an aggregator x attack matrix; the DP
set with the epsilon spent) and draws ``<set>.png``: every run's accuracy per round (the
robustness set, one panel per aggregator; DP: accuracy against epsilon).
"""
from __future__ import annotations

import json
import os
import sys
from typing import Dict, List

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def tested_records(run_dir: str) -> List[dict]:
    """The run's round records that hold a test result, in round order."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [record for record in map(json.loads, f) if "test" in record]


def accuracy(records: List[dict]) -> List[float]:
    return [r["test"]["accuracy"] for r in records]


def rounds(records: List[dict]) -> List[int]:
    return [r["round"] + 1 for r in records]  # 1-based, as the logs count rounds


def algorithms_table(runs: Dict[str, List[dict]]) -> List[str]:
    lines = ["| algorithm | final accuracy | best accuracy (round) |", "|---|---|---|"]
    for name, records in runs.items():
        best = max(range(len(records)), key=lambda i: records[i]["test"]["accuracy"])
        lines.append(f"| {name} | {accuracy(records)[-1]:.4f} | {accuracy(records)[best]:.4f} ({rounds(records)[best]}) |")
    return lines


def robustness_table(runs: Dict[str, List[dict]]) -> List[str]:
    aggregators = list(dict.fromkeys(name.rsplit("-", 1)[0] for name in runs))
    attacks = list(dict.fromkeys(name.rsplit("-", 1)[1] for name in runs))
    lines = ["| aggregator | " + " | ".join(attacks) + " |", "|---" * (len(attacks) + 1) + "|"]
    for aggregator in aggregators:
        cells = [f"{accuracy(runs[f'{aggregator}-{a}'])[-1]:.4f}" if f"{aggregator}-{a}" in runs else "-" for a in attacks]
        lines.append(f"| {aggregator} | " + " | ".join(cells) + " |")
    return lines


def dp_table(runs: Dict[str, List[dict]]) -> List[str]:
    lines = ["| run | noise multiplier | final accuracy | epsilon (delta) |", "|---|---|---|---|"]
    for name, records in runs.items():
        dp = records[-1]["dp"]
        lines.append(f"| {name} | {dp['noise_multiplier']:g} | {accuracy(records)[-1]:.4f} | "
                     f"{dp['epsilon']:.3g} ({dp['delta']:g}) |")
    return lines


def plot(set_name: str, runs: Dict[str, List[dict]], path: str) -> None:
    title = f"CIFAR-10, Dirichlet 0.1, 10 clients: {set_name}"
    if set_name == "robustness":
        aggregators = list(dict.fromkeys(name.rsplit("-", 1)[0] for name in runs))
        figure, axes = plt.subplots(1, len(aggregators), figsize=(4 * len(aggregators), 3.6), sharey=True, squeeze=False)
        for panel, aggregator in zip(axes[0], aggregators):
            for name, records in runs.items():
                if name.rsplit("-", 1)[0] == aggregator:
                    panel.plot(rounds(records), accuracy(records), label=name.rsplit("-", 1)[1])
            panel.set_title(aggregator)
            panel.set_xlabel("round")
            panel.legend(fontsize=7)
        axes[0][0].set_ylabel("test accuracy")
        figure.suptitle(title)
    else:
        figure, panel = plt.subplots(figsize=(7, 4.5))
        for name, records in runs.items():
            x = [r["dp"]["epsilon"] for r in records] if set_name == "dp" else rounds(records)
            panel.plot(x, accuracy(records), label=name)
        if set_name == "dp":
            panel.set_xscale("log")
        panel.set_xlabel("epsilon" if set_name == "dp" else "round")
        panel.set_ylabel("test accuracy")
        panel.set_title(title)
        panel.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


TABLES = {"algorithms": algorithms_table, "robustness": robustness_table, "dp": dp_table}


def main(folder: str) -> None:
    for set_name in sorted(os.listdir(folder)):
        set_dir = os.path.join(folder, set_name)
        if not os.path.isdir(set_dir) or set_name not in TABLES:
            continue
        runs = {run: tested_records(os.path.join(set_dir, run)) for run in sorted(os.listdir(set_dir))}
        runs = {run: records for run, records in runs.items() if records}
        if not runs:
            continue
        print(f"\n{set_name} ({folder}/{set_name}.png)\n")
        print("\n".join(TABLES[set_name](runs)))
        plot(set_name, runs, os.path.join(folder, f"{set_name}.png"))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/bench-optimizers")
