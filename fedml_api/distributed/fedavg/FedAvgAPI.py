"""Entry points of distributed FedAvg: what a ``main_fedavg.py`` calls."""
from __future__ import annotations

import atexit
import gc
import logging
import time
from argparse import Namespace
from typing import TYPE_CHECKING, Optional, Tuple

import torch

if TYPE_CHECKING:
    from mpi4py import MPI

from fedml_core.aggregation import AggregationStrategy
from fedml_core.aggregation.client_state import ClientStateWriteError
from fedml_core.aggregation.registry import client_algorithms, make_strategy
from fedml_core.distributed.communication.transport import Transport
from fedml_core.trainer.model_trainer import ModelTrainer, check_trainer
from fedml_core.trainer.result_aggregator import ResultAggregator, check_result_aggregator
from fedml_api.data.client_data import set_cache_budget
from fedml_api.utils.durable_file import FileWriteError, describe_error
from fedml_api.utils.launch_status import report_server_exit, report_server_start
from fedml_api.utils.run_recorder import RunRecorder

from .args import add_args, default_run_dir, fill_federation_defaults, process_count
from .FedAVGAggregator import FedAVGAggregator
from .FedAVGTrainer import FedAVGTrainer, UserCodeError
from .FedAvgClientManager import FedAVGClientManager, ServerLost, report_failure
from .checkpoint import SPARE_SUFFIX, resolve_resume
from .preflight import preflight_process_num, run_preflight
from .FedAvgPoolServerManager import FedAvgPoolServerManager
from .FedAvgServerManager import FederationError, FedAVGServerManager, release_clients
from .FedAvgWorkerManager import FedAvgWorkerManager

__all__ = ["FedML_init", "FedML_FedAvg_distributed", "add_args", "init_server", "init_client"]


def FedML_init() -> Tuple["MPI.Comm", int, int]:
    """Initialise MPI; returns ``(comm, process_id, worker_number)``, where
    ``worker_number`` is the number of processes (the server plus CLIENT_NUM clients).

    In the launcher's pre-flight check (see :mod:`.preflight`) this process is alone
    (MPI runs as a singleton) and stands for process 0 of the run to come.
    """
    from mpi4py import MPI

    # At exit, after the exit handlers registered later (the run's, wandb's: they see
    # the heap as usual), the objects left are frozen: the interpreter's teardown then
    # skips garbage-collecting torch's objects, which takes ~1 s per process while the
    # other ranks wait in MPI_Finalize (mpi4py finalizes MPI after the teardown).
    atexit.register(gc.freeze)
    comm = MPI.COMM_WORLD
    preflight = preflight_process_num()
    if preflight is not None:
        return comm, 0, preflight
    return comm, comm.Get_rank(), comm.Get_size()


