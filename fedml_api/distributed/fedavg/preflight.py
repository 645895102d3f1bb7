"""The launcher's pre-flight: check a run's arguments once, on this machine, before mpirun.

``launch_fedavg.sh`` first runs the experiment's own ``main_fedavg.py`` as one plain
process with ``FEDML_PREFLIGHT=<number of processes>`` in its environment. The main
then parses its arguments with its own parser (so an unknown or misspelt option, a
missing required one or a bad value is reported once, not once per rank, and before
any rank starts), builds its model and trainer, and reaches
``FedML_FedAvg_distributed``, which calls :func:`run_preflight` instead of starting
the federation: the federation arguments, the algorithm against the model, the clients'
data folders (when every process runs on this machine) and the ``--resume`` checkpoint
are checked, and the process exits: status 0 when the run can start, 2 with the reason
otherwise.
"""
from __future__ import annotations

import os
import sys
from argparse import Namespace
from typing import NoReturn, Optional

from fedml_core.trainer.model_trainer import ModelTrainer

PREFLIGHT_ENV = "FEDML_PREFLIGHT"
# Set by the launcher when every process runs on this machine: the data can be checked here.
CHECK_DATA_ENV = "FEDML_PREFLIGHT_CHECK_DATA"


def preflight_process_num() -> Optional[int]:
    """The number of processes the launcher will start, when this process is its
    pre-flight check; None in a real run."""
    value = os.environ.get(PREFLIGHT_ENV)
    return int(value) if value else None


def run_preflight(args: Namespace, model_trainer: ModelTrainer) -> NoReturn:
    """Check what can be checked before any rank starts, then exit (0: the run may start;
    2: the first problem found, printed once)."""
    from fedml_core.aggregation.registry import make_strategy

    from .args import check_federation_args
    from .checkpoint import resolve_resume
    from .FedAVGAggregator import FedAVGAggregator

    try:
        check_federation_args(args)
        if os.environ.get(CHECK_DATA_ENV):
            check_client_data(args.data_path, args.client_num_in_total)
        # As the server will: the algorithm set up with the model (e.g. FedPer's
        # --personal_layers must name some of its layers, not all) and, on --resume, the
        # model and the algorithm's state (e.g. a SCAFFOLD checkpoint resumed with
        # another --federated_optimizer).
        # Without a run directory: the check writes nothing (a resumed run's client states
        # are read where they are, only one of them).
        aggregator = FedAVGAggregator(model_trainer, None, Namespace(**{**vars(args), "run_dir": None}), make_strategy(args))
        if args.resume:  # a damaged checkpoint.pt with an intact spare resumes from the spare (with a warning)
            checkpoint, resume_path = resolve_resume(args.resume)
            aggregator.resume(checkpoint, resume_path)
    except (ValueError, FileNotFoundError, TypeError) as error:  # TypeError: get_model_params' values
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    raise SystemExit(0)


def check_client_data(data_path: str, client_num: int) -> None:
    """Raise FileNotFoundError naming the first client whose ``<data_path>/<id>/train`` or
    ``/test`` folder is missing."""
    for client_id in range(1, client_num + 1):
        for split in ("train", "test"):
            folder = os.path.join(data_path, str(client_id), split)
            if not os.path.isdir(folder):
                raise FileNotFoundError(
                    f"client {client_id} has no data: {folder} is missing (--data_path {data_path}; expected "
                    f"<data_path>/<client_id>/{{train,test}} for client ids 1..{client_num}; make them with scripts/split_dataset.py)")
