"""Everything a run produces, in one run directory.

``<run_dir>/``
    ``server.log``       the server's log
    ``metrics.jsonl``    one JSON object per round (written and flushed as the round ends)
    ``summary.json``     final metrics, rounds, wall time, status, failed clients, rejected updates
    ``final_model.pt``   the final global model's state_dict (``torch.load`` it)
    ``metrics.png``      test metrics per round
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence

import torch

from fedml_api.utils.durable_file import FileWriteError, describe_error
from fedml_api.utils.wandb_setup import wait_for_wandb

# Round summaries are the run's record: logged at INFO whatever the root logger's level.
logger = logging.getLogger(__name__)
logger.setLevel(logging.INFO)

# Numbers that describe the test set rather than the model's quality are not plotted.
_NOT_PLOTTED = {"sample_number", "num_samples"}


class RunRecorder:
    """Writes a run's records to ``run_dir`` and, when a wandb run is active, to wandb.

    A file that cannot be written (e.g. the disk is full) raises
    :class:`~fedml_api.utils.durable_file.FileWriteError` naming it.

    Args:
        run_dir: the run directory (created if missing).
        config: the run's arguments, stored in ``summary.json``.
    """

    def __init__(self, run_dir: str, config: Optional[Mapping[str, Any]] = None,
                 previous_records: Sequence[Mapping[str, Any]] = ()) -> None:
        self.run_dir = run_dir
        self.config = dict(config or {})
        os.makedirs(run_dir, exist_ok=True)
        # A resumed run starts from the records its checkpoint holds.
        self.records: List[Dict[str, Any]] = [dict(r) for r in previous_records]
        #: What :meth:`write_summary` wrote last (None: nothing yet).
        self.summary: Optional[Dict[str, Any]] = None
        self._metrics_path = os.path.join(run_dir, "metrics.jsonl")
        with _writing(self._metrics_path):
            self._metrics = open(self._metrics_path, "w", encoding="utf-8")
            try:
                for record in self.records:
                    self._metrics.write(json.dumps(record) + "\n")
                self._metrics.flush()
            except OSError:
                with contextlib.suppress(OSError):  # what it could not write is still in the checkpoint
                    self._metrics.close()
                raise
        self._log_handler = _RunLogHandler(os.path.join(run_dir, "server.log"), encoding="utf-8")
        self._log_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logging.getLogger().addHandler(self._log_handler)

    def log_round(self, record: Mapping[str, Any]) -> None:
        """Append one round's record (``round``, ``sampled_clients``, timings, ``test``),
        adding the server process's resource use (``server``: RSS, threads, open files)."""
        record = dict(record)
        record["server"] = process_resources()
        self.records.append(record)
        with _writing(self._metrics_path):
            self._metrics.write(json.dumps(record) + "\n")
            self._metrics.flush()
        logger.info("%s", format_round(record, self.config.get("comm_round")))
        wait_for_wandb()  # the framework's own start of it, if any
        wandb = sys.modules.get("wandb")  # logged only if a wandb run was started
        if wandb is not None and getattr(wandb, "run", None) is not None:
            flat = {f"test/{k}": v for k, v in record.get("test", {}).items()}
            flat.update({k: v for k, v in record.items() if isinstance(v, (int, float))})
            wandb.log(flat, step=record["round"])

    def finish(self, final_model: Mapping[str, torch.Tensor], wall_seconds: float,
               failed_clients: Optional[Mapping[int, str]] = None, stopped: Optional[str] = None) -> Dict[str, Any]:
        """Write the final model, ``summary.json`` and the plot; returns the summary
        (see :meth:`write_summary` for ``failed_clients`` and ``stopped``)."""
        final_model_path = os.path.join(self.run_dir, "final_model.pt")
        # Through a Python file: torch.save to a path turns ENOSPC into a bare "unexpected pos".
        with _writing(final_model_path), open(final_model_path, "wb") as f:
            torch.save(dict(final_model), f)
        tested = [r for r in self.records if r.get("test")]
        if tested:
            plot_path = os.path.join(self.run_dir, "metrics.png")
            with _writing(plot_path):
                plot_test_metrics(tested, plot_path)
        summary = self.write_summary(wall_seconds, failed_clients, stopped)  # last: the run's results are complete
        if stopped is None:
            logger.info("run finished in %.1f s; results in %s", wall_seconds, self.run_dir)
        return summary

    def write_summary(self, wall_seconds: float, failed_clients: Optional[Mapping[int, str]] = None,
                      stopped: Optional[str] = None) -> Dict[str, Any]:
        """Write ``summary.json``: rounds done, the last test's metrics, wall time (s),
        ``status`` ("completed", or "stopped" with the reason in ``stopped``), the clients
        out of the run at the end (``failed_clients``: {id: reason}), every rejected update
        (``rejected_updates``: {round: {client: reason}}) and the arguments."""
        last = self.records[-1] if self.records else {}
        summary = {
            "rounds": len(self.records),
            "status": "completed" if stopped is None else "stopped",
            "final_test": last.get("test") or None,
            "wall_seconds": wall_seconds,
            "failed_clients": {str(c): reason for c, reason in sorted((failed_clients or {}).items())},
            "rejected_updates": {str(r["round"]): r["rejected_updates"] for r in self.records if "rejected_updates" in r},
            "config": self.config,
        }
        if stopped is not None:
            summary["stopped"] = stopped
        summary_path = os.path.join(self.run_dir, "summary.json")
        with _writing(summary_path), open(summary_path, "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2, default=str)
        self.summary = summary
        return summary

    def close(self) -> None:
        """Stop writing (idempotent): the last thing the server does with its recorder."""
        if self._metrics.closed:
            return
        # Their buffers can only hold what could not be written (a full disk), which
        # already stopped the run or was reported.
        with contextlib.suppress(OSError):
            self._metrics.close()
        logging.getLogger().removeHandler(self._log_handler)
        with contextlib.suppress(OSError):
            self._log_handler.close()


class _RunLogHandler(logging.FileHandler):
    """``server.log``. A line that cannot be written (a full disk) is reported once, in
    one line on stderr, instead of logging's traceback for every line."""

    _failed = False

    def handleError(self, record: logging.LogRecord) -> None:
        if not self._failed:
            self._failed = True
            sys.stderr.write(f"could not write {self.baseFilename}: {describe_error(sys.exc_info()[1], self.baseFilename)}; "
                             f"some lines will be missing from it\n")


@contextlib.contextmanager
def _writing(path: str) -> Iterator[None]:
    """Turn an OSError raised while writing ``path`` into a FileWriteError naming it."""
    try:
        yield
    except OSError as error:
        raise FileWriteError(f"could not write {path}: {describe_error(error, path)}") from error


def process_resources() -> Dict[str, float]:
    """This process's resident memory (MiB), thread count and open file descriptors."""
    with open("/proc/self/statm") as f:
        resident_pages = int(f.read().split()[1])
    return {
        "rss_mib": round(resident_pages * os.sysconf("SC_PAGE_SIZE") / 2**20, 1),
        "threads": len(os.listdir("/proc/self/task")),
        "open_files": len(os.listdir("/proc/self/fd")),
    }


def format_round(record: Mapping[str, Any], num_rounds: Optional[int] = None) -> str:
    """One log line: round, sampled clients, test metrics, where the time went."""
    of = f"/{num_rounds}" if num_rounds else ""
    parts = [f"round {record['round'] + 1}{of}: clients {record['sampled_clients']}"]
    if "failures" in record:
        parts.append(f"FAILED {sorted(int(c) for c in record['failures'])}")
    if "test" in record:
        # Scalars only: per-class tables stay in metrics.jsonl.
        parts.append(" ".join(f"{k}={_fmt(v)}" for k, v in record["test"].items() if not isinstance(v, (dict, list))))
    times = [(k.removesuffix("_seconds"), record[k]) for k in ("train_seconds", "communication_seconds", "aggregation_seconds", "test_seconds") if k in record]
    parts.append(" ".join(f"{name} {value:.3f}s" for name, value in times))
    return " | ".join(parts)


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def plot_test_metrics(records: List[Mapping[str, Any]], path: str) -> None:
    """One panel per numeric test metric, against the round number (1-based)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k, v in records[-1]["test"].items() if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in _NOT_PLOTTED]
    if not keys:
        return
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.2 * rows), squeeze=False)
    rounds = [r["round"] + 1 for r in records]
    for ax, key in zip(axes.flat, keys):
        ax.plot(rounds, [r["test"].get(key, float("nan")) for r in records], marker="o")
        ax.set_xlabel("round")
        ax.set_title(f"test {key}")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
