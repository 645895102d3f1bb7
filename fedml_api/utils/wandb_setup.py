"""wandb on the server, without prompts and without blocking a run."""
from __future__ import annotations

import logging
import netrc
import os
from argparse import Namespace
from typing import Any, Optional


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
    mode = args.wandb_mode
    if mode == "disabled":
        return None
    if mode == "auto":
        mode = "online" if wandb_logged_in() else "offline"
    os.environ.setdefault("WANDB_SILENT", "true")
    import wandb

    settings = wandb.Settings(init_timeout=60, console="off")
    config = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, type(None)))}
    try:
        return wandb.init(project=project, name=name, dir=args.run_dir, config=config, mode=mode, settings=settings)
    except Exception as error:  # wandb raises several types for network/auth trouble
        if mode != "online":
            raise
        logging.warning("wandb online init failed (%s); logging offline instead", error)
        return wandb.init(project=project, name=name, dir=args.run_dir, config=config, mode="offline", settings=settings)
