"""The client's message handlers for FedAvg."""
from __future__ import annotations

import logging
import time
from argparse import Namespace
from typing import Dict

import torch

from fedml_core.distributed.client.client_manager import ClientManager
from fedml_core.distributed.communication.message import Message
from fedml_core.distributed.communication.packed_tensors import PackedTensors, pack_module
from fedml_core.distributed.communication.transport import PeerFailure, Transport, TransportTimeout
from fedml_core.trainer.model_trainer import ModelTrainer

from .algorithm_messages import received_tensors, tensors_message
from .FedAVGTrainer import FedAVGTrainer
from .message_define import MyMessage

# How long a failing client waits for the server to take its failure report.
FAILURE_ACK_TIMEOUT = 60.0
# A failure reason longer than this is cut (an exception message can hold a whole tensor).
MAX_REASON_CHARS = 2000


class ServerLost(RuntimeError):
    """The server (process 0) died: this client has nobody to work for."""


class ServerWorkManager(ClientManager):
    """What every process serving the server shares: it ends when told to finish, and
    stops (:class:`ServerLost`) when the server dies.

    Attributes:
        finalize: set by the server's finish message: whether the job ends with MPI_Finalize.
    """

    #: This process's kind, in log lines.
    role = "client"

    def __init__(self, args: Namespace, transport: Transport) -> None:
        super().__init__(args, transport)
        self.finalize = True

    def handle_message_finish(self, msg: Message) -> None:
        logging.info("%s %d: finished", self.role, self.rank)
        self.finalize = bool(msg.params.get(MyMessage.MSG_ARG_KEY_FINALIZE, True))
        self.finish()

    def on_peer_failure(self, ranks) -> None:
        for rank in ranks:
            self.transport.abandon(rank)
        if 0 in ranks:
            raise ServerLost(f"{self.role} {self.rank}: the server (process 0) died; stopping")
        # Another client or worker died: nothing to do with us.


