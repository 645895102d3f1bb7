"""The server's message handlers for FedAvg: drives the rounds."""
from __future__ import annotations

import logging
import time
from argparse import Namespace
from typing import Any, Dict, List, Optional

from fedml_core.distributed.communication.message import Message
from fedml_core.distributed.communication.transport import Transport
from fedml_core.distributed.server.server_manager import ServerManager

from .FedAVGAggregator import FedAVGAggregator
from .message_define import MyMessage


class FedAVGServerManager(ServerManager):
    """Runs ``args.comm_round`` rounds of FedAvg, then tells every client to finish.

    Each round: send the global model to the sampled clients, aggregate their replies,
    and on test rounds (every ``args.frequency_of_the_test`` rounds and after the
    last one) have every client test the new model and combine the metrics.

    Args:
        args: needs ``comm_round``, ``frequency_of_the_test``, ``client_num_in_total``.
        aggregator: the server's :class:`FedAVGAggregator`.
        transport: moves the messages.
        recorder: receives one record per round and the final model (a ``RunRecorder``).
    """

    def __init__(self, args: Namespace, aggregator: FedAVGAggregator, transport: Transport, recorder) -> None:
        super().__init__(args, transport)
        self.aggregator = aggregator
        self.recorder = recorder
        self.round_num = args.comm_round
        self.round_idx = 0
        self.clients = list(range(1, args.client_num_in_total + 1))
        self._sampled: List[int] = []
        self._waiting: set = set()
        self._record: Dict[str, Any] = {}
        self._train_seconds: List[float] = []
        self._test_results: Dict[int, Dict[str, Any]] = {}
        self._round_start = self._phase_start = 0.0
        self._run_start = time.perf_counter()

    def register_message_receive_handlers(self) -> None:
        self.register_message_receive_handler(MyMessage.MSG_TYPE_C2S_SEND_MODEL_TO_SERVER, self.handle_message_receive_model_from_client)
        self.register_message_receive_handler(MyMessage.MSG_TYPE_C2S_SEND_TEST_RESULT, self.handle_message_receive_test_result)

    def run(self) -> None:
        self.send_init_msg()
        super().run()

    # -- training phase ----------------------------------------------------------
    def send_init_msg(self) -> None:
        self._start_round()

    def _start_round(self) -> None:
        self._sampled = self.aggregator.client_sampling(self.round_idx)
        self._waiting = set(self._sampled)
        self._train_seconds = []
        self._record = {"round": self.round_idx, "sampled_clients": list(self._sampled)}
        self._round_start = time.perf_counter()
        for client_id in self._sampled:
            self._send_global_model(MyMessage.MSG_TYPE_S2C_SYNC_MODEL_TO_CLIENT, client_id)

    def _send_global_model(self, msg_type: int, client_id: int) -> None:
        message = Message(msg_type, self.rank, client_id)
        message.add_params(MyMessage.MSG_ARG_KEY_ROUND_INDEX, self.round_idx)
        message.set_packed(self.aggregator.global_model)
        self.send_message(message)

    def handle_message_receive_model_from_client(self, msg: Message) -> None:
        sender = msg.get_sender_id()
        if msg.get(MyMessage.MSG_ARG_KEY_ROUND_INDEX) != self.round_idx or sender not in self._waiting:
            logging.warning("server: ignoring an unexpected model from client %d for round %s", sender, msg.get(MyMessage.MSG_ARG_KEY_ROUND_INDEX))
            return
        self._waiting.discard(sender)
        self._train_seconds.append(float(msg.get(MyMessage.MSG_ARG_KEY_TRAIN_SECONDS)))
        self.aggregator.add_local_trained_result(sender, msg.packed, int(msg.get(MyMessage.MSG_ARG_KEY_NUM_SAMPLES)))
        if self._waiting:
            return
        updates_in = time.perf_counter()
        self.aggregator.aggregate()
        aggregated = time.perf_counter()
        slowest_training = max(self._train_seconds)
        self._record.update(
            train_seconds=slowest_training,
            communication_seconds=max(0.0, updates_in - self._round_start - slowest_training),
            aggregation_seconds=aggregated - updates_in,
        )
        if self._is_test_round():
            self._start_test()
        else:
            self._end_round()

    # -- test phase --------------------------------------------------------------
    def _is_test_round(self) -> bool:
        return (self.round_idx + 1) % self.args.frequency_of_the_test == 0 or self.round_idx == self.round_num - 1

    def _start_test(self) -> None:
        self._test_results = {}
        self._waiting = set(self.clients)
        self._phase_start = time.perf_counter()
        for client_id in self.clients:
            self._send_global_model(MyMessage.MSG_TYPE_S2C_TEST_MODEL, client_id)

    def handle_message_receive_test_result(self, msg: Message) -> None:
        sender = msg.get_sender_id()
        if msg.get(MyMessage.MSG_ARG_KEY_ROUND_INDEX) != self.round_idx or sender not in self._waiting:
            logging.warning("server: ignoring an unexpected test result from client %d", sender)
            return
        self._waiting.discard(sender)
        self._test_results[sender] = {
            "result": msg.get(MyMessage.MSG_ARG_KEY_TEST_RESULT),
            "sample_number": int(msg.get(MyMessage.MSG_ARG_KEY_NUM_SAMPLES)),
        }
        if self._waiting:
            return
        self._record["test"] = self.aggregator.aggregate_test_results(self._test_results)
        self._record["test_seconds"] = time.perf_counter() - self._phase_start
        self._end_round()

    # -- bookkeeping -------------------------------------------------------------
    def _end_round(self) -> None:
        self._record["round_seconds"] = time.perf_counter() - self._round_start
        self.recorder.log_round(self._record)
        self.round_idx += 1
        if self.round_idx < self.round_num:
            self._start_round()
        else:
            self._finish_run()

    def _finish_run(self) -> None:
        for client_id in self.clients:
            self.send_message(Message(MyMessage.MSG_TYPE_S2C_FINISH, self.rank, client_id))
        self.recorder.finish(self.aggregator.global_model_state(), wall_seconds=time.perf_counter() - self._run_start)
        self.finish()
