"""A worker process of ``--worker_processes``: serves many clients, one after another."""
from __future__ import annotations

import logging
import os
import time
from argparse import Namespace
from typing import Any, Dict, List, Optional, Tuple

import torch

from fedml_core.aggregation import AggregationStrategy
from fedml_core.aggregation.partial_sums import PartialSum
from fedml_core.aggregation.registry import client_algorithms
from fedml_core.distributed.communication.message import Message
from fedml_core.distributed.communication.packed_tensors import PackedTensors
from fedml_core.distributed.communication.transport import PeerFailure, Transport, TransportTimeout
from fedml_core.trainer.model_trainer import ModelTrainer

from .algorithm_messages import received_tensors, tensors_message
from .client_assignment import client_share
from .FedAVGTrainer import FedAVGTrainer, UserCodeError
from .FedAvgClientManager import ServerWorkManager
from .host_combining import COMBINE_SHARE, HostCombination, host_name, too_late_to_combine
from .message_define import MyMessage


class FedAvgWorkerManager(ServerWorkManager):
    """Trains and tests the clients the server assigns it, in one model's memory.

    Every client starts from the round's global model (loaded with the trainer's
    ``set_model_params`` before each client), with the random generators seeded from
    ``(seed, round, client)`` as in the one-process-per-client mode, so a client's update
    does not depend on which worker trained it or after which other client. The user's
    ModelTrainer learns the client from ``set_id(client - 1)`` and from the paths it is
    given, ``<data_path>/<client>/train`` and ``.../test``.

    An exception in the user's code fails that client only (reported to the server,
    which leaves it out of later rounds); the worker goes on with the next client.

    With partial sums on a host other than the server's, the server may make this
    worker its host's combiner (it adds its peers' sums to its own before it answers)
    or a peer (it sends its sum to the combiner): see :mod:`.host_combining`.

    Args:
        args: the run's arguments (``data_path``, ``client_num_in_total``, ``worker_processes``, ...).
        transport: to the server.
        model_trainer: the user's ModelTrainer; its model is every client's.
        device: where clients train and test.
        strategy: the run's algorithm; each client runs its client part (and an attack,
            for the ``--attackers``).
    """

    role = "worker"

    def __init__(self, args: Namespace, transport: Transport, model_trainer: ModelTrainer, device: torch.device,
                 strategy: AggregationStrategy) -> None:
        super().__init__(args, transport)
        self.model_trainer = model_trainer
        self.device = device
        self.strategy = strategy
        self.sample_numbers: Dict[int, Tuple[int, int]] = {}
        self._state: Optional[PackedTensors] = None  # reused packing buffer of one client's trained state
        self._client_tensors: Dict[int, Dict[str, torch.Tensor]] = {}  # client: extra tensors sent for this phase
        self._client_states: Dict[int, Dict[str, torch.Tensor]] = {}  # client: the trainer state kept for it
        self.host = host_name(self.rank)  # reported to the server, which plans the per-host combining
        self._train_round = -1  # the last round this worker was sent clients to train
        self._combination: Optional[HostCombination] = None  # this round's, while it waits for its peers' sums
        self._combined_reply: Optional[Message] = None  # the reply to send once the combination is complete
        self._combine_seconds: Optional[float] = None
        self._early_sums: List[Message] = []  # peers' sums that came before our own train message of their round
        self._dead: set = set()  # ranks the transport reported dead

    def register_message_receive_handlers(self) -> None:
        self.register_message_receive_handler(MyMessage.MSG_TYPE_S2C_TRAIN_CLIENTS, self.handle_message_train_clients)
        self.register_message_receive_handler(MyMessage.MSG_TYPE_S2C_TEST_CLIENTS, self.handle_message_test_clients)
        self.register_message_receive_handler(MyMessage.MSG_TYPE_S2C_FINISH, self.handle_message_finish)
        self.register_message_receive_handler(MyMessage.MSG_TYPE_S2C_ROUND_TENSORS, self.handle_message_client_tensors)
        self.register_message_receive_handler(MyMessage.MSG_TYPE_W2W_PARTIAL_SUM, self.handle_message_partial_sum)
        self.register_message_receive_handler(MyMessage.MSG_TYPE_S2C_PEER_LOST, self.handle_message_peer_lost)
        self.register_message_receive_handler(MyMessage.MSG_TYPE_S2C_CLIENT_STATE, self.handle_message_client_state)

    def handle_message_client_tensors(self, msg: Message) -> None:
        # Copied: the receive buffer is the transport's to recycle.
        self._client_tensors[int(msg.get(MyMessage.MSG_ARG_KEY_CLIENT))] = received_tensors(msg).copy_tensors()

    def handle_message_client_state(self, msg: Message) -> None:
        # Copied: the trainer may keep it.
        self._client_states[int(msg.get(MyMessage.MSG_ARG_KEY_CLIENT))] = received_tensors(msg).copy_tensors()

    def _paths(self, client: int) -> Tuple[str, str]:
        folder = os.path.join(self.args.data_path, str(client))
        return os.path.join(folder, "train"), os.path.join(folder, "test")

    def _trainer(self, client: int) -> FedAVGTrainer:
        """The framework's trainer for ``client`` (its sample numbers counted once)."""
        if callable(getattr(self.model_trainer, "set_id", None)):
            self.model_trainer.set_id(client - 1)
        train_path, test_path = self._paths(client)
        return FedAVGTrainer(client, train_path, test_path, self.device, self.args, self.model_trainer,
                             client_algorithms(self.args, self.strategy, client), self.sample_numbers.get(client))

    def run(self) -> None:
        """Count the samples of this worker's share of the clients, report them, serve."""
        start = time.perf_counter()
        failures = {}
        for client in client_share(self.rank, self.args.worker_processes, self.args.client_num_in_total):
            try:
                trainer = self._trainer(client)
            except UserCodeError as error:
                failures[str(client)] = str(error)
            else:
                self.sample_numbers[client] = (trainer.train_sample_number, trainer.test_sample_number)
        logging.info("worker %d: ready: counted the samples of %d clients in %.2f s (%d failed)", self.rank,
                     len(self.sample_numbers), time.perf_counter() - start, len(failures))
        ready = Message(MyMessage.MSG_TYPE_C2S_WORKER_READY, self.rank, 0)
        ready.add_params(MyMessage.MSG_ARG_KEY_SAMPLE_NUMBERS, {str(c): list(n) for c, n in self.sample_numbers.items()})
        ready.add_params(MyMessage.MSG_ARG_KEY_FAILURES, failures)
        ready.add_params(MyMessage.MSG_ARG_KEY_HOST, self.host)
        self.send_message(ready)
        super().run()

    def handle_message_train_clients(self, msg: Message) -> None:
        received = time.monotonic()  # the combine deadline counts from here
        round_idx = msg.get(MyMessage.MSG_ARG_KEY_ROUND_INDEX)
        self._stop_combining(f"the server had moved on to round {round_idx}")  # it gave up on our reply
        self._train_round = round_idx
        # Sums kept for an earlier round are stale; this round's are taken if this worker combines.
        early, self._early_sums = [m for m in self._early_sums if m.get(MyMessage.MSG_ARG_KEY_ROUND_INDEX) == round_idx], []
        clients: List[int] = [int(c) for c in msg.get(MyMessage.MSG_ARG_KEY_CLIENTS)]
        configs = msg.get(MyMessage.MSG_ARG_KEY_CONFIGS)
        algorithms = {config.get("algorithm") for config in configs.values()}
        if algorithms - {self.strategy.name}:
            raise RuntimeError(f"worker {self.rank} runs {self.strategy.name}, but the server runs {sorted(algorithms)}: "
                               f"give every process the same --federated_optimizer (or strategy)")
        partial = PartialSum(msg.packed) if msg.get(MyMessage.MSG_ARG_KEY_PARTIAL_SUM) else None
        start = time.perf_counter()
        trained = 0
        failures: Dict[str, str] = {}
        rejected: Dict[str, str] = {}
        for client in clients:
            try:
                trainer = self._trainer(client)
                trainer.update_model(msg.tensors)
                state, num_samples, _, report = trainer.train(round_idx, configs[str(client)],
                                                              self._client_tensors.pop(client, {}), self._client_states.pop(client, None))
            except UserCodeError as error:
                logging.error("worker %d: round %d: client %d failed: %s", self.rank, round_idx, client, error)
                failures[str(client)] = str(error)
                continue
            trained += 1
            if report.client_state is not None:  # whether or not the update goes in a partial sum
                self.send_message(self._client_message(MyMessage.MSG_TYPE_C2S_CLIENT_STATE, round_idx, client, report.client_state))
            packed = self._pack(state, msg.packed)
            if packed is None:
                rejected[str(client)] = "its state has other tensors (names, dtypes or shapes) than the global model"
            elif partial is not None:
                reason = partial.add(client, packed, num_samples)
                if reason is not None:
                    rejected[str(client)] = reason
            else:
                if report.tensors:  # just before the update, as the server expects them
                    self.send_message(self._client_message(MyMessage.MSG_TYPE_C2S_UPDATE_TENSORS, round_idx, client, report.tensors))
                update = Message(MyMessage.MSG_TYPE_C2S_SEND_MODEL_TO_SERVER, self.rank, 0)
                update.set_packed(packed)
                update.add_params(MyMessage.MSG_ARG_KEY_ROUND_INDEX, round_idx)
                update.add_params(MyMessage.MSG_ARG_KEY_CLIENT, client)
                update.add_params(MyMessage.MSG_ARG_KEY_NUM_SAMPLES, num_samples)
                if report.metadata:
                    update.add_params(MyMessage.MSG_ARG_KEY_METADATA, report.metadata)
                self.send_message(update)  # returns once the buffer may be reused
        self._client_tensors.clear()  # those of clients that failed before training
        self._client_states.clear()
        seconds = time.perf_counter() - start
        logging.info("worker %d: round %d: trained %d clients in %.2f s", self.rank, round_idx, trained, seconds)
        reply = Message(MyMessage.MSG_TYPE_C2S_CLIENTS_TRAINED, self.rank, 0)
        reply.add_params(MyMessage.MSG_ARG_KEY_ROUND_INDEX, round_idx)
        reply.add_params(MyMessage.MSG_ARG_KEY_FAILURES, failures)
        reply.add_params(MyMessage.MSG_ARG_KEY_REJECTED, rejected)
        reply.add_params(MyMessage.MSG_ARG_KEY_SECONDS, seconds)
        if partial is None:
            self.send_message(reply)
        else:
            self._deliver_partial_sum(msg, partial, reply, received, early)

    # -- partial sums and their per-host combining -----------------------------------
    def _deliver_partial_sum(self, msg: Message, partial: PartialSum, reply: Message, received: float,
                             early: List[Message]) -> None:
        """Send this round's partial sum as the train message says: to the host's
        combiner (then ``reply`` without it), or with ``reply`` once the peers' sums this
        worker combines are in it (none: at once). A peer sends its sum with ``reply``, to
        the server, when its combiner cannot take it: the sum is ready too late in the
        combine window (:func:`.too_late_to_combine`), or the combiner is dead or cannot
        be sent to within the window.

        Args:
            msg: the train message (``combine_to``, ``combine_from``, ``combine_seconds``).
            partial: this worker's clients folded.
            reply: the round's ``C2S_CLIENTS_TRAINED``, without the sum.
            received: when ``msg`` arrived (``time.monotonic()``).
            early: the peers' sums of this round that came before ``msg``.
        """
        self._combine_seconds = msg.params.get(MyMessage.MSG_ARG_KEY_COMBINE_SECONDS)
        deadline = None if self._combine_seconds is None else received + float(self._combine_seconds)
        round_idx = reply.get(MyMessage.MSG_ARG_KEY_ROUND_INDEX)
        combiner = msg.params.get(MyMessage.MSG_ARG_KEY_COMBINE_TO)
        if combiner is not None:
            combiner = int(combiner)
            if combiner in self._dead:
                undelivered = "it died"
            elif too_late_to_combine(received, self._combine_seconds, time.monotonic()):
                undelivered = f"the sum is ready late in the {self._combine_seconds:.3g} s combine window"
            else:
                undelivered = self._send_to_combiner(combiner, round_idx, partial, deadline)
            if undelivered is None:
                self.send_message(reply)
                return
            logging.warning("worker %d: round %d: sending the partial sum to the server, not to worker %d, which "
                            "combines this host's: %s", self.rank, round_idx, combiner, undelivered)
        peers = {int(rank): [int(c) for c in clients]
                 for rank, clients in (msg.params.get(MyMessage.MSG_ARG_KEY_COMBINE_FROM) or {}).items()}
        self._combination = HostCombination(round_idx, partial, peers, deadline)
        self._combined_reply = reply
        for sum_msg in early:
            self._offer(sum_msg)
        for rank in self._dead:
            self._combination.lose(rank, "its process died")
        self._send_combined_if_complete()

    def _send_to_combiner(self, combiner: int, round_idx: int, partial: PartialSum, deadline: Optional[float]) -> Optional[str]:
        """Send this worker's partial sum (with the clients it folded, maybe none) to
        ``combiner``, waiting no longer than the combiner does: a frozen combiner must
        not hold up this worker's reply. Returns None, or why the sum did not go."""
        message = Message(MyMessage.MSG_TYPE_W2W_PARTIAL_SUM, self.rank, combiner,
                          tensors=partial.tensors() if partial.clients else None)
        message.add_params(MyMessage.MSG_ARG_KEY_ROUND_INDEX, round_idx)
        message.add_params(MyMessage.MSG_ARG_KEY_CLIENTS, partial.clients)
        try:
            self.transport.send(message, timeout=None if deadline is None else max(0.0, deadline - time.monotonic()))
        except (TransportTimeout, PeerFailure) as error:
            return f"could not send it there: {error}"
        return None

    def handle_message_partial_sum(self, msg: Message) -> None:
        """A peer's partial sum, for the combination of its round."""
        round_idx = msg.get(MyMessage.MSG_ARG_KEY_ROUND_INDEX)
        if self._combination is not None and self._combination.round_idx == round_idx:
            self._offer(msg)
            self._send_combined_if_complete()
        elif round_idx > self._train_round:
            # Messages of two senders may cross: our own train message of that round is still to come.
            self._early_sums.append(msg)
        else:
            logging.warning("worker %d: ignoring worker %d's partial sum for round %s: it came after this worker had "
                            "sent its own", self.rank, msg.get_sender_id(), round_idx)

    def _offer(self, msg: Message) -> None:
        """Add a peer's sum (``W2W_PARTIAL_SUM``) to the combination of its round."""
        ignored = self._combination.add(msg.get_sender_id(), [int(c) for c in msg.get(MyMessage.MSG_ARG_KEY_CLIENTS)],
                                        msg.tensors)
        if ignored is not None:
            logging.warning("worker %d: ignoring a partial sum: %s", self.rank, ignored)

    def handle_message_peer_lost(self, msg: Message) -> None:
        """The server gave up on a peer: its sum is not awaited any more."""
        combination = self._combination
        if combination is not None and combination.round_idx == msg.get(MyMessage.MSG_ARG_KEY_ROUND_INDEX):
            combination.lose(int(msg.get(MyMessage.MSG_ARG_KEY_WORKER)), str(msg.get(MyMessage.MSG_ARG_KEY_ERROR)))
            self._send_combined_if_complete()

    def on_peer_failure(self, ranks) -> None:
        super().on_peer_failure(ranks)  # raises ServerLost if the server died
        self._dead.update(ranks)
        if self._combination is not None:
            for rank in ranks:
                self._combination.lose(rank, "its process died")
            self._send_combined_if_complete()

    def on_deadline(self) -> None:
        """The combine deadline passed: send what arrived."""
        self._stop_combining(f"its partial sum did not arrive within {self._combine_seconds:.3g} s "
                             f"({COMBINE_SHARE:.0%} of the phase's timeout)")

    def _stop_combining(self, reason: str) -> None:
        """Send the pending combination (if any) with what arrived; the others' sums are missing for ``reason``."""
        if self._combination is not None:
            self._combination.give_up(reason)
            self._send_combined_if_complete()

    def _send_combined_if_complete(self) -> None:
        """Send the combination's reply once no peer's sum is awaited; until then, wake
        at its deadline."""
        combination = self._combination
        if combination is None:
            return
        if not combination.complete:
            self.deadline = combination.deadline
            return
        self._combination, self.deadline = None, None
        total = combination.total
        reply = Message(MyMessage.MSG_TYPE_C2S_CLIENTS_TRAINED, self.rank, 0, params=self._combined_reply.params,
                        tensors=total.tensors() if total.clients else None)
        reply.add_params(MyMessage.MSG_ARG_KEY_CLIENTS, total.clients)
        if combination.peers:
            reply.add_params(MyMessage.MSG_ARG_KEY_MISSING, {str(rank): why for rank, why in combination.missing.items()})
            logging.info("worker %d: round %d: combined the partial sums of workers %s with its own (missing: %s)",
                         self.rank, combination.round_idx, sorted(set(combination.peers) - set(combination.missing)),
                         combination.missing or "none")
        self._combined_reply = None
        self.send_message(reply)

    def _client_message(self, msg_type: int, round_idx: int, client: int, tensors: Dict[str, torch.Tensor]) -> Message:
        """A message of ``client``'s tensors to the server."""
        message = tensors_message(msg_type, self.rank, 0, round_idx, tensors)
        message.add_params(MyMessage.MSG_ARG_KEY_CLIENT, client)
        return message

    def _pack(self, state: Dict[str, torch.Tensor], template: PackedTensors) -> Optional[PackedTensors]:
        """``state`` copied into a packed buffer of ``template``'s layout (the global
        model's, every round's: allocated once); None if its tensors are not the template's."""
        if self._state is None:
            self._state = PackedTensors.empty_like_specs(list(template.layout_key()))
        return self._state if self._state.load(state) else None

    def handle_message_test_clients(self, msg: Message) -> None:
        round_idx = msg.get(MyMessage.MSG_ARG_KEY_ROUND_INDEX)
        self._stop_combining(f"the server had moved on to round {round_idx}'s test")  # it gave up on our reply
        configs = msg.params.get(MyMessage.MSG_ARG_KEY_CONFIGS) or {}
        results: Dict[str, Dict[str, Any]] = {}
        failures: Dict[str, str] = {}
        start = time.perf_counter()
        for client in (int(c) for c in msg.get(MyMessage.MSG_ARG_KEY_CLIENTS)):
            try:
                trainer = self._trainer(client)
                trainer.update_model(msg.tensors)  # again for each client: a test() may change the model
                result, num_samples, _ = trainer.test(round_idx, configs.get(str(client)), self._client_tensors.pop(client, {}))
            except UserCodeError as error:
                logging.error("worker %d: round %d: client %d failed: %s", self.rank, round_idx, client, error)
                failures[str(client)] = str(error)
            else:
                results[str(client)] = {"result": result, "sample_number": num_samples}
        self._client_tensors.clear()  # those of clients that failed before testing
        reply = Message(MyMessage.MSG_TYPE_C2S_CLIENTS_TESTED, self.rank, 0)
        reply.add_params(MyMessage.MSG_ARG_KEY_ROUND_INDEX, round_idx)
        reply.add_params(MyMessage.MSG_ARG_KEY_RESULTS, results)
        reply.add_params(MyMessage.MSG_ARG_KEY_FAILURES, failures)
        reply.add_params(MyMessage.MSG_ARG_KEY_SECONDS, time.perf_counter() - start)
        self.send_message(reply)
