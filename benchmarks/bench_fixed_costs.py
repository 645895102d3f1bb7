"""Fixed costs of a run: from the command to round 1, and from the last round to exit.

    .venv/bin/python benchmarks/bench_fixed_costs.py [--repeats 3] [--rounds 3] [--root A --root B]

Launches the template experiment (fedml_experiments/distributed/fedMyModel, 4 clients,
all of them every round) with the real launcher, ``run_fedavg_distributed_pytorch.sh``,
on a digits split made with ``scripts/split_dataset.py --dataset digits --clients 4``,
and reads a timeline of every run from:

* the launcher's start and exit (this script, around the command);
* every python process the launcher starts (``PYTHON`` is a shim that records when the
  process starts and exits: the pre-flight check and each rank) and mpirun's start
  (``MPIRUN`` is a shim that records the time and execs mpirun);
* the log (each rank's first line, each client's ``ready``, the server's ``all clients
  ready``, the end of every round, ``run finished``);
* the run directory's files (final checkpoint, final model, plot, summary: their mtimes).

For the ratio, ``python -c "import torch"`` is timed once per rank (CLIENT_NUM + 1
processes) the same way, through the same shim: one after another (the sum) and all at
once (the wall time). Runs alternate: per repeat, the import baselines, then one run of
each ``--root`` (several roots compare checkouts, e.g. before and after a change), in
reverse order every other repeat.

Prints one breakdown per root (median and range over the repeats) and, for the first
root, ``startup_ratio=`` (command to the start of round 1, the second round, over the
parallel import baseline; ``startup_ratio_serial=`` over the serial one) and
``exit_after_last_round_seconds=`` (end of the last round to the launcher's exit).
The machine's load (``os.getloadavg``) is printed next to every repeat.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from typing import Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ROOT = os.path.dirname(HERE)
EXPERIMENT = os.path.join("fedml_experiments", "distributed", "fedMyModel")

PYTHON_SHIM = """#!/bin/sh
start=$(date +%s.%N)
"$BENCH_REAL_PYTHON" "$@"
status=$?
echo "python $start $(date +%s.%N) ${OMPI_COMM_WORLD_RANK:--} ${FEDML_PREFLIGHT:+preflight} $status" >> "$BENCH_TRACE"
exit $status
"""
MPIRUN_SHIM = """#!/bin/sh
echo "mpirun $(date +%s.%N)" >> "$BENCH_TRACE"
exec "$BENCH_REAL_MPIRUN" "$@"
"""

TO_ROUND1 = "= command to round 1's start"
EXIT_AFTER = "= last round's end to the command's exit"
LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \w+ (.*)$")


def log_time(stamp: str) -> float:
    return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def write_shims(folder: str) -> Dict[str, str]:
    paths = {}
    for name, text in (("python", PYTHON_SHIM), ("mpirun", MPIRUN_SHIM)):
        path = os.path.join(folder, f"{name}-shim")
        with open(path, "w") as f:
            f.write(text)
        os.chmod(path, 0o755)
        paths[name] = path
    return paths


def shim_env(shims: Dict[str, str], trace: str, root: str) -> Dict[str, str]:
    env = dict(os.environ)
    env.update(PYTHON=shims["python"], MPIRUN=shims["mpirun"], BENCH_TRACE=trace, BENCH_REAL_PYTHON=sys.executable,
               BENCH_REAL_MPIRUN=shutil.which("mpirun", path=os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")) or "mpirun",
               PYTHONPATH=root, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    return env


def import_torch_baseline(shims: Dict[str, str], work: str, processes: int) -> Dict[str, float]:
    """``python -c "import torch"`` once per rank: serially (sum) and all at once (wall)."""
    env = shim_env(shims, os.path.join(work, "import.trace"), DEFAULT_ROOT)
    command = [shims["python"], "-c", "import torch"]
    serial = 0.0
    for _ in range(processes):
        start = time.time()
        subprocess.run(command, env=env, check=True)
        serial += time.time() - start
    start = time.time()
    running = [subprocess.Popen(command, env=env) for _ in range(processes)]
    for process in running:
        if process.wait() != 0:
            raise RuntimeError("python -c 'import torch' failed")
    return {"import_serial": serial, "import_parallel": time.time() - start}


def run_once(root: str, shims: Dict[str, str], work: str, data: str, clients: int, rounds: int, extra: List[str]) -> Dict[str, float]:
    """One launch; returns the timeline's events in seconds since the command started."""
    run_dir = tempfile.mkdtemp(prefix="run-", dir=work)
    trace = os.path.join(run_dir, "bench.trace")
    env = shim_env(shims, trace, root)
    command = ["sh", os.path.join(root, EXPERIMENT, "run_fedavg_distributed_pytorch.sh"), str(clients), str(clients), str(rounds),
               "--data_path", data, "--run_dir", run_dir, *extra]
    start = time.time()
    result = subprocess.run(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=work)
    end = time.time()
    if result.returncode != 0:
        sys.stdout.write(result.stdout)
        raise RuntimeError(f"the run exited {result.returncode}: {' '.join(command)}")
    ev: Dict[str, float] = {"launcher_exit": end - start}

    def at(name: str, t: float, keep: str = "first") -> None:
        t -= start
        if name not in ev or (keep == "last" and t > ev[name]) or (keep == "first" and t < ev[name]):
            ev[name] = t

    with open(trace) as f:
        for line in f:
            fields = line.split()
            if fields[0] == "mpirun":
                at("mpirun_start", float(fields[1]))
            elif len(fields) == 6:  # python START END - preflight STATUS
                at("preflight_start", float(fields[1]))
                at("preflight_end", float(fields[2]))
            else:
                rank = fields[3]
                at(f"rank{rank}_start", float(fields[1]))
                at(f"rank{rank}_exit", float(fields[2]))
    for line in result.stdout.splitlines():
        match = LOG_LINE.match(line)
        if not match:
            continue
        t, text = log_time(match.group(1)), match.group(2)
        if (m := re.match(r"process (\d+) of \d+ on host", text)):
            at(f"rank{m.group(1)}_log", t)
        elif (m := re.match(r"client (\d+): ready", text)):
            at(f"rank{m.group(1)}_ready", t)
        elif re.match(r"server: .*clients ready", text):
            at("round0_start", t)
        elif (m := re.match(r"round (\d+)/(\d+): ", text)):
            at(f"round{int(m.group(1)) - 1}_end", t)
        elif text.startswith("run finished"):
            at("run_finished", t)
    for name, event in (("checkpoint.pt", "checkpoint"), ("final_model.pt", "final_model"), ("metrics.png", "plot"),
                        ("summary.json", "summary")):
        path = os.path.join(run_dir, name)
        if os.path.exists(path):
            at(event, os.stat(path).st_mtime)
    shutil.rmtree(run_dir, ignore_errors=True)
    return ev


