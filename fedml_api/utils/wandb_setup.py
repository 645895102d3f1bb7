"""wandb on the server, without prompts and without blocking a run."""
from __future__ import annotations

import logging
import netrc
import os
import threading
from argparse import Namespace
from typing import Any, Callable, Dict, Optional


def wandb_logged_in() -> bool:
    """True when an API key is configured (``WANDB_API_KEY`` or ``wandb login``'s netrc entry)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def init_wandb(args: Namespace, project: str, name: Optional[str] = None) -> Optional[Any]:
    """Start a wandb run per ``args.wandb_mode`` and return it (None when disabled).

    ``auto`` means online when logged in, else offline (files under ``args.run_dir``,
    to ``wandb sync`` later). wandb never prompts: ``WANDB_SILENT`` and a non-interactive
    mode are forced. An online run that cannot reach the server falls back to offline.
    """
    start = _prepare_wandb(args, project, name)
    return None if start is None else start()


def _prepare_wandb(args: Namespace, project: str, name: Optional[str]) -> Optional[Callable[[], Any]]:
    """What :func:`init_wandb` decides at once (the mode, ``WANDB_SILENT``, the config),
    and the start that follows, to call later or on another thread (None: disabled).
    Done on the caller's thread: setting the environment, or reading ``args`` while
    the caller adds to it, is not safe beside another thread."""
    mode = args.wandb_mode
    if mode == "disabled":
        return None
    if mode == "auto":
        mode = "online" if wandb_logged_in() else "offline"
    os.environ.setdefault("WANDB_SILENT", "true")
    config = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, type(None)))}
    run_dir = args.run_dir

    def start() -> Any:
        import wandb

        settings = wandb.Settings(init_timeout=60, console="off")
        try:
            return wandb.init(project=project, name=name, dir=run_dir, config=config, mode=mode, settings=settings)
        except Exception as error:  # wandb raises several types for network/auth trouble
            if mode != "online":
                raise
            logging.warning("wandb online init failed (%s); logging offline instead", error)
            return wandb.init(project=project, name=name, dir=run_dir, config=config, mode="offline", settings=settings)

    return start


_started: Dict[str, Any] = {}  # the background start: its "thread", then its "run" or "error"


def start_wandb(args: Namespace, project: str, name: Optional[str] = None) -> None:
    """:func:`init_wandb` on a thread of its own, so that the run does not wait for it.

    wandb's start (its import, its service process) took 2.4 s on the server of a
    4-client run on 2 cores, while every client waited for the server at its first
    collective (docs/BENCHMARKS.md); it now overlaps the clients' start-up and round
    0. :func:`wait_for_wandb` joins it: the run's first record waits for it, so every
    round reaches wandb.
    """
    _started.clear()
    start_run = _prepare_wandb(args, project, name)
    if start_run is None:
        return

    def start() -> None:
        try:
            _started["run"] = start_run()
        except Exception as error:  # noqa: BLE001 - any failure of wandb's leaves the run to go on
            _started["error"] = error

    # A daemon: a run that ends before its first record (an error) must not wait at exit
    # for a start still trying to reach wandb's server (up to its 60 s init_timeout).
    _started["thread"] = threading.Thread(target=start, name="wandb-start", daemon=True)
    _started["thread"].start()


def wait_for_wandb() -> Optional[Any]:
    """The run :func:`start_wandb` started, once started (None: none was, it is
    disabled, or it failed; a failure is logged once, and the run goes on without
    wandb: ``metrics.jsonl`` holds every round)."""
    thread = _started.pop("thread", None)
    if thread is not None:
        thread.join()
        if "error" in _started:
            error = _started.pop("error")
            logging.error("wandb could not start (%s: %s); the run goes on without it (metrics.jsonl has every round)",
                          type(error).__name__, error)
    return _started.get("run")
