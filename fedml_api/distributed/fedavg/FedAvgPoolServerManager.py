"""The server of a run whose clients are served by worker processes (``--worker_processes``)."""
from __future__ import annotations

import logging
import time
from argparse import Namespace
from typing import Any, Dict, List, Mapping, Optional, Tuple

from fedml_core.aggregation import InvalidUpdate, check_layout
from fedml_core.aggregation.partial_sums import received_partial_sum
from fedml_core.distributed.communication.message import Message
from fedml_core.distributed.communication.transport import Transport

from .algorithm_messages import received_tensors
from .checkpoint import ServerCheckpoint
from .client_assignment import assign_clients
from .FedAVGAggregator import FedAVGAggregator
from .FedAvgServerManager import FINISH_SEND_TIMEOUT, FederationError, FedAVGServerManager, release_clients
from .host_combining import COMBINE_SHARE, combining_plan, host_name
from .message_define import MyMessage

NEVER_COUNTED = "its sample numbers were never counted: its worker process did not start in time"


class FedAvgPoolServerManager(FedAVGServerManager):
    """FedAvg over CLIENT_NUM clients served by ``args.worker_processes`` worker processes
    (ranks 1..P; see message_define.py for the protocol).

    The rounds are the one-process-per-client server's (sampling, aggregation, tests,
    checkpoints, the summary), with clients assigned to workers: each phase, the clients
    to train (or test) are spread over the live workers, balanced by sample number
    (:func:`~.client_assignment.assign_clients`); a worker trains its clients one after
    another and folds their states into one partial sum, which is all it sends when the
    algorithm needs only the weighted mean (``accepts_partial_sums``), else it sends
    each client's update.

    Per-host combining (``args.combine_per_host``, see :mod:`.host_combining`): in a
    train phase with partial sums, the workers of each host but the server's that has
    two or more of the phase's workers send their sums to the lowest-ranked of them,
    which sends the server one sum for the host. Every worker still answers the server
    itself (failures, timings, proof of life); a peer's clients count through its
    combiner's sum, which may name only the clients assigned to it and to its peers, or,
    when the peer's sum was ready too late for its combiner, through the sum the peer
    sends with its own reply (recorded in ``direct_sums``); never through both.

    Failures: a client whose code raised (or whose samples could not be counted) is
    left out of later rounds, as in the one-process-per-client mode. A worker that
    dies, misses the phase's deadline or cannot be sent to takes that phase's clients
    with it: they are recorded failed for the round only, and are assigned to the
    remaining workers in later rounds; the worker gets no more work unless a late reply
    proves it back. A combiner takes its peers' clients of the phase with it too; a
    peer whose sum reached neither its combiner nor the server fails its own clients for
    the round (the server tells the combiner when it gives up on a peer, so it need not
    wait for it).
    With no worker left, the run stops (:class:`FederationError`).
    """

    process_noun = "worker"

    def __init__(self, args: Namespace, aggregator: FedAVGAggregator, transport: Transport, recorder,
                 resume_from: Optional[ServerCheckpoint] = None) -> None:
        super().__init__(args, aggregator, transport, recorder, resume_from)
        self.workers = list(range(1, args.worker_processes + 1))
        self.lost_workers: Dict[int, str] = {}
        #: client -> (training samples, test samples), as the workers counted them at start-up.
        self.sample_numbers: Dict[int, Tuple[int, int]] = {}
        self._assigned: Dict[int, List[int]] = {}  # worker -> its clients in the current phase
        self._arrived: set = set()  # clients whose own update arrived in this phase (algorithms without partial sums)
        self._partial_sums = aggregator.strategy.accepts_partial_sums
        self.hosts: Dict[int, str] = {}  # worker -> its host, as it reported it
        self.host = host_name(self.rank)
        self._combine = self._partial_sums and args.combine_per_host == "on"
        self._peers_of: Dict[int, List[int]] = {}  # combiner -> its peers, in the current phase
        self._combiner_of: Dict[int, int] = {}  # peer -> its combiner, in the current phase
        self._counted: set = set()  # clients counted through a partial sum in the current phase
        self._not_combined: Dict[int, str] = {}  # peer -> why its combiner left it out, while its own reply may bring its sum

    def register_message_receive_handlers(self) -> None:
        self.register_message_receive_handler(MyMessage.MSG_TYPE_C2S_WORKER_READY, self.handle_message_worker_ready)
        self.register_message_receive_handler(MyMessage.MSG_TYPE_C2S_SEND_MODEL_TO_SERVER, self.handle_message_client_update)
        self.register_message_receive_handler(MyMessage.MSG_TYPE_C2S_UPDATE_TENSORS, self.handle_message_client_tensors)
        self.register_message_receive_handler(MyMessage.MSG_TYPE_C2S_CLIENT_STATE, self.handle_message_client_state)
        self.register_message_receive_handler(MyMessage.MSG_TYPE_C2S_CLIENTS_TRAINED, self.handle_message_clients_trained)
        self.register_message_receive_handler(MyMessage.MSG_TYPE_C2S_CLIENTS_TESTED, self.handle_message_clients_tested)
        self.register_message_receive_handler(MyMessage.MSG_TYPE_C2S_CLIENT_FAILED, self.handle_message_client_failed)

    def live_workers(self) -> List[int]:
        return [rank for rank in self.workers if rank not in self.lost_workers]

    # -- start-up ----------------------------------------------------------------
    def send_init_msg(self) -> None:
        """Wait for every worker to report its share's sample numbers (``args.startup_timeout``)."""
        self._phase = "startup"
        self._waiting = set(self.workers)
        self.deadline = None if self.args.startup_timeout is None else time.monotonic() + self.args.startup_timeout

    def handle_message_worker_ready(self, msg: Message) -> None:
        sender = msg.get_sender_id()
        host = msg.params.get(MyMessage.MSG_ARG_KEY_HOST)
        if isinstance(host, str):
            self.hosts[sender] = host
        for client, numbers in _by_client(msg.get(MyMessage.MSG_ARG_KEY_SAMPLE_NUMBERS)).items():
            self.sample_numbers[client] = (int(numbers[0]), int(numbers[1]))
            if self.failed.get(client) == NEVER_COUNTED:  # its worker is late, not gone
                del self.failed[client]
        for client, reason in _by_client(msg.get(MyMessage.MSG_ARG_KEY_FAILURES)).items():
            self._client_failed(client, reason)
        if self._phase != "startup":
            # Ready only after we gave up on it: it is back for later rounds.
            self.lost_workers.pop(sender, None)
            return
        self._waiting.discard(sender)
        self._maybe_end_phase()

    # -- phases ------------------------------------------------------------------
    def _start_round(self) -> None:
        # A worker that never reported at start-up left its share's clients uncounted: they cannot be assigned.
        for client in self.available_clients():
            if client not in self.sample_numbers:
                self._client_failed(client, NEVER_COUNTED)
        super()._start_round()

    def _require_workers(self) -> None:
        if not self.live_workers():
            raise FederationError(f"round {self.round_idx}: no worker process left; lost: {self.lost_workers}")

    def _begin_phase(self, phase: str, clients: List[int], msg_type: int) -> None:
        """Assign ``clients`` to the live workers and send each its share with the model."""
        self._require_workers()
        column = 0 if phase == "train" else 1
        self._assigned = assign_clients(clients, self.live_workers(), {c: self.sample_numbers[c][column] for c in clients})
        self._record.setdefault("assignments", {})[phase] = {str(rank): chosen for rank, chosen in self._assigned.items()}
        self._plan_combining(phase)
        self._open_phase(phase, list(self._assigned))
        self._arrived, self._counted, self._not_combined = set(), set(), {}
        combining = self._combining_params()
        instructions = self._instructions(phase, clients)
        messages = []
        for rank, chosen in self._assigned.items():
            for client in chosen:  # each client's extra tensors (e.g. SCAFFOLD's correction) before the assignment
                messages.extend(self._client_messages(phase, client, rank, instructions.get(client)))
            message = Message(MyMessage.MSG_TYPE_S2C_TRAIN_CLIENTS if phase == "train" else MyMessage.MSG_TYPE_S2C_TEST_CLIENTS,
                              self.rank, rank)
            message.add_params(MyMessage.MSG_ARG_KEY_ROUND_INDEX, self.round_idx)
            message.add_params(MyMessage.MSG_ARG_KEY_CLIENTS, chosen)
            if phase == "train":
                message.add_params(MyMessage.MSG_ARG_KEY_CONFIGS, {str(c): instructions[c].config for c in chosen})
                message.add_params(MyMessage.MSG_ARG_KEY_PARTIAL_SUM, self._partial_sums)
                for key, value in combining.get(rank, {}).items():
                    message.add_params(key, value)
            elif any(c in instructions for c in chosen):  # the algorithm's test configs (none for most)
                message.add_params(MyMessage.MSG_ARG_KEY_CONFIGS, {str(c): instructions[c].config for c in chosen if c in instructions})
            message.set_packed(self.aggregator.global_model)
            messages.append(message)
        self._send_phase(messages)

    def _plan_combining(self, phase: str) -> None:
        """Who combines whose partial sums in this phase (train phases with partial sums
        only), recorded in the round's ``combined_sums`` (combiner -> peers)."""
        plan = combining_plan(self._assigned, self.hosts, self.host) if phase == "train" and self._combine else {}
        self._peers_of = plan
        self._combiner_of = {peer: combiner for combiner, peers in plan.items() for peer in peers}
        if plan:
            self._record["combined_sums"] = {str(combiner): peers for combiner, peers in plan.items()}

    def _combining_params(self) -> Dict[int, Dict[str, Any]]:
        """The combining params of each combiner's and peer's train message: the combine
        deadline is :data:`COMBINE_SHARE` of the phase's timeout, so that the combiner's
        answer arrives before the server's deadline."""
        seconds = None if self.deadline is None else COMBINE_SHARE * max(0.0, self.deadline - time.monotonic())
        params: Dict[int, Dict[str, Any]] = {}
        for combiner, peers in self._peers_of.items():
            params[combiner] = {MyMessage.MSG_ARG_KEY_COMBINE_FROM: {str(p): self._assigned[p] for p in peers},
                                MyMessage.MSG_ARG_KEY_COMBINE_SECONDS: seconds}
            for peer in peers:
                params[peer] = {MyMessage.MSG_ARG_KEY_COMBINE_TO: combiner, MyMessage.MSG_ARG_KEY_COMBINE_SECONDS: seconds}
        return params

    def _carried(self, rank: int) -> List[int]:
        """The clients whose partial sum ``rank``'s reply carries in this phase: its own
        and, for a combiner, its peers'."""
        return [c for r in (rank, *self._peers_of.get(rank, ())) for c in self._assigned.get(r, ())]

    def _expected_client(self, msg: Message, phase: str, client: int) -> bool:
        return self._expected(msg, phase) and client in self._assigned.get(msg.get_sender_id(), ())

    def handle_message_client_tensors(self, msg: Message) -> None:
        """The extra tensors of one client's update (they come just before it)."""
        client = int(msg.get(MyMessage.MSG_ARG_KEY_CLIENT))
        if self._expected_client(msg, "train", client):
            try:
                self._update_tensors[client] = received_tensors(msg)
            except ValueError as error:
                self._reject_update(client, str(error))

    def handle_message_client_state(self, msg: Message) -> None:
        """The trainer state of one client (after its training; kept if its update is used)."""
        client = int(msg.get(MyMessage.MSG_ARG_KEY_CLIENT))
        if self._expected_client(msg, "train", client):
            self._hold_client_state(client, msg)

    def handle_message_client_update(self, msg: Message) -> None:
        """One client's update, from a worker whose algorithm needs every update."""
        client = int(msg.get(MyMessage.MSG_ARG_KEY_CLIENT))
        if not self._expected_client(msg, "train", client):
            return
        extra = self._update_tensors.pop(client, None)  # released with the update if that is rejected
        try:
            check_layout(self.aggregator.global_model, msg.packed)
            self.aggregator.add_local_trained_result(client, msg.packed, int(msg.get(MyMessage.MSG_ARG_KEY_NUM_SAMPLES)),
                                                     extra,
                                                     msg.params.get(MyMessage.MSG_ARG_KEY_METADATA))
        except (InvalidUpdate, ValueError) as error:
            self._reject_update(client, str(error))
        else:
            self._accepted += 1
            self._arrived.add(client)

    def handle_message_clients_trained(self, msg: Message) -> None:
        sender = msg.get_sender_id()
        if not self._expected(msg, "train"):
            return
        mine = self._take_client_failures(msg)
        for client, reason in _by_client(msg.get(MyMessage.MSG_ARG_KEY_REJECTED)).items():
            if client in mine:
                self._reject_update(client, reason)
        if self._partial_sums and msg.tensors:
            if self._add_partial_sum(sender, msg) and sender in self._combiner_of:  # a peer its combiner could not take
                self._record.setdefault("direct_sums", []).append(sender)
                self._tell_combiner(sender, "it sent its partial sum to the server")  # not to wait for it any longer
        elif sender in self._not_combined:
            self._fail_for_round(self._uncounted(sender), self._not_combined.pop(sender))
        if sender in self._peers_of:
            self._missing_sums(sender, msg)
        self._train_seconds.append(float(msg.get(MyMessage.MSG_ARG_KEY_SECONDS)))
        self._waiting.discard(sender)
        self._maybe_end_phase()

    def _take_client_failures(self, msg: Message) -> set:
        """Record the failures of the sender's clients a reply reports; returns the
        sender's clients of this phase (a reply's other clients are ignored)."""
        mine = set(self._assigned[msg.get_sender_id()])
        for client, reason in _by_client(msg.get(MyMessage.MSG_ARG_KEY_FAILURES)).items():
            if client in mine:
                self._client_failed(client, reason)
        return mine

    def _add_partial_sum(self, sender: int, msg: Message) -> bool:
        """Count ``sender``'s partial sum; returns whether it was (else its clients are rejected)."""
        # Each reply is taken once (the sender leaves _waiting), and a client already
        # counted (a peer's, sent directly) is not the sender's to carry any more: no
        # client can be counted twice.
        folded = [int(c) for c in msg.get(MyMessage.MSG_ARG_KEY_CLIENTS)]
        carried = [c for c in self._carried(sender) if c not in self._counted]
        try:
            if not set(folded) <= set(carried):
                whose = f"workers {[sender, *self._peers_of[sender]]}" if sender in self._peers_of else "it"
                raise ValueError(f"worker {sender}'s partial sum names clients {folded}, not all assigned to "
                                 f"{whose}: {sorted(carried)}")
            sums = received_partial_sum(msg.tensors, self.aggregator.global_model)
            # Weighted as the worker weighted it: by the sample numbers it reported at start.
            self.aggregator.add_partial_sum(sender, sums, sum(self.sample_numbers[c][0] for c in folded))
        except ValueError as error:
            for client in sorted(set(folded) & set(carried)):  # another worker's clients are that worker's to count
                self._reject_update(client, f"in worker {sender}'s partial sum: {error}")
            return False
        self._accepted += len(folded)
        self._counted.update(folded)
        return True

    def _missing_sums(self, combiner: int, msg: Message) -> None:
        """The peers whose sums combiner ``combiner`` says it did not add, recorded in
        ``missing_sums`` (peer -> why): their clients fail for the round,
        once the peer's own reply has come without its sum (or never comes)."""
        for peer, reason in _by_client(msg.params.get(MyMessage.MSG_ARG_KEY_MISSING)).items():
            if peer not in self._peers_of[combiner]:
                continue
            self._record.setdefault("missing_sums", {})[str(peer)] = str(reason)
            if peer in self.lost_workers:
                why = f"its worker process {peer} failed: {self.lost_workers[peer]}"
            else:
                why = (f"its worker process {peer}'s partial sum did not reach worker {combiner}, which combines "
                       f"host {self.hosts.get(combiner)}'s: {reason}")
            self._not_combined_by(peer, why)

    def _not_combined_by(self, peer: int, why: str) -> None:
        """``peer``'s combiner did not carry its sum: its clients not counted fail for the
        round, now if its own reply has come, else when that comes without its sum (or never)."""
        if peer in self._waiting:
            self._not_combined[peer] = why
        else:
            self._fail_for_round(self._uncounted(peer), why)

    def _uncounted(self, worker: int) -> List[int]:
        """``worker``'s clients in this phase not counted through any partial sum."""
        return [c for c in self._assigned[worker] if c not in self._counted]

    def _fail_for_round(self, clients: List[int], reason: str) -> None:
        """Record ``clients`` failed in this round only (their worker's fault, not theirs)."""
        if not clients:
            return
        failures = self._record.setdefault("failures", {})
        for client in clients:
            failures.setdefault(str(client), reason)

    def handle_message_clients_tested(self, msg: Message) -> None:
        sender = msg.get_sender_id()
        if not self._expected(msg, "test"):
            return
        mine = self._take_client_failures(msg)
        for client, result in _by_client(msg.get(MyMessage.MSG_ARG_KEY_RESULTS)).items():
            if client in mine:
                self._test_results[client] = {"result": result["result"], "sample_number": int(result["sample_number"])}
        self._waiting.discard(sender)
        self._maybe_end_phase()

    # -- failures ----------------------------------------------------------------
    def _given_up_on(self) -> Dict[int, str]:
        return self.lost_workers

    def handle_message_client_failed(self, msg: Message) -> None:
        """A worker stopped on an error outside its clients' code: let it go; its clients
        of this phase fail for the round."""
        sender = msg.get_sender_id()
        release_clients(self.transport, [sender], finalize=False)
        self._process_failed(sender, str(msg.get(MyMessage.MSG_ARG_KEY_ERROR)))
        self._maybe_end_phase()

    def _process_failed(self, rank: int, reason: str) -> None:
        """Worker ``rank`` failed: it gets no more work (until it proves back), and the
        clients whose sums its reply was to carry in this phase (a combiner's: its peers'
        too) are recorded failed for this round (but for those whose own update arrived
        before: it is aggregated). A peer's clients are its combiner's to carry, which is
        told not to wait for its sum."""
        if rank in self.lost_workers:
            return
        logging.error("server: round %d: worker %d failed: %s", self.round_idx, rank, reason)
        self.lost_workers[rank] = reason
        self.transport.abandon(rank)
        self._record.setdefault("lost_workers", {})[str(rank)] = reason
        if rank not in self._waiting:
            return
        self._waiting.discard(rank)
        if rank in self._combiner_of:  # its clients' fate is its combiner's: tell it not to wait for this one
            if rank in self._not_combined:  # the combiner answered without its sum already
                del self._not_combined[rank]
                self._fail_for_round(self._uncounted(rank), f"its worker process {rank} failed: {reason}")
            self._tell_combiner(rank, reason)
            return
        self._fail_for_round([c for c in self._assigned.get(rank, ()) if c not in self._arrived],
                             f"its worker process {rank} failed: {reason}")
        for peer in self._peers_of.get(rank, ()):
            self._not_combined_by(peer, f"worker {rank}, which was to combine the partial sum of its worker process "
                                        f"{peer}, failed: {reason}")

    def _tell_combiner(self, peer: int, reason: str) -> None:
        """Tell ``peer``'s combiner, if it has not answered yet, that its sum is not coming to it."""
        combiner = self._combiner_of[peer]
        if combiner not in self._waiting:
            return
        notice = Message(MyMessage.MSG_TYPE_S2C_PEER_LOST, self.rank, combiner)
        notice.add_params(MyMessage.MSG_ARG_KEY_ROUND_INDEX, self.round_idx)
        notice.add_params(MyMessage.MSG_ARG_KEY_WORKER, peer)
        notice.add_params(MyMessage.MSG_ARG_KEY_ERROR, reason)
        # A tiny message: a live combiner takes it at once.
        for rank, error in self.transport.send_many([notice], timeout=FINISH_SEND_TIMEOUT).items():
            self._process_failed(rank, f"could not be told that worker {peer} was lost: {error}")

    def _client_failed(self, client: int, reason: str) -> None:
        """Client ``client``'s code raised: it is left out of later rounds."""
        if client in self.failed:
            return
        logging.error("server: round %d: client %d failed: %s", self.round_idx, client, reason)
        self.failed[client] = reason
        self._record.setdefault("failures", {})[str(client)] = reason

    def _end_round(self) -> None:
        if self.lost_workers:
            self._record["lost_workers_so_far"] = sorted(self.lost_workers)
        super()._end_round()

    def _release_clients(self) -> None:
        if not self._released:
            self._released = True
            release_clients(self.transport, self.workers)


def _by_client(values: Optional[Mapping[str, Any]]) -> Dict[int, Any]:
    """A message's ``{"17": value}`` (JSON keys are strings) as ``{17: value}``."""
    return {int(client): value for client, value in (values or {}).items()}
