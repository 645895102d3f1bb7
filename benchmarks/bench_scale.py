"""Scale: this project against Flower's simulation, side by side (issue 11, item 6).

    .venv/bin/python benchmarks/bench_scale.py [--clients 100,1000,5000] [--per_round 10,100] \\
        [--rounds 5] [--repeats 1] [--systems flower,fedml] [--work_dir benchmarks/.bench_scale]

e.g. the smallest case, Flower only:

    .venv/bin/python benchmarks/bench_scale.py --clients 100 --per_round 10 --rounds 3 --systems flower

Both systems federate the template CNN (``MyModel`` of
fedml_experiments/distributed/fedMyModel/main_fedavg.py, ``--in_channels 3``) with FedAvg on
the same Dirichlet(0.5) split of CIFAR-10 into N clients, K of them sampled per round,
for the same number of rounds, and train and test it with the very code of the template's
``MyModelTrainer`` (SGD with momentum 0.9, ``--lr``, ``--epochs``, ``--batch_size``).

* **Data**: ``scripts/split_dataset.py --dataset cifar10 --partition dirichlet --alpha 0.5``
  writes ``<work_dir>/splits/n<N>/<client_id>/{train,test}/data.h5`` once per N (cached;
  the source is ``../shared/data/cifar10-images.tar.gz`` unless ``--source`` says
  otherwise). ``--min_client_samples 1``: at 5,000 clients the 50,000 training images give
  10 per client on average, so the split tool's default minimum of 10 cannot be met.
* **This project** ("fedml"): the real launcher,
  ``sh fedml_experiments/distributed/fedMyModel/run_fedavg_distributed_pytorch.sh N K R
  --worker_processes P ...`` (see :func:`fedml_command`, the one place that knows it); the
  server's ``metrics.jsonl`` and ``summary.json`` in ``--run_dir`` give the round times and
  the accuracy. Without ``--worker_processes`` (N clients served by P processes) the
  launcher would start N + 1 processes, each with its own torch (~0.3 GB), which this
  machine cannot hold from N = 100 on: the script then skips this side and says why.
* **Flower 1.42** ("flower"): its own virtual environment, made by this script on first
  use (``<work_dir>/venv-flower``: ``python -m venv`` without system site-packages, then
  ``pip install "flwr[simulation]==1.42.*"`` with the torch, numpy and h5py versions of the
  project's environment, so both sides run the same kernels). This script runs itself
  under that interpreter (``flower-child``), which calls ``flwr.simulation.run_simulation``
  (Ray backend) with N supernodes; its ClientApp (:func:`flower_train`) reads client
  ``partition-id + 1``'s ``data.h5`` and calls the template's ``MyModelTrainer.train``;
  the ServerApp runs Flower's message-API ``FedAvg`` with ``fraction_train = K / N`` and no
  federated evaluation. ``--flower_client_cpus`` (default 1) is each ClientApp's Ray CPU
  share, so Flower runs as many ClientApps at once as the machine has cores, as this
  project runs ``--worker_processes`` (default: the number of cores) worker processes.

Measured per run: **round time** (median over rounds 2..R of the time to train and
aggregate one round; the final test is left out of both sides' last round), **wall time**
from the command to its exit, **peak memory** of the whole process tree (every descendant
of the command and every process of its session, Ray's included; sampled every 0.2 s from
``/proc``: the sum of RSS, and the sum of PSS, which counts a page shared by several
processes once), and **accuracy** after the last round: the model tested by the template's
``MyModelTrainer.test`` on every client's test split, combined by sample-weighted mean
(this project's ``WeightedMeanResultAggregator``): the clients' test splits are an IID
partition of the CIFAR-10 test set, so this is the accuracy on all 10,000 test images,
for both systems. Flower evaluates centrally (``evaluate_fn``, after the last round only);
this project runs its ordinary test round after the last round (``--frequency_of_the_test R``).
Also reported: round 1's time, the final test's time and, for Flower, the time from the
command to round 1's start (this project's metrics hold no absolute times).

Runs alternate: within each repeat and case (N, K) one run of each system, the order
reversed every other repeat. One run at a time. Every run is appended to
``<work_dir>/results.jsonl``; the table, the Flower/ours ratios and the machine's load
(``os.getloadavg``) at each run's start and end are printed at the end.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
import types
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Set, Tuple

# Only the standard library at module level: this file runs both under the project's
# environment (the harness, this project's side) and under Flower's (flower-child and
# Flower's Ray workers, which import it as the module ``bench_scale``).
HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent
TEMPLATE_DIR = REPO_ROOT / "fedml_experiments" / "distributed" / "fedMyModel"
TEMPLATE_MAIN = TEMPLATE_DIR / "main_fedavg.py"
RUN_SCRIPT = TEMPLATE_DIR / "run_fedavg_distributed_pytorch.sh"
SPLIT_SCRIPT = REPO_ROOT / "scripts" / "split_dataset.py"
DEFAULT_SOURCE = REPO_ROOT.parent / "shared" / "data" / "cifar10-images.tar.gz"
DEFAULT_WORK_DIR = HERE / ".bench_scale"

FLOWER_REQUIREMENT = "flwr[simulation]==1.42.*"
FLOWER_VERSION_PREFIX = "1.42."
# Flower's ClientApp and ServerApp read the run's settings from here: Ray's workers
# inherit the driver's environment, while run_simulation has no run config of its own.
FLOWER_CONFIG_ENV = "BENCH_SCALE_FLOWER_CONFIG"
SYSTEMS = ("flower", "fedml")


# ----------------------------------------------------------------------------------------
# Harness: options, venv, data
# ----------------------------------------------------------------------------------------


def int_list(text: str) -> List[int]:
    """``"100,1000"`` -> ``[100, 1000]`` (argparse type)."""
    values = [int(part) for part in text.split(",") if part.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, got {text!r}")
    return values


def system_list(text: str) -> List[str]:
    """``"flower,fedml"`` -> ``["flower", "fedml"]`` (argparse type)."""
    values = [part.strip() for part in text.split(",") if part.strip()]
    unknown = sorted(set(values) - set(SYSTEMS))
    if not values or unknown:
        raise argparse.ArgumentTypeError(f"systems are {', '.join(SYSTEMS)}; got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int_list, default=[100, 1000, 5000], help="values of N")
    parser.add_argument("--per_round", type=int_list, default=[10, 100], help="values of K (K <= N)")
    parser.add_argument("--rounds", type=int, default=5, help="federated rounds R (>= 2)")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each system per case")
    parser.add_argument("--systems", type=system_list, default=list(SYSTEMS))
    parser.add_argument("--work_dir", type=Path, default=DEFAULT_WORK_DIR,
                        help="Flower's venv, the cached splits, every run's directory, results.jsonl")
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="CIFAR-10, as split_dataset.py takes it")
    parser.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration of the split")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split and of both runs")
    parser.add_argument("--epochs", type=int, default=1, help="local epochs (the template's default)")
    parser.add_argument("--batch_size", type=int, default=32, help="local batch size (the template's default)")
    parser.add_argument("--lr", type=float, default=0.05, help="local SGD learning rate (the template's default)")
    parser.add_argument("--worker_processes", type=int, default=len(os.sched_getaffinity(0)),
                        help="this project: processes serving the N clients (default: the cores)")
    parser.add_argument("--flower_client_cpus", type=float, default=1.0,
                        help="Flower: Ray CPUs per ClientApp (Flower's own default is 2)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds one run may take")
    parser.add_argument("--sample_interval", type=float, default=0.2, help="seconds between memory samples")
    return parser


def flower_python(work_dir: Path) -> Path:
    """The Flower venv's interpreter, creating the venv first if it is missing or wrong.

    A venv of its own, not ``--system-site-packages``: Flower pins protobuf, grpcio and
    others, and Ray brings its own dependencies; none of that may touch the project's
    environment. torch, numpy and h5py are pinned to the project's versions (read from
    this interpreter when it has them) so both systems run the same kernels; pip's
    cache makes a re-creation cheap.
    """
    venv = work_dir / "venv-flower"
    python = venv / "bin" / "python"
    if python.exists() and _flower_venv_ok(python):
        return python
    print(f"creating Flower's virtual environment in {venv} (once)", flush=True)
    if venv.exists():
        shutil.rmtree(venv)
    subprocess.run([sys.executable if _has_venv_module() else "python3", "-m", "venv", str(venv)], check=True)
    requirements = [FLOWER_REQUIREMENT] + _pinned_like_this_environment(("torch", "numpy", "h5py"))
    started = time.perf_counter()
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", *requirements], check=True)
    print(f"installed {' '.join(requirements)} in {time.perf_counter() - started:.0f} s", flush=True)
    if not _flower_venv_ok(python):
        raise RuntimeError(f"{venv}: flwr {FLOWER_VERSION_PREFIX}*, torch and h5py do not import after pip install")
    return python


def _flower_venv_ok(python: Path) -> bool:
    check = (f"import flwr, torch, h5py, ray; "
             f"assert flwr.__version__.startswith({FLOWER_VERSION_PREFIX!r}), flwr.__version__")
    return subprocess.run([str(python), "-c", check], capture_output=True).returncode == 0


def _has_venv_module() -> bool:
    return importlib.util.find_spec("venv") is not None


def _pinned_like_this_environment(names: Iterable[str]) -> List[str]:
    """``name==version`` for each package this interpreter has (the local-version suffix
    such as ``+cu130`` dropped: PyPI's wheel of that version is the same build)."""
    from importlib import metadata

    pins = []
    for name in names:
        try:
            pins.append(f"{name}=={metadata.version(name).split('+')[0]}")
        except metadata.PackageNotFoundError:
            pins.append(name)
    return pins


def ensure_split(work_dir: Path, source: Path, num_clients: int, alpha: float, seed: int) -> Path:
    """``<work_dir>/splits/n<N>``: the Dirichlet(alpha) CIFAR-10 split for N clients, made once.

    A finished split is marked by ``split.json`` (written last, with the options), so an
    interrupted one is redone rather than used.
    """
    out = work_dir / "splits" / f"cifar10_dirichlet{alpha:g}_seed{seed}_n{num_clients}"
    marker = out / "split.json"
    options = {"clients": num_clients, "alpha": alpha, "seed": seed, "source": str(source)}
    if marker.exists() and json.loads(marker.read_text()) == options:
        return out
    if not source.exists():
        raise FileNotFoundError(f"CIFAR-10 not found at {source} (--source)")
    print(f"splitting CIFAR-10 for {num_clients} clients into {out}", flush=True)
    started = time.perf_counter()
    subprocess.run([sys.executable, str(SPLIT_SCRIPT), "--dataset", "cifar10", "--source", str(source),
                    "--out", str(out), "--clients", str(num_clients), "--partition", "dirichlet",
                    "--alpha", str(alpha), "--seed", str(seed), "--min_client_samples", "1", "--overwrite"],
                   check=True, stdout=subprocess.DEVNULL, env=_project_env())
    marker.write_text(json.dumps(options))
    print(f"split written in {time.perf_counter() - started:.1f} s", flush=True)
    return out


def _project_env() -> Dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


# ----------------------------------------------------------------------------------------
# The two commands
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One benchmark point: N clients, K sampled per round, R rounds."""

    clients: int
    per_round: int
    rounds: int


def fedml_supports_worker_processes() -> bool:
    """Whether the template's command line has ``--worker_processes`` yet (being added on main)."""
    result = subprocess.run([sys.executable, str(TEMPLATE_MAIN), "--help"], capture_output=True, text=True,
                            env=_project_env(), cwd=TEMPLATE_DIR)
    return "--worker_processes" in result.stdout


def fedml_command(case: Case, split: Path, run_dir: Path, opts: argparse.Namespace) -> Tuple[List[str], Dict[str, str]]:
    """This project's side: the template's launcher, as a user runs it; (argv, environment).

    The only place that knows this project's command line. The final test runs after the
    last round only, as Flower's evaluation does; wandb is off (no network here).
    """
    argv = ["sh", str(RUN_SCRIPT), str(case.clients), str(case.per_round), str(case.rounds),
            "--worker_processes", str(opts.worker_processes),
            "--data_path", str(split), "--run_dir", str(run_dir),
            "--in_channels", "3", "--num_classes", "10",
            "--epochs", str(opts.epochs), "--batch_size", str(opts.batch_size), "--lr", str(opts.lr),
            "--frequency_of_the_test", str(case.rounds), "--seed", str(opts.seed), "--wandb_mode", "disabled"]
    env = _project_env()
    venv_bin = str(Path(sys.executable).parent)
    env.update(PYTHON=sys.executable, PATH=venv_bin + os.pathsep + env.get("PATH", ""),
               OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    return argv, env


def flower_command(python: Path, case: Case, split: Path, run_dir: Path,
                   opts: argparse.Namespace) -> Tuple[List[str], Dict[str, str]]:
    """Flower's side: this script's ``flower-child`` under Flower's venv; (argv, environment)."""
    argv = [str(python), str(Path(__file__).resolve()), "flower-child",
            "--data_path", str(split), "--out", str(run_dir),
            "--clients", str(case.clients), "--per_round", str(case.per_round), "--rounds", str(case.rounds),
            "--epochs", str(opts.epochs), "--batch_size", str(opts.batch_size), "--lr", str(opts.lr),
            "--seed", str(opts.seed), "--client_cpus", str(opts.flower_client_cpus)]
    return argv, _project_env()


# ----------------------------------------------------------------------------------------
# Measuring one run: wall time and the process tree's peak memory
# ----------------------------------------------------------------------------------------

_PAGE = os.sysconf("SC_PAGE_SIZE")


def _process_table() -> Dict[int, Tuple[int, int]]:
    """pid -> (parent pid, session id) of every process, from ``/proc/<pid>/stat``."""
    table = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
        except OSError:  # exited meanwhile
            continue
        # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
        fields = stat[stat.rfind(b")") + 2:].split()
        table[int(entry.name)] = (int(fields[1]), int(fields[3]))
    return table


def tree_pids(root: int) -> Set[int]:
    """``root``, its descendants, and every process of its session (``root`` leads one): a
    process that daemonised itself away from the tree but kept the session is counted."""
    table = _process_table()
    children: Dict[int, List[int]] = {}
    for pid, (parent, _) in table.items():
        children.setdefault(parent, []).append(pid)
    found, stack = set(), [root]
    while stack:
        pid = stack.pop()
        if pid in found:
            continue
        found.add(pid)
        stack.extend(children.get(pid, ()))
    found.update(pid for pid, (_, session) in table.items() if session == root)
    return found & set(table)


def _rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/statm", "rb") as f:
        return int(f.read().split()[1]) * _PAGE


def _pss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
        for line in f:
            if line.startswith(b"Pss:"):
                return int(line.split()[1]) * 1024
    return 0


class TreeMemorySampler(threading.Thread):
    """Samples the process tree of ``root`` every ``interval`` s; keeps the peaks of the
    summed RSS and of the summed PSS, and the largest number of processes seen."""

    def __init__(self, root: int, interval: float) -> None:
        super().__init__(daemon=True)
        self.root, self.interval = root, interval
        self.peak_rss = self.peak_pss = self.peak_processes = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.sample()
            self._stop_event.wait(self.interval)

    def sample(self) -> None:
        rss = pss = count = 0
        for pid in tree_pids(self.root):
            try:
                rss += _rss_bytes(pid)
                pss += _pss_bytes(pid)
                count += 1
            except (OSError, ValueError):  # exited between the listing and the read
                continue
        self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)
        self.peak_processes = max(self.peak_processes, count)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


@dataclass
class Measured:
    """What :func:`measure` saw of one command."""

    returncode: int
    started: float  # time.perf_counter() at the start: CLOCK_MONOTONIC, the same in every process
    wall_seconds: float
    peak_rss_bytes: int
    peak_pss_bytes: int
    peak_processes: int
    load_before: Tuple[float, float, float]
    load_after: Tuple[float, float, float]


def measure(argv: Sequence[str], env: Dict[str, str], log_path: Path, timeout: float, interval: float) -> Measured:
    """Run ``argv`` in a session of its own, output to ``log_path``; time it and sample its tree.

    What is left of the session when the command exits (e.g. Ray's daemons on the way
    down) is stopped afterwards, so it neither lingers nor burdens the next run.
    """
    load_before = os.getloadavg()
    with open(log_path, "wb") as log:
        started = time.perf_counter()
        process = subprocess.Popen(list(argv), stdout=log, stderr=subprocess.STDOUT, env=env,
                                   cwd=REPO_ROOT, start_new_session=True)
        sampler = TreeMemorySampler(process.pid, interval)
        sampler.start()
        try:
            returncode = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            returncode = -9
        wall = time.perf_counter() - started
        sampler.stop()
    _stop_session(process.pid)
    return Measured(returncode, started, wall, sampler.peak_rss, sampler.peak_pss, sampler.peak_processes,
                    load_before, os.getloadavg())


def _stop_session(session: int) -> None:
    """SIGKILL whatever is left of the session led by ``session`` (only processes this
    script started are in it), then wait a moment for them to go."""
    import signal

    try:
        os.killpg(session, signal.SIGKILL)
    except ProcessLookupError:
        return
    deadline = time.time() + 10
    while time.time() < deadline and any(s == session for _, s in _process_table().values()):
        time.sleep(0.2)


# ----------------------------------------------------------------------------------------
# Reading each system's results
# ----------------------------------------------------------------------------------------


@dataclass
class RunResult:
    """One run of one system on one case, as results.jsonl stores it."""

    system: str
    clients: int
    per_round: int
    rounds: int
    repeat: int
    status: str  # "completed", "failed: ...", "skipped: ..."
    round_seconds: List[float] = field(default_factory=list)  # per round, final test excluded
    accuracy: Optional[float] = None
    test_seconds: Optional[float] = None  # the final test
    to_first_round_seconds: Optional[float] = None  # command to round 1's start (Flower only)
    wall_seconds: Optional[float] = None
    peak_rss_mib: Optional[float] = None
    peak_pss_mib: Optional[float] = None
    peak_processes: Optional[int] = None
    load_before: Optional[Tuple[float, float, float]] = None
    load_after: Optional[Tuple[float, float, float]] = None
    run_dir: Optional[str] = None
    started_utc: Optional[str] = None

    @property
    def median_round(self) -> Optional[float]:
        """Median over rounds 2..R (round 1 carries each system's start-up)."""
        later = self.round_seconds[1:]
        return statistics.median(later) if later else None


def read_fedml_run(run_dir: Path, result: RunResult, started: float) -> None:
    """This project's per-round seconds (the test phase subtracted), final accuracy and
    test time, from the server's ``metrics.jsonl``."""
    metrics = run_dir / "metrics.jsonl"
    if not metrics.exists():
        return
    for line in metrics.read_text().splitlines():
        record = json.loads(line)
        result.round_seconds.append(record["round_seconds"] - record.get("test_seconds", 0.0))
        if record.get("test"):
            result.accuracy = record["test"].get("accuracy")
            result.test_seconds = record.get("test_seconds")


def read_flower_run(run_dir: Path, result: RunResult, started: float) -> None:
    """Flower's per-round seconds, final accuracy and test time, and the time from the
    command to round 1, from what :func:`flower_server_main` wrote."""
    marks = run_dir / "flower_rounds.jsonl"
    if marks.exists():
        times = [json.loads(line)["time"] for line in marks.read_text().splitlines()]
        result.round_seconds = [later - earlier for earlier, later in zip(times, times[1:])]
        result.to_first_round_seconds = times[0] - started if times else None
    summary = run_dir / "summary.json"
    if summary.exists():
        content = json.loads(summary.read_text())
        result.accuracy = (content.get("final_test") or {}).get("accuracy")
        result.test_seconds = content.get("test_seconds")


def run_one(system: str, case: Case, repeat: int, split: Path, opts: argparse.Namespace,
            flower_py: Optional[Path]) -> RunResult:
    """Run one system on one case and read its results."""
    stamp = datetime.now(timezone.utc)
    run_dir = opts.work_dir / "runs" / f"{stamp:%Y%m%dT%H%M%S}_{system}_n{case.clients}_k{case.per_round}_r{repeat}"
    run_dir.mkdir(parents=True)
    result = RunResult(system, case.clients, case.per_round, case.rounds, repeat, status="completed",
                       run_dir=str(run_dir), started_utc=stamp.isoformat(timespec="seconds"))
    if system == "fedml":
        argv, env = fedml_command(case, split, run_dir, opts)
    else:
        assert flower_py is not None
        argv, env = flower_command(flower_py, case, split, run_dir, opts)
    (run_dir / "command.txt").write_text(" ".join(argv) + "\n")
    print(f"[{stamp:%H:%M:%S}] {system}: N={case.clients} K={case.per_round} R={case.rounds} "
          f"repeat {repeat}, load {os.getloadavg()[0]:.1f}", flush=True)
    measured = measure(argv, env, run_dir / "output.log", opts.timeout, opts.sample_interval)
    reader = read_fedml_run if system == "fedml" else read_flower_run
    reader(run_dir, result, measured.started)
    result.wall_seconds = measured.wall_seconds
    result.peak_rss_mib = measured.peak_rss_bytes / 2**20
    result.peak_pss_mib = measured.peak_pss_bytes / 2**20
    result.peak_processes = measured.peak_processes
    result.load_before, result.load_after = measured.load_before, measured.load_after
    if measured.returncode != 0 or len(result.round_seconds) != case.rounds or result.accuracy is None:
        result.status = (f"failed: exit {measured.returncode}, {len(result.round_seconds)}/{case.rounds} rounds, "
                         f"accuracy {result.accuracy}; see {run_dir / 'output.log'}")
    print(f"    {result.status}; wall {measured.wall_seconds:.1f} s, round {_fmt(result.median_round, '.2f')} s, "
          f"peak RSS {result.peak_rss_mib:.0f} MiB, accuracy {_fmt(result.accuracy, '.4f')}", flush=True)
    return result


# ----------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------


def _fmt(value: Optional[float], spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _median(values: Iterable[Optional[float]]) -> Optional[float]:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def format_table(results: Sequence[RunResult]) -> str:
    """One line per run."""
    header = (f"{'system':<7} {'N':>5} {'K':>4} {'R':>2} {'rep':>3} {'round s':>8} {'round1 s':>8} {'wall s':>8} "
              f"{'test s':>6} {'start s':>7} {'RSS MiB':>8} {'PSS MiB':>8} {'procs':>5} {'accuracy':>8} {'load':>9}  status")
    lines = [header]
    for r in results:
        load = f"{r.load_before[0]:.1f}-{r.load_after[0]:.1f}" if r.load_before and r.load_after else "-"
        lines.append(
            f"{r.system:<7} {r.clients:>5} {r.per_round:>4} {r.rounds:>2} {r.repeat:>3} "
            f"{_fmt(r.median_round, '.2f'):>8} {_fmt(r.round_seconds[0] if r.round_seconds else None, '.2f'):>8} "
            f"{_fmt(r.wall_seconds, '.1f'):>8} {_fmt(r.test_seconds, '.1f'):>6} "
            f"{_fmt(r.to_first_round_seconds, '.1f'):>7} {_fmt(r.peak_rss_mib, '.0f'):>8} {_fmt(r.peak_pss_mib, '.0f'):>8} "
            f"{_fmt(r.peak_processes, 'd'):>5} {_fmt(r.accuracy, '.4f'):>8} {load:>9}  {r.status}")
    return "\n".join(lines)


def format_ratios(results: Sequence[RunResult]) -> str:
    """Per case, medians over the completed repeats: Flower / ours for round and wall time
    (goal: round >= 3), ours / Flower for peak memory (goal: <= 1)."""
    lines = [f"{'N':>5} {'K':>4}  {'round flower/ours':>17} {'wall flower/ours':>16} "
             f"{'RSS ours/flower':>15} {'PSS ours/flower':>15}  goals (round >= 3x, RSS <= 1)"]
    cases = sorted({(r.clients, r.per_round) for r in results})
    for clients, per_round in cases:
        done = {s: [r for r in results if (r.clients, r.per_round, r.system) == (clients, per_round, s)
                    and r.status == "completed"] for s in SYSTEMS}
        if not done["flower"] or not done["fedml"]:
            missing = [s for s in SYSTEMS if not done[s]]
            lines.append(f"{clients:>5} {per_round:>4}  no ratio: no completed run of {', '.join(missing)}")
            continue

        def med(system: str, attribute: str) -> float:
            return _median(getattr(r, attribute) for r in done[system])

        round_ratio = med("flower", "median_round") / med("fedml", "median_round")
        wall_ratio = med("flower", "wall_seconds") / med("fedml", "wall_seconds")
        rss_ratio = med("fedml", "peak_rss_mib") / med("flower", "peak_rss_mib")
        pss_ratio = med("fedml", "peak_pss_mib") / med("flower", "peak_pss_mib")
        verdict = f"round {'met' if round_ratio >= 3 else 'NOT met'}, memory {'met' if rss_ratio <= 1 else 'NOT met'}"
        lines.append(f"{clients:>5} {per_round:>4}  {round_ratio:>17.2f} {wall_ratio:>16.2f} "
                     f"{rss_ratio:>15.2f} {pss_ratio:>15.2f}  {verdict}")
    return "\n".join(lines)


def run_benchmark(opts: argparse.Namespace) -> List[RunResult]:
    """Every case x repeat x system, systems alternating; appends to results.jsonl."""
    opts.work_dir.mkdir(parents=True, exist_ok=True)
    flower_py = flower_python(opts.work_dir) if "flower" in opts.systems else None
    fedml_ready = "fedml" not in opts.systems or fedml_supports_worker_processes()
    results: List[RunResult] = []
    results_path = opts.work_dir / "results.jsonl"
    for clients in opts.clients:
        split: Optional[Path] = None
        for per_round in opts.per_round:
            if per_round > clients:
                continue
            case = Case(clients, per_round, opts.rounds)
            for repeat in range(opts.repeats):
                # Alternate the order so that neither system always runs on a machine the
                # other has just warmed up (page cache, CPU frequency) or loaded.
                order = opts.systems if repeat % 2 == 0 else list(reversed(opts.systems))
                for system in order:
                    if system == "fedml" and not fedml_ready:
                        result = RunResult(system, clients, per_round, opts.rounds, repeat,
                                           status="skipped: main_fedavg.py has no --worker_processes yet "
                                                  f"(N={clients} processes of their own would not fit)")
                        print(f"    fedml: {result.status}", flush=True)
                    else:
                        split = split or ensure_split(opts.work_dir, opts.source, clients, opts.alpha, opts.seed)
                        result = run_one(system, case, repeat, split, opts, flower_py)
                    results.append(result)
                    with open(results_path, "a") as f:
                        f.write(json.dumps({**asdict(result), "median_round": result.median_round}) + "\n")
    return results


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["flower-child"]:
        return flower_child_main(argv[1:])
    opts = build_parser().parse_args(argv)
    if opts.rounds < 2:
        build_parser().error("--rounds must be >= 2 (round time is the median of rounds 2..R)")
    opts.work_dir = opts.work_dir.resolve()
    print(f"bench_scale: {os.cpu_count()} cores, load {os.getloadavg()}, work dir {opts.work_dir}", flush=True)
    results = run_benchmark(opts)
    print("\n" + format_table(results))
    print("\n" + format_ratios(results))
    return 0 if all(r.status == "completed" or r.status.startswith("skipped") for r in results) else 1


# ----------------------------------------------------------------------------------------
# Flower side: runs under Flower's venv (flower-child, and in Ray's workers)
# ----------------------------------------------------------------------------------------


def load_template() -> types.ModuleType:
    """The template's main_fedavg.py as a module, for its ``MyModel`` and ``MyModelTrainer``.

    Its launcher entry point (``fedml_api.distributed.fedavg.experiment``, which needs MPI
    and the rest of the project's environment) is replaced by a stub first: Flower runs the
    federation here, and everything else the file defines is executed as written.
    """
    cached = sys.modules.get("bench_scale_template")
    if cached is not None:
        return cached
    import importlib.util

    stub_name = "fedml_api.distributed.fedavg.experiment"
    if stub_name not in sys.modules:
        stub = types.ModuleType(stub_name)
        stub.run_fedavg_experiment = None  # type: ignore[attr-defined]  # never called here
        sys.modules[stub_name] = stub
    spec = importlib.util.spec_from_file_location("bench_scale_template", TEMPLATE_MAIN)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[spec.name] = module
    return module


def flower_config() -> Dict[str, Any]:
    """The run's settings, from the environment flower-child set before starting Ray."""
    return json.loads(os.environ[FLOWER_CONFIG_ENV])


_TRAINER: Dict[str, Any] = {}


def flower_trainer(config: Dict[str, Any]) -> Any:
    """One ``MyModelTrainer`` per process (each Ray worker keeps its own), as each of this
    project's client processes has one: its model is overwritten by every round's global model."""
    if "trainer" not in _TRAINER:
        template = load_template()
        model = template.MyModel(config["in_channels"], config["num_classes"])
        _TRAINER["trainer"] = template.MyModelTrainer(model, _trainer_args(config))
    return _TRAINER["trainer"]


def _trainer_args(config: Dict[str, Any], round_idx: int = 0) -> argparse.Namespace:
    return argparse.Namespace(lr=config["lr"], epochs=config["epochs"], batch_size=config["batch_size"],
                              in_channels=config["in_channels"], num_classes=config["num_classes"],
                              seed=config["seed"], round_idx=round_idx)


def flower_train(msg: Any, context: Any) -> Any:
    """Flower ClientApp ``train``: node ``partition-id`` p is this project's client p + 1,
    reading ``<data_path>/<p + 1>/train/data.h5`` and trained by ``MyModelTrainer.train``."""
    import torch
    from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

    config = flower_config()
    client_id = int(context.node_config["partition-id"]) + 1
    server_round = int(msg.content["config"]["server-round"])
    train_path = os.path.join(config["data_path"], str(client_id), "train")
    trainer = flower_trainer(config)
    trainer.set_id(client_id - 1)
    trainer.set_model_params(msg.content["arrays"].to_torch_state_dict())
    # As this project's clients do: the batches depend on (seed, round, client) only.
    torch.manual_seed(hash((config["seed"], server_round, client_id)) % 2**31)
    trainer.train(torch.device("cpu"), _trainer_args(config, server_round - 1), train_path)
    content = RecordDict({
        "arrays": ArrayRecord(trainer.get_model_params()),
        "metrics": MetricRecord({"num-examples": trainer.get_local_sample_number(train_path)}),
    })
    return Message(content=content, reply_to=msg)


def evaluate_on_all_clients(trainer: Any, config: Dict[str, Any]) -> Dict[str, Any]:
    """Test the trainer's model on every client's test split and combine the results as this
    project's server does (sample-weighted mean): the accuracy on the whole CIFAR-10 test set."""
    import torch
    from fedml_api.data.client_data import count_client_samples
    from fedml_core.trainer.result_aggregator import WeightedMeanResultAggregator

    args, results = _trainer_args(config), {}
    for client_id in range(1, config["clients"] + 1):
        test_path = os.path.join(config["data_path"], str(client_id), "test")
        results[client_id - 1] = {"result": trainer.test(torch.device("cpu"), args, test_path),
                                  "sample_number": count_client_samples(test_path)}
    return WeightedMeanResultAggregator().aggregate_result(results)


def flower_server_main(grid: Any, context: Any) -> None:
    """Flower ServerApp: message-API FedAvg, fraction_train = K / N, no federated evaluation;
    a timestamp per round, and the final model tested on all clients' test splits."""
    import torch
    from flwr.app import ArrayRecord, MetricRecord
    from flwr.serverapp.strategy import FedAvg

    config = flower_config()
    out = Path(config["out"])
    torch.manual_seed(config["seed"])
    template = load_template()
    model = template.MyModel(config["in_channels"], config["num_classes"])
    evaluator = template.MyModelTrainer(template.MyModel(config["in_channels"], config["num_classes"]))
    final: Dict[str, Any] = {}
    timings: Dict[str, float] = {}

    def evaluate(server_round: int, arrays: Any) -> Optional[Any]:
        # Flower calls this before round 1 (0) and after every round: the time of each
        # call, taken first, marks the round's end, and only the last round is tested.
        with open(out / "flower_rounds.jsonl", "a") as f:
            f.write(json.dumps({"round": server_round, "time": time.perf_counter()}) + "\n")
        if server_round < config["rounds"]:
            return None
        evaluator.set_model_params(arrays.to_torch_state_dict())
        test_started = time.perf_counter()
        final.update(evaluate_on_all_clients(evaluator, config))
        timings["test_seconds"] = time.perf_counter() - test_started
        return MetricRecord({"accuracy": final["accuracy"], "loss": final["loss"]})

    strategy = FedAvg(fraction_train=config["per_round"] / config["clients"], fraction_evaluate=0.0,
                      min_train_nodes=config["per_round"], min_available_nodes=config["clients"])
    strategy.start(grid=grid, initial_arrays=ArrayRecord(model.state_dict()), num_rounds=config["rounds"],
                   evaluate_fn=evaluate)
    (out / "summary.json").write_text(json.dumps({"status": "completed", "final_test": final, **timings}, indent=2))


def flower_client_app() -> Any:
    from flwr.clientapp import ClientApp

    app = ClientApp()
    app.train()(flower_train)
    return app


def flower_server_app() -> Any:
    from flwr.serverapp import ServerApp

    app = ServerApp()
    app.main()(flower_server_main)
    return app


def flower_child_main(argv: Sequence[str]) -> int:
    """``flower-child``: one Flower simulation (run under Flower's venv by :func:`flower_command`)."""
    parser = argparse.ArgumentParser(prog="bench_scale.py flower-child")
    for name, kind in (("data_path", str), ("out", str), ("clients", int), ("per_round", int), ("rounds", int),
                       ("epochs", int), ("batch_size", int), ("lr", float), ("seed", int), ("client_cpus", float)):
        parser.add_argument(f"--{name}", type=kind, required=True)
    args = parser.parse_args(argv)
    config = dict(vars(args), in_channels=3, num_classes=10)
    os.environ[FLOWER_CONFIG_ENV] = json.dumps(config)
    # Ray's workers unpickle the apps' functions by module name: import this file as
    # ``bench_scale`` (its directory is on sys.path, which Flower hands to the workers)
    # so that they refer to bench_scale.flower_train, not to __main__.
    import bench_scale
    from flwr.simulation import run_simulation

    run_simulation(server_app=bench_scale.flower_server_app(), client_app=bench_scale.flower_client_app(),
                   num_supernodes=args.clients,
                   backend_config={"client_resources": {"num_cpus": args.client_cpus, "num_gpus": 0.0}})
    return 0 if (Path(args.out) / "summary.json").exists() else 1


if __name__ == "__main__":
    sys.exit(main())