def FedML_FedAvg_distributed(
    process_id: int,
    worker_number: int,
    device: torch.device,
    comm,
    model: torch.nn.Module,
    args: Namespace,
    train_path: str,
    test_path: str,
    result_aggregator: ResultAggregator,
    model_trainer: Optional[ModelTrainer] = None,
    transport: Optional[Transport] = None,
    strategy: Optional[AggregationStrategy] = None,
) -> None:
    """Run this process's part of FedAvg: the server on process 0, a client elsewhere.

    Returns when the run is over (after ``args.comm_round`` rounds).

    Args:
        process_id: this process's rank; 0 is the server, 1..CLIENT_NUM are clients
            (with ``--worker_processes P``: 1..P are workers, each serving many clients).
        worker_number: number of processes (CLIENT_NUM + 1, or P + 1).
        device: where this process trains and tests.
        comm: the MPI communicator from :func:`FedML_init` (unused if ``transport`` is given).
        model: the model; the same architecture on every process.
        args: run arguments (see ``fedml_api.distributed.fedavg.args.add_federation_args``,
            exported here as ``add_args``); a federation option ``args`` lacks is set to its
            default (and logged), so a main that parses only its own options runs too.
        train_path, test_path: this client's data (``<data_path>/<process_id>/train|test``);
            unused with ``--worker_processes``, whose workers serve client ``c`` from
            ``<data_path>/<c>/train|test``.
        result_aggregator: combines the clients' test metrics on the server; needs
            ``aggregate_result(result_dict)`` or ``aggregate_test_result(round_idx, result_dict)``.
        model_trainer: the user's ModelTrainer around ``model`` (required). On a client its
            ``set_id(process_id - 1)`` is called before anything else.
        transport: overrides the MPI transport (e.g. an in-process one for tests).
        strategy: the federated algorithm (default: the one ``args.federated_optimizer``
            names, FedAvg without it); pass an equal one on every process: the server
            runs it, each client runs its ``client_algorithm(args)``.

    Raises TypeError, on every process before any work, when the trainer or the result
    aggregator lacks a method the run will call (naming the class and the method).
    """
    if model_trainer is None:
        raise ValueError("model_trainer is required: pass an instance of your ModelTrainer subclass built around `model`")
    check_trainer(model_trainer)
    check_result_aggregator(result_aggregator)
    filled = fill_federation_defaults(args, worker_number)
    if filled and process_id == 0:
        logging.info("federation options missing from the arguments, set to their defaults: %s",
                     ", ".join(f"{name}={getattr(args, name)!r}" for name in filled))
    if worker_number != process_count(args):
        raise ValueError(
            f"{worker_number} processes run, but --worker_processes {args.worker_processes} takes {process_count(args)} "
            f"(the server and {args.worker_processes} workers)" if args.worker_processes is not None else
            f"{worker_number} processes run, which means {worker_number - 1} clients, but "
            f"--client_num_in_total is {args.client_num_in_total}; launch CLIENT_NUM + 1 processes"
        )
    if preflight_process_num() is not None:
        run_preflight(args, model_trainer)
    if transport is None:
        from fedml_core.distributed.communication.mpi_transport import MpiTransport

        transport = MpiTransport(comm)
    if strategy is None:
        strategy = make_strategy(args)
    if process_id == 0:
        init_server(args, device, transport, model, model_trainer, result_aggregator, strategy)
    elif args.worker_processes is not None:
        init_worker(args, device, transport, model_trainer, strategy)
    else:
        init_client(args, device, transport, process_id, model_trainer, train_path, test_path, strategy)


def init_server(args: Namespace, device: torch.device, transport: Transport, model: torch.nn.Module, model_trainer: ModelTrainer,
                result_aggregator: ResultAggregator, strategy: Optional[AggregationStrategy] = None) -> None:
    """Build the aggregator and server manager (from ``args.resume``'s checkpoint if
    given), then run the rounds.

    A run that cannot go on or did not succeed (too few clients, a bad checkpoint, a file
    of the run that cannot be written, e.g. on a full disk, no final test metrics, an
    exception in the server's own code) releases the clients, writes ``summary.json``
    with the reason, logs ``FedAvg stopped: <reason>`` as its last line and exits with
    status 1 (``SystemExit``).
    """
    report_server_start()
    start = time.perf_counter()
    args.run_dir = args.run_dir or default_run_dir()
    checkpoint = None
    recorder = None
    manager = None
    status = 1
    try:
        # In here: a strategy's setup or the trainer's get_model_params may raise.
        aggregator = FedAVGAggregator(model_trainer, result_aggregator, args, strategy)
        if args.resume:
            checkpoint, resume_path = resolve_resume(args.resume)
            aggregator.resume(checkpoint, resume_path)
        recorder = RunRecorder(args.run_dir, config=vars(args), previous_records=checkpoint.records if checkpoint else ())
        # Logged once server.log is open, so that it says which file the run continued from.
        if checkpoint is not None and resume_path.endswith(SPARE_SUFFIX):
            logging.warning("server: resuming from the spare %s after round %d: %s is damaged or truncated",
                            resume_path, checkpoint.round_idx, resume_path.removesuffix(SPARE_SUFFIX))
        elif checkpoint is not None:
            logging.info("server: resuming %s after round %d", resume_path, checkpoint.round_idx)
        manager_class = FedAVGServerManager if args.worker_processes is None else FedAvgPoolServerManager
        manager = manager_class(args, aggregator, transport, recorder, resume_from=checkpoint)
        manager.run()
        status = 0
    except Exception as error:
        if isinstance(error, ClientStateWriteError):
            reason = f"could not write {error.filename}: {describe_error(error, error.filename)}"
        elif isinstance(error, (FederationError, ValueError, FileNotFoundError, FileWriteError)):
            reason = str(error)
        else:  # a bug, in the framework or in the server's user code (e.g. the ResultAggregator)
            logging.exception("server: unexpected error")
            reason = f"{type(error).__name__}: {error}"
        if manager is None:  # failed before the run started: the clients still wait for us
            release_clients(transport, process_count(args) - 1)
        if recorder is not None and recorder.summary is None:
            try:
                recorder.write_summary(time.perf_counter() - start, manager.failed if manager else None, stopped=reason)
            except FileWriteError as summary_error:  # the full disk that stopped the run, say
                logging.error("server: %s", summary_error)
        logging.error("FedAvg stopped: %s", reason)
        raise SystemExit(f"FedAvg stopped: {reason}") from None
    finally:
        if recorder is not None:
            recorder.close()
        report_server_exit(status)
        transport.close(status)


