"""The server's checkpoint: everything needed to continue a run after its last round.

Written after every round as ``<run_dir>/checkpoint.pt``, atomically (written to a
temporary file, flushed to disk, then renamed over the old one), so a crash at any
moment leaves either the previous or the new checkpoint, never a partial file.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping

import torch

CHECKPOINT_NAME = "checkpoint.pt"
FORMAT_VERSION = 1


@dataclass
class ServerCheckpoint:
    """State of the server after round ``round_idx`` (0-based) completed.

    Attributes:
        round_idx: the last completed round.
        global_model: the global model's state_dict after that round.
        failed_clients: ``{client_id: reason}`` of the clients out of the run.
        records: the per-round records so far (``metrics.jsonl``'s lines).
        seed: the run's seed (the client sampling is a function of seed and round).
        strategy_state: the aggregation strategy's state between rounds (FedAvg: none).
    """

    round_idx: int
    global_model: Dict[str, torch.Tensor]
    failed_clients: Dict[int, str] = field(default_factory=dict)
    records: List[Dict[str, Any]] = field(default_factory=list)
    seed: int = 0
    strategy_state: Dict[str, Any] = field(default_factory=dict)


def save_checkpoint(run_dir: str, checkpoint: ServerCheckpoint) -> str:
    """Atomically write ``checkpoint`` to ``<run_dir>/checkpoint.pt``; returns the path."""
    path = os.path.join(run_dir, CHECKPOINT_NAME)
    temporary = path + ".partial"
    with open(temporary, "wb") as f:
        torch.save({"format": FORMAT_VERSION, **vars(checkpoint)}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)
    directory = os.open(run_dir, os.O_RDONLY)
    try:
        os.fsync(directory)  # make the rename itself durable
    finally:
        os.close(directory)
    return path


def load_checkpoint(path: str) -> ServerCheckpoint:
    """Load a checkpoint from a file or a run directory (its ``checkpoint.pt``)."""
    if os.path.isdir(path):
        path = os.path.join(path, CHECKPOINT_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--resume: no checkpoint at {path} (expected a run directory holding {CHECKPOINT_NAME}, or the file itself)")
    raw = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(raw, dict) or raw.get("format") != FORMAT_VERSION:
        raise ValueError(f"--resume: {path} is not a checkpoint of this framework (format {FORMAT_VERSION})")
    raw.pop("format")
    return ServerCheckpoint(**raw)


def check_same_model(checkpoint: Mapping[str, torch.Tensor], model_state: Mapping[str, torch.Tensor], path: str) -> None:
    """Raise ValueError naming the first tensor where the checkpoint's model differs from ours."""
    for name, tensor in model_state.items():
        if name not in checkpoint:
            raise ValueError(f"--resume: {path} is from another model: it has no tensor {name!r}")
        theirs = checkpoint[name]
        if theirs.dtype != tensor.dtype or theirs.shape != tensor.shape:
            raise ValueError(
                f"--resume: {path} is from another model: tensor {name!r} is {theirs.dtype} {list(theirs.shape)} "
                f"there, {tensor.dtype} {list(tensor.shape)} here"
            )
    extra = sorted(set(checkpoint) - set(model_state))
    if extra:
        raise ValueError(f"--resume: {path} is from another model: unexpected tensors {extra[:5]}")