def breakdown(ev: Dict[str, float], clients: int, rounds: int) -> Dict[str, Optional[float]]:
    """The timeline as consecutive parts (seconds); None where an event was not seen."""
    def get(name: str) -> Optional[float]:
        return ev.get(name)

    def diff(a: Optional[float], b: Optional[float]) -> Optional[float]:
        return None if a is None or b is None else b - a

    ranks = range(clients + 1)
    starts = [ev[f"rank{r}_start"] for r in ranks if f"rank{r}_start" in ev]
    logs = [ev[f"rank{r}_log"] for r in ranks if f"rank{r}_log" in ev]
    readies = [ev[f"rank{r}_ready"] for r in range(1, clients + 1) if f"rank{r}_ready" in ev]
    client_exits = [ev[f"rank{r}_exit"] for r in range(1, clients + 1) if f"rank{r}_exit" in ev]
    first_start = min(starts) if starts else None
    last_log = max(logs) if logs else None
    last_ready = max(readies) if readies else None
    round0_start = get("round0_start")
    last_end = get(f"round{rounds - 1}_end")
    parts: Dict[str, Optional[float]] = {
        "launcher: start to pre-flight": get("preflight_start"),
        "pre-flight check (one python)": diff(get("preflight_start"), get("preflight_end")),
        "pre-flight end to mpirun": diff(get("preflight_end"), get("mpirun_start")),
        "mpirun to the first rank's start": diff(get("mpirun_start"), first_start),
        "rank start to its first log line (imports, MPI_Init), slowest": diff(first_start, last_log),
        "first log line to the last client's ready (device, model, data)": diff(last_log, last_ready),
        "last ready to round 0's start (server)": diff(last_ready, round0_start),
        "round 0 (first round: one-time costs)": diff(round0_start, get("round0_end")),
        "(last first log line to round 0's end)": diff(last_log, get("round0_end")),
        "round 1 (steady)": diff(get("round0_end"), get("round1_end")) if rounds > 2 else None,
        TO_ROUND1: get("round0_end"),
        "last round's end to the final checkpoint on disk": diff(last_end, get("checkpoint")),
        "to final_model.pt": diff(get("checkpoint"), get("final_model")),
        "to metrics.png (plot)": diff(get("final_model"), get("plot")),
        "to summary.json": diff(get("plot"), get("summary")),
        "summary to the server's exit (its teardown, MPI_Finalize)": diff(get("summary"), get("rank0_exit")),
        "server's exit to the last client's exit": diff(get("rank0_exit"), max(client_exits) if client_exits else None),
        "last rank's exit to the launcher's exit": diff(max([get("rank0_exit") or 0.0] + client_exits), get("launcher_exit")),
        EXIT_AFTER: diff(last_end, get("launcher_exit")),
    }
    return parts