def init_client(args: Namespace, device: torch.device, transport: Transport, process_id: int, model_trainer: ModelTrainer, train_path: str, test_path: str,
                strategy: Optional[AggregationStrategy] = None) -> None:
    """Build this client's trainer (with ``strategy``'s client part) and manager, then
    serve the server until it finishes.

    Any exception in the user's code (or ours) is reported to the server, which records
    it as this client's failure and goes on without it; this process then exits with
    status 1 (``SystemExit``) instead of waiting for a run it has left.
    """
    status, finalize = 1, False
    try:
        # FineFL's trainers know their client by self.id (the client_idx, from 0); a
        # trainer that does not derive from ModelTrainer may have no set_id.
        if callable(getattr(model_trainer, "set_id", None)):
            model_trainer.set_id(process_id - 1)
        strategy = strategy if strategy is not None else make_strategy(args)
        trainer = FedAVGTrainer(process_id, train_path, test_path, device, args, model_trainer,
                                client_algorithms(args, strategy, process_id))
        manager = FedAVGClientManager(args, trainer, transport, strategy.name)
        manager.run()
        status, finalize = 0, manager.finalize
    except ServerLost:
        raise
    except Exception as error:
        reason = str(error) if isinstance(error, UserCodeError) else f"{type(error).__name__}: {error}"
        logging.exception("client %d: stopping: %s", process_id, reason)
        report_failure(transport, reason)
        # The process exits 0 under MPI: once one rank has exited non-zero, Open MPI ends
        # the whole job (the server included) when the next rank exits. The failure is
        # the server's to record and report; the run's exit status is the server's.
        status = 0
        raise SystemExit(f"client {process_id} stopped: {reason}") from None
    finally:
        transport.close(status, finalize=finalize)


def init_worker(args: Namespace, device: torch.device, transport: Transport, model_trainer: ModelTrainer,
                strategy: Optional[AggregationStrategy] = None) -> None:
    """Serve the clients the server assigns this worker process (``--worker_processes``)
    until it finishes. Errors in a client's user code fail that client only; any other
    error is reported to the server (which fails this worker's clients of the round)
    and ends this process, as :func:`init_client` does."""
    status, finalize = 1, False
    try:
        if args.client_cache_mb is not None:
            set_cache_budget(int(args.client_cache_mb * 2**20))
        manager = FedAvgWorkerManager(args, transport, model_trainer, device,
                                      strategy if strategy is not None else make_strategy(args))
        manager.run()
        status, finalize = 0, manager.finalize
    except ServerLost:
        raise
    except Exception as error:
        reason = f"{type(error).__name__}: {error}"
        logging.exception("worker %d: stopping: %s", transport.rank, reason)
        report_failure(transport, reason)
        status = 0  # as init_client's: the server records the failure and reports the run's status
        raise SystemExit(f"worker {transport.rank} stopped: {reason}") from None
    finally:
        transport.close(status, finalize=finalize)
