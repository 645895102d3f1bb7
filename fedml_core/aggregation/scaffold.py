"""SCAFFOLD (Karimireddy et al., 2020, "SCAFFOLD: Stochastic Controlled Averaging for
Federated Learning"), Algorithm 1 with option II for the client control variate."""
from __future__ import annotations

from argparse import Namespace
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch

from ..distributed.communication.packed_tensors import PackedTensors, dtype_from_name, dtype_name, plan_layout
from .client_state import ClientStateStore
from .local_training import DeviceCache, GradientHooks, cpu_copy, momentum_a_norm, replace_hooks
from .server_optimizer import ServerOptimizer, StateSlices, global_step
from .strategy import ClientAlgorithm, ClientInstructions, ClientReport, ClientRound, ClientUpdate, FederationInfo, TensorEntry
from .validation import InvalidUpdate


class SCAFFOLD(ServerOptimizer):
    """Control variates correct the clients' drift.

    The server keeps the global control variate ``c`` and every client's ``c_i`` (zero
    until the client first trains; kept across rounds, on disk in a
    :class:`~fedml_core.aggregation.client_state.ClientStateStore` under the run
    directory, named in the checkpoint), over the trainable parameters. Each sampled client gets ``c - c_i`` and trains with that
    correction added to every gradient; it returns its model ``y_i`` and, by option II,
    ``c_i+ = c_i - c + (x - y_i) / (K * lr)`` (``K`` local steps of learning rate
    ``lr``; see :class:`ScaffoldClient`). Then, with ``S`` the round's clients and ``N`` all clients::

        x   <- x + server_lr * (1/|S|) * sum_i (y_i - x)      (uniform, as in the paper)
        c   <- c + (1/N) * sum_i (c_i+ - c_i)
        c_i <- c_i+

    Buffers take the uniform mean of the clients' buffers.

    Args:
        server_lr: eta_g, the global step size (1: the mean of the client models).
        max_buffered_updates: see :class:`~fedml_core.aggregation.fedavg.WeightedMeanAccumulator`.
    """

    name = "SCAFFOLD"

    def __init__(self, server_lr: float = 1.0, max_buffered_updates: Optional[int] = None) -> None:
        if not server_lr > 0:
            raise ValueError(f"SCAFFOLD needs server_lr > 0, got {server_lr}")
        super().__init__(max_buffered_updates)
        self.server_lr = server_lr
        self._entries: List[TensorEntry] = []
        self.control = None  # type: Optional[PackedTensors]
        self.client_controls = ClientStateStore(None)  # each client's c_i, by dtype name
        self._returned: Dict[int, PackedTensors] = {}
        self._sent_from: Dict[int, Optional[PackedTensors]] = {}  # the round's clients' c_i, read once from the store

    def setup(self, global_model: PackedTensors, trainable: Sequence[str], federation: FederationInfo) -> None:
        super().setup(global_model, trainable, federation)
        names = set(self.updated_names(global_model, trainable))
        self._entries = [(s.name, s.dtype, s.shape) for s in global_model.specs if s.name in names]
        self.control = self._zeros()
        self.client_controls = federation.client_store("scaffold")

    def _zeros(self) -> PackedTensors:
        specs, sizes = plan_layout(self._entries)
        return PackedTensors(specs, {dtype: torch.zeros(n, dtype=dtype) for dtype, n in sizes.items()})

    def weight(self, update: ClientUpdate) -> float:
        return 1.0

    def configure_round(self, round_idx: int, clients: Sequence[int], global_model: PackedTensors) -> Dict[int, ClientInstructions]:
        instructions = {}
        self._sent_from = {}
        for client in clients:
            own = self._sent_from[client] = self._client_control(client)
            groups = {dtype: c - own.groups[dtype] if own is not None else c for dtype, c in self.control.groups.items()}
            instructions[client] = ClientInstructions(tensors=PackedTensors(self.control.specs, groups).tensors())
        return instructions

    def _client_control(self, client: int) -> Optional[PackedTensors]:
        stored = self.client_controls.get(client)
        return None if stored is None else PackedTensors(self.control.specs, {dtype_from_name(d): g for d, g in stored.items()})

    def expected_client_tensors(self) -> List[TensorEntry]:
        return list(self._entries)

    def check_update(self, update: ClientUpdate) -> None:
        steps = update.metadata.get("local_steps")
        if type(steps) is not int or steps < 1:
            raise InvalidUpdate(f"SCAFFOLD update without a positive 'local_steps' count (got {steps!r})")

    def add(self, update: ClientUpdate) -> None:
        super().add(update)
        # Copied: the transport may recycle its receive buffer for the next client's message.
        self._returned[update.client_id] = PackedTensors(update.tensors.specs, {d: g.clone() for d, g in update.tensors.groups.items()})

    def step(self, mean: torch.Tensor, x: torch.Tensor, old: StateSlices, new: StateSlices) -> None:
        global_step(mean, x, self.server_lr)

    def aggregate(self, global_model: PackedTensors, round_idx: int = 0) -> PackedTensors:
        returned, self._returned = self._returned, {}
        sent_from, self._sent_from = self._sent_from, {}
        result = super().aggregate(global_model, round_idx)
        used = {client: c for client, c in returned.items() if client not in self.rejected_updates()}
        drift = {dtype: torch.zeros_like(c) for dtype, c in self.control.groups.items()}
        for client, new in sorted(used.items()):  # in client order: bit-reproducible
            old = sent_from[client]  # configure_round read it for this round
            for dtype, total in drift.items():
                total += new.groups[dtype]
                if old is not None:
                    total -= old.groups[dtype]
            self.client_controls.put(client, round_idx, {dtype_name(d): g for d, g in new.groups.items()})
        # New memory: the checkpoint may be writing the old c.
        groups = {dtype: drift[dtype].div_(self.federation.num_clients).add_(c) for dtype, c in self.control.groups.items()}
        self.control = PackedTensors(self.control.specs, groups)
        return result

    def state_dict(self) -> Dict[str, Any]:
        def plain(packed: PackedTensors) -> Dict[str, torch.Tensor]:
            return {dtype_name(d): g for d, g in packed.groups.items()}
        return {"control": plain(self.control), "client_controls": self.client_controls.snapshot()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        def packed(groups: Mapping[str, torch.Tensor]) -> PackedTensors:
            loaded = {dtype_from_name(d): g for d, g in groups.items()}
            if {d: g.numel() for d, g in loaded.items()} != {d: g.numel() for d, g in self.control.groups.items()}:
                raise ValueError("SCAFFOLD: the checkpoint's control variates are for another model")
            return PackedTensors(self.control.specs, loaded)
        self.control = packed(state["control"])
        self.client_controls.restore(state["client_controls"])
        self.client_controls.check_layout([(dtype_name(d), d, tuple(c.shape)) for d, c in self.control.groups.items()],
                                          "SCAFFOLD's control variates")

    def client_algorithm(self, args: Namespace) -> ClientAlgorithm:
        return ScaffoldClient()


class ScaffoldClient(ClientAlgorithm):
    """Adds the server's correction ``c - c_i`` to every trainable parameter's gradient,
    counts the local steps ``K``, and returns ``c_i+ = (x - y) / (K * lr) - (c - c_i)``
    (option II).

    ``lr`` is the local learning rate of the round: ``args.round_lr`` when the trainer
    sets it (a trainer with a learning-rate schedule does), else ``args.lr``. With
    heavy-ball momentum ``args.momentum``, ``K`` counts as the plain-SGD steps the
    momentum steps amount to (FedNova's ``||a||_1``); weight decay is not accounted for.
    """

    def __init__(self) -> None:
        self._hooks: Optional[GradientHooks] = None
        self._start: Dict[str, torch.Tensor] = {}
        self._correction: Dict[str, torch.Tensor] = {}
        self._args: Optional[Namespace] = None

    def before_train(self, model: torch.nn.Module, round_info: ClientRound) -> None:
        self._args = round_info.args
        # Every parameter, frozen ones too: the server expects a variate for each of the
        # model's named_parameters() (a frozen one's stays zero: it never moves).
        self._start = cpu_copy(model, frozen=True)
        missing = sorted(set(self._start) - set(round_info.tensors))
        if missing:
            raise ValueError(f"SCAFFOLD: the server sent no control-variate correction for {missing[:5]}")
        self._correction = {name: round_info.tensors[name] for name in self._start}
        on_device = DeviceCache(self._correction)
        self._hooks = replace_hooks(self._hooks, model, lambda name, p, grad: on_device.get(name, grad))

    def after_train(self, model: torch.nn.Module, state: Dict[str, torch.Tensor]) -> ClientReport:
        self._hooks.remove()
        steps = self._hooks.steps
        if steps == 0:
            raise ValueError("SCAFFOLD: local training took no step (no backward pass)")
        lr = getattr(self._args, "round_lr", None) or getattr(self._args, "lr", None)
        if not isinstance(lr, (int, float)) or not lr > 0:
            raise ValueError(f"SCAFFOLD needs the local learning rate as args.lr (--lr) or args.round_lr, got {lr!r}")
        work = momentum_a_norm(steps, float(getattr(self._args, "momentum", 0.0) or 0.0)) * lr
        trained = cpu_copy(model, frozen=True)
        controls = {name: (self._start[name] - trained[name]) / work - self._correction[name] for name in self._start}
        return ClientReport(tensors=controls, metadata={"local_steps": steps})