def fmt(values: List[float]) -> str:
    if not values:
        return "-"
    return f"{statistics.median(values):6.2f} ({min(values):.2f}-{max(values):.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", action="append", help="checkout to launch (repeat to compare; default: this one)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--data", help="the digits split (default: made in a temporary folder)")
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="after --: more main_fedavg.py options")
    args = parser.parse_args()
    roots = [os.path.abspath(r) for r in (args.root or [DEFAULT_ROOT])]
    extra = [a for a in args.extra if a != "--"]
    work = tempfile.mkdtemp(prefix="bench-fixed-costs-")
    shims = write_shims(work)
    data = args.data or os.path.join(work, f"digits_{args.clients}clients")
    if not os.path.isdir(data):
        subprocess.run([sys.executable, os.path.join(DEFAULT_ROOT, "scripts", "split_dataset.py"), "--dataset", "digits",
                        "--out", data, "--clients", str(args.clients)], check=True, stdout=subprocess.DEVNULL)
    print(f"template experiment, {args.clients} clients (all per round), {args.rounds} rounds, options {extra or 'none'}; "
          f"{os.cpu_count()} cores; roots: {', '.join(roots)}", flush=True)
    baselines: List[Dict[str, float]] = []
    results: Dict[str, List[Dict[str, Optional[float]]]] = {r: [] for r in roots}
    for repeat in range(args.repeats):
        load = os.getloadavg()[0]
        baselines.append(import_torch_baseline(shims, work, args.clients + 1))
        line = [f"repeat {repeat + 1}: load {load:.2f}; import torch x{args.clients + 1}: serial {baselines[-1]['import_serial']:.2f} s, "
                f"parallel {baselines[-1]['import_parallel']:.2f} s"]
        # Alternating order: a load that rises or falls during a repeat favours no root.
        for root in (roots if repeat % 2 == 0 else roots[::-1]):
            parts = breakdown(run_once(root, shims, work, data, args.clients, args.rounds, extra), args.clients, args.rounds)
            results[root].append(parts)
            line.append(f"{os.path.basename(root)}: round 1 at {parts[TO_ROUND1]:.2f} s, exit {parts[EXIT_AFTER]:.2f} s after the last round")
        print("; ".join(line) + f" (load after: {os.getloadavg()[0]:.2f})", flush=True)
    shutil.rmtree(work, ignore_errors=True)

    serial = [b["import_serial"] for b in baselines]
    parallel = [b["import_parallel"] for b in baselines]
    print(f"\npython -c 'import torch' x{args.clients + 1}: serial sum {fmt(serial)} s; all at once {fmt(parallel)} s")
    print("\nseconds: median (range) over the repeats")
    names = list(results[roots[0]][0])
    width = max(map(len, names))
    print(f"{'part':<{width}}  " + "  ".join(f"{os.path.basename(r)[:22]:>22}" for r in roots))
    for name in names:
        cells = [fmt([p[name] for p in results[r] if p[name] is not None]) for r in roots]
        print(f"{name:<{width}}  " + "  ".join(f"{c:>22}" for c in cells))
    first = results[roots[0]]
    to_round1 = [p[TO_ROUND1] for p in first]
    exit_after = [p[EXIT_AFTER] for p in first]
    # Ratios per repeat (the baseline measured next to the run), then their median.
    print(f"\nstartup_ratio={statistics.median(t / b for t, b in zip(to_round1, parallel)):.2f}")
    print(f"startup_ratio_serial={statistics.median(t / b for t, b in zip(to_round1, serial)):.2f}")
    print(f"exit_after_last_round_seconds={statistics.median(exit_after):.2f}")


if __name__ == "__main__":
    main()