class FedAVGClientManager(ServerWorkManager):
    """Trains when sent a model, tests when asked, stops when told to finish.

    Args:
        algorithm: the name of the algorithm this client runs; the server's must match.
    """

    def __init__(self, args: Namespace, trainer: FedAVGTrainer, transport: Transport, algorithm: str = "FedAvg") -> None:
        super().__init__(args, transport)
        self.trainer = trainer
        self.algorithm = algorithm
        self._round_tensors: Dict[int, Dict[str, torch.Tensor]] = {}  # round: extra tensors sent before its model
        self._client_state: Dict[int, Dict[str, torch.Tensor]] = {}  # round: the trainer state kept for this client
        # Every model this client receives is loaded into its model at once: with the
        # model packed, it arrives in the model's own memory (loading it copies nothing)
        # and the trained state goes back as one buffer per dtype, lent to a server on
        # this host (which is done with it before it sends this client anything).
        # (Lendable memory is a memfd: 4 KiB pages, through which MPI's single-copy
        # transfers run slower, so it is asked for only where it will be lent.)
        lendable = transport.allocate_lendable if args.shared_memory == "on" else None
        self.model_state = pack_module(trainer.trainer.model, allocate=lendable)
        if self.model_state is not None:
            transport.receive_into(self.model_state)
            self._packed_places = _places(self.model_state.tensors())

    def register_message_receive_handlers(self) -> None:
        self.register_message_receive_handler(MyMessage.MSG_TYPE_S2C_SYNC_MODEL_TO_CLIENT, self.handle_message_receive_model_from_server)
        self.register_message_receive_handler(MyMessage.MSG_TYPE_S2C_TEST_MODEL, self.handle_message_test_model_on_client)
        self.register_message_receive_handler(MyMessage.MSG_TYPE_S2C_FINISH, self.handle_message_finish)
        self.register_message_receive_handler(MyMessage.MSG_TYPE_S2C_ROUND_TENSORS, self.handle_message_round_tensors)
        self.register_message_receive_handler(MyMessage.MSG_TYPE_S2C_CLIENT_STATE, self.handle_message_client_state)

    def run(self) -> None:
        # The trainer has loaded this client's data: tell the server we can take work.
        logging.info("client %d: ready: %d training and %d test samples", self.rank,
                     self.trainer.train_sample_number, self.trainer.test_sample_number)
        self.send_message(Message(MyMessage.MSG_TYPE_C2S_CLIENT_READY, self.rank, 0))
        super().run()

    def handle_message_round_tensors(self, msg: Message) -> None:
        # Copied: the receive buffer is the transport's to recycle.
        self._round_tensors = {msg.get(MyMessage.MSG_ARG_KEY_ROUND_INDEX): received_tensors(msg).copy_tensors()}

    def handle_message_client_state(self, msg: Message) -> None:
        # Copied, as the round's tensors: the trainer may keep it.
        self._client_state = {msg.get(MyMessage.MSG_ARG_KEY_ROUND_INDEX): received_tensors(msg).copy_tensors()}

    def handle_message_receive_model_from_server(self, msg: Message) -> None:
        round_idx = msg.get(MyMessage.MSG_ARG_KEY_ROUND_INDEX)
        config = msg.params.get(MyMessage.MSG_ARG_KEY_CONFIG, {"algorithm": "FedAvg"})
        if config.get("algorithm") != self.algorithm:
            raise RuntimeError(f"client {self.rank} runs {self.algorithm}, but the server runs {config.get('algorithm')}: "
                               f"give every process the same --federated_optimizer (or strategy)")
        self._load_model(msg)
        params, num_samples, seconds, report = self.trainer.train(round_idx, config, self._round_tensors.pop(round_idx, {}),
                                                                  self._client_state.pop(round_idx, None))
        logging.info("client %d: round %d trained on %d samples in %.2f s", self.rank, round_idx, num_samples, seconds)
        if report.client_state is not None:
            self.send_message(tensors_message(MyMessage.MSG_TYPE_C2S_CLIENT_STATE, self.rank, 0, round_idx, report.client_state))
        if report.tensors:
            self.send_message(tensors_message(MyMessage.MSG_TYPE_C2S_UPDATE_TENSORS, self.rank, 0, round_idx, report.tensors))
        reply = Message(MyMessage.MSG_TYPE_C2S_SEND_MODEL_TO_SERVER, self.rank, 0, tensors=params)
        self._pack_reply(reply)
        reply.add_params(MyMessage.MSG_ARG_KEY_ROUND_INDEX, round_idx)
        if report.metadata:
            reply.add_params(MyMessage.MSG_ARG_KEY_METADATA, report.metadata)
        reply.add_params(MyMessage.MSG_ARG_KEY_NUM_SAMPLES, num_samples)
        reply.add_params(MyMessage.MSG_ARG_KEY_TRAIN_SECONDS, seconds)
        self.send_message(reply)

    def _load_model(self, msg: Message) -> None:
        """Load the model ``msg`` carries with the trainer's ``set_model_params``. When it
        arrived straight in the packed memory, the model still lives there (training
        did not move it, e.g. to a GPU), and the trainer keeps the default
        ``set_model_params`` (``load_state_dict``), the model holds it already: loading
        would only copy each tensor onto itself (~1 ms of Python for a ResNet18). A
        trainer that overrides it may do more (keep the global model for a proximal
        term), so it is always called."""
        if msg.packed is not None and msg.packed is self.model_state \
                and type(self.trainer.trainer).set_model_params is ModelTrainer.set_model_params \
                and _places(self.trainer.trainer.model.state_dict()) == self._packed_places:
            return
        self.trainer.update_model(msg.tensors)

    def _pack_reply(self, reply: Message) -> None:
        """Send the trained state as one buffer per dtype: the packed memory itself when
        the state lives there, else (e.g. the model was trained on a GPU, or the trainer
        returns copies) a copy into it, instead of one message per tensor. The packed
        memory may be overwritten: the next model is received into it anyway."""
        params = reply.tensors
        packed = PackedTensors.from_views(params)
        if packed is None and self.model_state is not None and self.model_state.load(params):
            packed = self.model_state
        if packed is not None:  # else: another set of tensors than the model's; sent as they are
            reply.set_packed(packed)

    def handle_message_test_model_on_client(self, msg: Message) -> None:
        round_idx = msg.get(MyMessage.MSG_ARG_KEY_ROUND_INDEX)
        self._load_model(msg)
        result, num_samples, seconds = self.trainer.test(round_idx, msg.params.get(MyMessage.MSG_ARG_KEY_CONFIG),
                                                         self._round_tensors.pop(round_idx, {}))
        reply = Message(MyMessage.MSG_TYPE_C2S_SEND_TEST_RESULT, self.rank, 0)
        reply.add_params(MyMessage.MSG_ARG_KEY_ROUND_INDEX, round_idx)
        reply.add_params(MyMessage.MSG_ARG_KEY_TEST_RESULT, result)
        reply.add_params(MyMessage.MSG_ARG_KEY_NUM_SAMPLES, num_samples)
        reply.add_params(MyMessage.MSG_ARG_KEY_TEST_SECONDS, seconds)
        self.send_message(reply)



def report_failure(transport: Transport, reason: str) -> None:
    """Tell the server that this client stops because of ``reason`` (e.g. ``"MyTrainer.train()
    raised ValueError: ..."``), then wait up to FAILURE_ACK_TIMEOUT seconds for its finish
    message: the process exits next, and a report still in its send queue would die with it.
    Best effort: returns early if the server is gone."""
    if len(reason) > MAX_REASON_CHARS:
        reason = reason[:MAX_REASON_CHARS] + " ..."
    report = Message(MyMessage.MSG_TYPE_C2S_CLIENT_FAILED, transport.rank, 0)
    report.add_params(MyMessage.MSG_ARG_KEY_ERROR, reason)
    deadline = time.monotonic() + FAILURE_ACK_TIMEOUT
    try:
        transport.send(report, timeout=FAILURE_ACK_TIMEOUT)
    except (PeerFailure, TransportTimeout):
        return
    while (left := deadline - time.monotonic()) > 0:
        try:
            reply = transport.receive(timeout=left)
        except PeerFailure as failure:
            if 0 in failure.ranks:
                return
            continue  # another client died: still waiting for the server
        if reply is None or reply.msg_type == MyMessage.MSG_TYPE_S2C_FINISH:
            return


def _places(state) -> list:
    """Where each tensor of a state lives: (address, shape), in order."""
    return [(t.data_ptr(), tuple(t.shape)) for t in state.values()]
