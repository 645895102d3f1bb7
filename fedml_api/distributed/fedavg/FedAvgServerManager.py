"""The server's message handlers for FedAvg: drives the rounds, survives failed clients."""
from __future__ import annotations

import logging
import time
from argparse import Namespace
from typing import Any, Dict, FrozenSet, List, Optional

from fedml_core.aggregation import ClientInstructions, InvalidUpdate, check_layout
from fedml_core.distributed.communication.message import Message
from fedml_core.distributed.communication.transport import PeerFailure, Transport
from fedml_core.distributed.server.server_manager import ServerManager

from .algorithm_messages import received_tensors, tensors_message
from .args import resolve_min_clients
from .checkpoint import CheckpointWriter, ServerCheckpoint
from .FedAVGAggregator import FedAVGAggregator
from .message_define import MyMessage

# How long the final "finish" messages may take to reach the clients.
FINISH_SEND_TIMEOUT = 5.0


class FederationError(RuntimeError):
    """The run cannot go on (e.g. too few clients left); the checkpoint is kept."""


class FedAVGServerManager(ServerManager):
    """Runs ``args.comm_round`` rounds of FedAvg, then tells every client to finish.

    Each round: send the global model to the sampled clients, aggregate their replies,
    and on test rounds (every ``args.frequency_of_the_test`` rounds and after the
    last one) have every client test the new model and combine the metrics. After every
    round (every ``args.checkpoint_every`` rounds, and after the last) a checkpoint is
    written, in the background; the last one is on disk before the run ends, whether it
    completes or stops.

    Failures: a client that dies (reported by the transport), reports that its code
    raised (``C2S_CLIENT_FAILED``), does not answer within ``args.round_timeout``
    seconds, or cannot be sent to, is marked failed and left out of later rounds; the round is aggregated from the updates that arrived if there are
    at least ``min_clients`` of them, else the run stops with :class:`FederationError`.
    A failed client that later sends anything is known to be back and may be sampled
    again. An update with the wrong tensors (on arrival) or non-finite values (while
    aggregating) is rejected and the round goes on without it.

    The first phase in which a client trains (and the first in which it tests) carries
    its one-time costs (first passes, data loading, allocations): such a phase waits
    ``args.startup_timeout`` seconds longer than ``args.round_timeout``, so a timeout set
    from the steady rounds does not fail every client in round 0.

    The run succeeds (:meth:`run` returns) only when every round ran and the final test
    produced metrics; otherwise it raises :class:`FederationError` saying why, after
    writing what it has (checkpoint, summary).

    Args:
        args: needs ``comm_round``, ``frequency_of_the_test``, ``checkpoint_every``, ``client_num_in_total``,
            ``client_num_per_round``, ``round_timeout`` (None: wait forever),
            ``min_clients_per_round``, ``run_dir``, ``shared_memory`` (``"on"``: accept lent updates).
        aggregator: the server's :class:`FedAVGAggregator`.
        transport: moves the messages.
        recorder: receives one record per round and the final model (a ``RunRecorder``).
        resume_from: continue after this checkpoint's round instead of starting at 0.
    """

    #: What each process other than the server is, in log lines and records.
    process_noun = "client"

    def __init__(self, args: Namespace, aggregator: FedAVGAggregator, transport: Transport, recorder,
                 resume_from: Optional[ServerCheckpoint] = None) -> None:
        super().__init__(args, transport)
        self.aggregator = aggregator
        self.recorder = recorder
        self.round_num = args.comm_round
        self.round_timeout: Optional[float] = args.round_timeout
        self.min_clients = resolve_min_clients(args.min_clients_per_round, args.client_num_per_round)
        self.clients = list(range(1, args.client_num_in_total + 1))
        self.failed: Dict[int, str] = {}
        self.round_idx = 0
        if resume_from is not None:
            self.round_idx = resume_from.round_idx + 1
            self.failed = dict(resume_from.failed_clients)
        self._phase = "idle"
        self._waiting: set = set()
        self._record: Dict[str, Any] = {}
        self._accepted = 0
        self._train_seconds: List[float] = []
        self._test_results: Dict[int, Dict[str, Any]] = {}
        self._update_tensors: Dict[int, Any] = {}  # client: extra tensors sent before its update
        self._round_start = self._phase_start = 0.0
        # Clients that have been in a training / test phase of this server process.
        self._started: Dict[str, set] = {"train": set(), "test": set()}
        self._phase_has_allowance = False
        self._released = False
        self._run_start = time.perf_counter()
        self.checkpoints = CheckpointWriter(args.run_dir)
        if args.shared_memory == "on":
            # Each update is aggregated, or rejected, before its client is sent anything.
            transport.accept_lent_tensors()

    def register_message_receive_handlers(self) -> None:
        self.register_message_receive_handler(MyMessage.MSG_TYPE_C2S_CLIENT_READY, self.handle_message_client_ready)
        self.register_message_receive_handler(MyMessage.MSG_TYPE_C2S_SEND_MODEL_TO_SERVER, self.handle_message_receive_model_from_client)
        self.register_message_receive_handler(MyMessage.MSG_TYPE_C2S_SEND_TEST_RESULT, self.handle_message_receive_test_result)
        self.register_message_receive_handler(MyMessage.MSG_TYPE_C2S_CLIENT_FAILED, self.handle_message_client_failed)
        self.register_message_receive_handler(MyMessage.MSG_TYPE_C2S_UPDATE_TENSORS, self.handle_message_receive_update_tensors)
        self.register_message_receive_handler(MyMessage.MSG_TYPE_C2S_CLIENT_STATE, self.handle_message_receive_client_state)

    def run(self) -> None:
        try:
            if self.round_idx >= self.round_num:
                raise FederationError(f"nothing to do: the checkpoint already holds all {self.round_num} rounds")
            self.send_init_msg()
            super().run()
        except BaseException:
            self._release_clients()  # let them exit instead of waiting for us forever
            self._flush_checkpoints()
            raise

    def available_clients(self) -> List[int]:
        return [c for c in self.clients if c not in self.failed]

    # -- start-up ----------------------------------------------------------------
    def send_init_msg(self) -> None:
        """Wait for every available client to report ready, then start the first round.

        Start-up (importing torch, loading data) can take much longer than a round, so
        it has its own deadline, ``args.startup_timeout``, instead of the round timeout.
        """
        self._phase = "startup"
        self._waiting = set(self.available_clients())
        self.deadline = None if self.args.startup_timeout is None else time.monotonic() + self.args.startup_timeout

    def handle_message_client_ready(self, msg: Message) -> None:
        sender = msg.get_sender_id()
        if self._phase != "startup":
            # Ready only after we gave up on it: it is back for later rounds.
            self.failed.pop(sender, None)
            return
        self._waiting.discard(sender)
        self._maybe_end_phase()

    # -- training phase ----------------------------------------------------------

    def _start_round(self) -> None:
        candidates = self.available_clients()
        if len(candidates) < self.min_clients:
            raise FederationError(
                f"round {self.round_idx}: only {len(candidates)} clients left ({candidates}), fewer than "
                f"--min_clients_per_round={self.min_clients}; failed: {self.failed}"
            )
        sampled = self.aggregator.client_sampling(self.round_idx, candidates)
        # Failures seen since the last round ended (e.g. at start-up) stay in this record.
        self._record = {"round": self.round_idx, "sampled_clients": sampled, **self._record}
        self._accepted = 0
        self._train_seconds = []
        self._update_tensors = {}
        self._round_start = time.perf_counter()
        self._begin_phase("train", sampled, MyMessage.MSG_TYPE_S2C_SYNC_MODEL_TO_CLIENT)

    def handle_message_receive_model_from_client(self, msg: Message) -> None:
        sender = msg.get_sender_id()
        if not self._expected(msg, "train"):
            return
        extra = self._update_tensors.pop(sender, None)  # released with the update if that is rejected
        try:
            check_layout(self.aggregator.global_model, msg.packed)
            num_samples = int(msg.get(MyMessage.MSG_ARG_KEY_NUM_SAMPLES))
            self.aggregator.add_local_trained_result(sender, msg.packed, num_samples, extra,
                                                     msg.params.get(MyMessage.MSG_ARG_KEY_METADATA))
        except (InvalidUpdate, ValueError) as error:
            self._reject_update(sender, str(error))
        else:
            self._accepted += 1
            self._train_seconds.append(float(msg.get(MyMessage.MSG_ARG_KEY_TRAIN_SECONDS)))
        self._waiting.discard(sender)
        self._maybe_end_phase()

    def handle_message_receive_update_tensors(self, msg: Message) -> None:
        """Keep the extra tensors a client sends just before its update."""
        if self._expected(msg, "train"):
            try:
                self._update_tensors[msg.get_sender_id()] = received_tensors(msg)
            except ValueError as error:
                self._reject_update(msg.get_sender_id(), str(error))

    def handle_message_receive_client_state(self, msg: Message) -> None:
        """Hold the trainer state a client sends just before its update (kept if the update is used)."""
        if self._expected(msg, "train"):
            self._hold_client_state(msg.get_sender_id(), msg)

    def _hold_client_state(self, client_id: int, msg: Message) -> None:
        try:
            # Copied: held until the round ends, it would keep the transport's receive buffer.
            self.aggregator.hold_client_state(client_id, received_tensors(msg).copy_tensors())
        except ValueError as error:  # not what the framework sends; the update itself may still be used
            logging.error("server: round %d: ignored the client state of client %d (its last one stays): %s",
                          self.round_idx, client_id, error)

    def _reject_update(self, client_id: int, reason: str) -> None:
        logging.error("server: round %d: rejected the update of client %d: %s", self.round_idx, client_id, reason)
        self._record.setdefault("rejected_updates", {})[str(client_id)] = reason

    def _end_training_phase(self) -> None:
        self._require_usable_updates(self._accepted)
        updates_in = time.perf_counter()
        try:
            rejected = self.aggregator.aggregate(self.round_idx)
        except ValueError as error:  # every update rejected
            raise FederationError(f"round {self.round_idx}: cannot aggregate: {error}") from None
        for client_id, reason in sorted(rejected.items()):
            self._reject_update(client_id, reason)
        # Fewer than min_clients finite updates: the aggregate is not checkpointed.
        self._require_usable_updates(self._accepted - len(rejected))
        self.aggregator.keep_client_states(self.round_idx, {int(client) for key in ("rejected_updates", "failures")
                                                            for client in self._record.get(key, {})})
        aggregated = time.perf_counter()
        self._record.update(self.aggregator.strategy.round_metrics())
        slowest_training = max(self._train_seconds, default=0.0)
        self._record.update(
            train_seconds=slowest_training,
            communication_seconds=max(0.0, updates_in - self._round_start - slowest_training),
            aggregation_seconds=aggregated - updates_in,
        )
        if self._is_test_round():
            self._test_results = {}
            self._begin_phase("test", self.aggregator.test_sampling(self.round_idx, self.available_clients()),
                              MyMessage.MSG_TYPE_S2C_TEST_MODEL)
        else:
            self._end_round()

    def _require_usable_updates(self, count: int) -> None:
        if count < self.min_clients:
            raise FederationError(
                f"round {self.round_idx}: {count} usable updates, fewer than "
                f"--min_clients_per_round={self.min_clients}; failed: {self.failed}"
            )

    # -- test phase --------------------------------------------------------------
    def _is_test_round(self) -> bool:
        return (self.round_idx + 1) % self.args.frequency_of_the_test == 0 or self.round_idx == self.round_num - 1

    def handle_message_receive_test_result(self, msg: Message) -> None:
        sender = msg.get_sender_id()
        if not self._expected(msg, "test"):
            return
        self._waiting.discard(sender)
        self._test_results[sender] = {
            "result": msg.get(MyMessage.MSG_ARG_KEY_TEST_RESULT),
            "sample_number": int(msg.get(MyMessage.MSG_ARG_KEY_NUM_SAMPLES)),
        }
        self._maybe_end_phase()

    def _end_test_phase(self) -> None:
        if self._test_results:
            self._record["test"] = self.aggregator.aggregate_test_results(self.round_idx, self._test_results)
            self._record["tested_clients"] = sorted(self._test_results)
        else:
            self._record["test_error"] = f"no client returned a test result (failed clients: {sorted(self.failed)})"
        self._record["test_seconds"] = time.perf_counter() - self._phase_start
        self._end_round()

    # -- phases, deadlines, failures ---------------------------------------------
    def _begin_phase(self, phase: str, clients: List[int], msg_type: int) -> None:
        """Send the global model to ``clients`` and wait for their replies (with a deadline)."""
        self._open_phase(phase, clients)
        instructions = self._instructions(phase, clients)
        messages = []
        for client_id in clients:
            if client_id in self.failed:
                continue
            messages.extend(self._client_messages(phase, client_id, client_id, instructions.get(client_id)))
            message = Message(msg_type, self.rank, client_id)
            message.add_params(MyMessage.MSG_ARG_KEY_ROUND_INDEX, self.round_idx)
            if client_id in instructions:
                message.add_params(MyMessage.MSG_ARG_KEY_CONFIG, instructions[client_id].config)
            message.set_packed(self.aggregator.global_model)
            messages.append(message)
        self._send_phase(messages)

    def _instructions(self, phase: str, clients: List[int]) -> Dict[int, ClientInstructions]:
        """The algorithm's instructions for the clients of a training or test phase."""
        if phase == "train":
            return self.aggregator.configure_round(self.round_idx, clients)
        return self.aggregator.configure_test(self.round_idx, clients)

    def _client_messages(self, phase: str, client_id: int, receiver: int, instructions: Optional[ClientInstructions]) -> List[Message]:
        """What goes to ``receiver`` (the client, or the worker serving it) just before
        ``client_id``'s work of ``phase`` (messages keep their order): the algorithm's
        extra tensors, and for training the trainer state kept for the client."""
        parts = [(MyMessage.MSG_TYPE_S2C_ROUND_TENSORS, instructions.tensors if instructions is not None else None)]
        if phase == "train":
            parts.append((MyMessage.MSG_TYPE_S2C_CLIENT_STATE, self.aggregator.client_state(client_id)))
        messages = []
        for msg_type, tensors in parts:
            if tensors:
                message = tensors_message(msg_type, self.rank, receiver, self.round_idx, tensors)
                message.add_params(MyMessage.MSG_ARG_KEY_CLIENT, client_id)  # a worker serves many
                messages.append(message)
        return messages

    def _send_phase(self, messages: List[Message]) -> None:
        """Send a phase's messages, then end the phase if no reply is awaited. Concurrent
        sends: a frozen process holds up nobody but itself, and is failed."""
        for rank, error in self.transport.send_many(messages, timeout=self.round_timeout).items():
            self._process_failed(rank, "its process died" if isinstance(error, PeerFailure) else f"could not be sent the model: {error}")
        self._maybe_end_phase()

    def _open_phase(self, phase: str, ranks: List[int]) -> None:
        """Start waiting for the replies of ``ranks`` in ``phase``, with the phase's deadline."""
        self._phase = phase
        self._waiting = set(ranks)
        self._phase_start = time.perf_counter()
        self._phase_has_allowance = not self._started[phase].issuperset(ranks)
        self._started[phase].update(ranks)
        if self.round_timeout is None:
            self.deadline = None
        else:
            allowance = (self.args.startup_timeout or 0.0) if self._phase_has_allowance else 0.0
            self.deadline = time.monotonic() + self.round_timeout + allowance

    def _maybe_end_phase(self) -> None:
        if self._waiting:
            return
        phase, self._phase, self.deadline = self._phase, "idle", None
        if phase == "startup":
            ready = len(self.available_clients())
            logging.info("server: %s clients ready %.2f s after the server started; round %d starts",
                         f"all {ready}" if ready == len(self.clients) else f"{ready} of {len(self.clients)}",
                         time.perf_counter() - self._run_start, self.round_idx + 1)
            self._start_round()
        elif phase == "train":
            self._end_training_phase()
        elif phase == "test":
            self._end_test_phase()

    def _expected(self, msg: Message, phase: str) -> bool:
        """True if ``msg`` is a reply the current phase waits for; otherwise it is stale
        (a late reply from a timed-out client), which still proves its sender is alive."""
        sender = msg.get_sender_id()
        if self._phase == phase and msg.get(MyMessage.MSG_ARG_KEY_ROUND_INDEX) == self.round_idx and sender in self._waiting:
            return True
        given_up = self._given_up_on()
        if sender in given_up:
            logging.warning("server: %s %d is back (late reply for round %s); it may be given work again",
                            self.process_noun, sender, msg.get(MyMessage.MSG_ARG_KEY_ROUND_INDEX))
            del given_up[sender]
            self._record.setdefault(f"recovered_{self.process_noun}s", []).append(sender)
        else:
            logging.warning("server: ignoring an unexpected message from %s %d", self.process_noun, sender)
        return False

    def _given_up_on(self) -> Dict[int, str]:
        """The processes marked failed (here: clients), which a late reply brings back."""
        return self.failed

    def handle_message_client_failed(self, msg: Message) -> None:
        """A client's code raised: it stops. Record why and let it go (it waits for this
        finish message so that its report is not lost)."""
        sender = msg.get_sender_id()
        release_clients(self.transport, [sender], finalize=False)
        self.failed.pop(sender, None)  # e.g. timed out before: the report says what really happened
        self._process_failed(sender, str(msg.get(MyMessage.MSG_ARG_KEY_ERROR)))
        self._maybe_end_phase()

    def on_deadline(self) -> None:
        if self._phase == "startup":
            reason = f"not ready within --startup_timeout={self.args.startup_timeout} s"
        elif self._phase_has_allowance:
            reason = (f"no reply within --round_timeout={self.round_timeout} s "
                      f"(+ --startup_timeout={self.args.startup_timeout} s for a first {self._phase})")
        else:
            reason = f"no reply within --round_timeout={self.round_timeout} s"
        for client_id in sorted(self._waiting):
            self._process_failed(client_id, reason)
        self._maybe_end_phase()

    def on_peer_failure(self, ranks: FrozenSet[int]) -> None:
        for client_id in sorted(ranks):
            self._process_failed(client_id, "its process died")
        self._maybe_end_phase()

    def _process_failed(self, client_id: int, reason: str) -> None:
        """Process ``client_id`` failed (died, timed out, could not be sent to, reported
        an error): here each process is one client, which is left out of later rounds."""
        if client_id in self.failed:
            return
        logging.error("server: round %d: client %d failed: %s", self.round_idx, client_id, reason)
        self.failed[client_id] = reason
        self.transport.abandon(client_id)
        self._record.setdefault("failures", {})[str(client_id)] = reason
        self._waiting.discard(client_id)

    # -- bookkeeping -------------------------------------------------------------
    def _end_round(self) -> None:
        self._record["round_seconds"] = time.perf_counter() - self._round_start
        if self.failed:
            self._record["failed_clients"] = sorted(self.failed)
        self.recorder.log_round(self._record)
        self._record = {}
        if (self.round_idx + 1) % self.args.checkpoint_every == 0 or self.round_idx == self.round_num - 1:
            self._checkpoint()
        self.round_idx += 1
        if self.round_idx < self.round_num:
            self._start_round()
        else:
            self._finish_run()

    def _checkpoint(self) -> None:
        # Written in the background from what the round left: the aggregate is never
        # modified (the next one is built in other memory) and is written from where it
        # is; the rest is copied now.
        model, round_idx, failed, records = self.aggregator.global_model, self.round_idx, dict(self.failed), list(self.recorder.records)
        # The strategy builds new state tensors every round (its contract): these stay as they are.
        strategy_state = self.aggregator.strategy.state_dict()
        client_states = self.aggregator.client_states_snapshot()
        self.checkpoints.submit(lambda: ServerCheckpoint(
            round_idx=round_idx, global_model=model.tensors(), failed_clients=failed, records=records, seed=self.args.seed,
            strategy_state=strategy_state, client_states=client_states,
        ))

    def _finish_run(self) -> None:
        self._release_clients()
        self.checkpoints.close()
        final = self.recorder.records[-1]
        problem = None if final.get("test") else final.get("test_error", "the ResultAggregator returned no metrics")
        self.recorder.finish(self.aggregator.global_model_state(), wall_seconds=time.perf_counter() - self._run_start,
                             failed_clients=self.failed,
                             stopped=None if problem is None else f"the final test produced no metrics: {problem}")
        self.finish()
        if problem is not None:
            raise FederationError(f"all {self.round_num} rounds ran, but the final test produced no metrics: {problem}")

    def _flush_checkpoints(self) -> None:
        """Let the last round's checkpoint reach the disk before the run stops."""
        try:
            self.checkpoints.close()
        except RuntimeError as error:
            logging.error("server: %s", error)

    def _release_clients(self) -> None:
        # Failed clients too: one that was only slow must not wait for us forever. The
        # message is tiny, so a send to a frozen peer completes locally; a dead one fails fast.
        if not self._released:
            self._released = True
            release_clients(self.transport, self.clients)


def release_clients(transport: Transport, clients, finalize: Optional[bool] = None) -> None:
    """Tell ``clients`` (ids, or a count meaning 1..count) to finish; best effort, bounded time.

    ``finalize``: whether they may end with the job-wide shutdown handshake; by default
    whether this process may (:meth:`Transport.can_finalize`), since all must agree.
    """
    ids = range(1, clients + 1) if isinstance(clients, int) else clients
    if finalize is None:
        finalize = transport.can_finalize()
    messages = []
    for client_id in ids:
        message = Message(MyMessage.MSG_TYPE_S2C_FINISH, transport.rank, client_id)
        message.add_params(MyMessage.MSG_ARG_KEY_FINALIZE, finalize)
        messages.append(message)
    for client_id, error in transport.send_many(messages, timeout=FINISH_SEND_TIMEOUT).items():
        logging.warning("server: could not tell client %d to finish: %s", client_id, error)
