"""FedPer (Arivazhagan et al., 2019, "Federated Learning with Personalization Layers"):
the base layers are federated, the personalization layers stay each client's own."""
from __future__ import annotations

import difflib
from argparse import Namespace
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import torch

from ..distributed.communication.packed_tensors import PackedTensors, TensorSpec
from .client_state import ClientStateStore
from .fedavg import FedAvg
from .strategy import ClientAlgorithm, ClientInstructions, ClientRound, ClientUpdate, FederationInfo


def parse_prefixes(personal_layers: Union[str, Sequence[str], None]) -> List[str]:
    """``"fc,layer4"`` (or ``["fc", "layer4"]``) -> ``["fc", "layer4"]``; raises
    ValueError when there is none or one is empty."""
    if personal_layers is None:
        raise ValueError("FedPer needs the personal layers: --personal_layers PREFIXES (e.g. fc, or fc,layer4)")
    prefixes = personal_layers.split(",") if isinstance(personal_layers, str) else list(personal_layers)
    prefixes = [p.strip() for p in prefixes]
    if not prefixes or not all(prefixes):
        raise ValueError(f"--personal_layers must be comma-separated name prefixes such as fc,layer4, got {personal_layers!r}")
    return prefixes


def is_personal(name: str, prefixes: Sequence[str]) -> bool:
    """Whether tensor ``name`` is under one of ``prefixes``. A prefix names a module (or
    a tensor), so it ends at a dot: ``fc`` takes ``fc.weight`` and ``fc.bias``, not ``fc2.weight``."""
    return any(name == p or name.startswith(p if p.endswith(".") else p + ".") for p in prefixes)


class FedPer(FedAvg):
    """FedAvg of the base layers; the personal layers, every tensor (parameter or
    buffer) under ``personal_layers``, are each client's own and never averaged.

    The server keeps each client's personal layers (on disk, in a
    :class:`~fedml_core.aggregation.client_state.ClientStateStore` under the run
    directory, named in the checkpoint) and sends them, as extra tensors, with the
    client's training assignment and before it tests (so test rounds report the
    personalised models' metrics); the client part loads them into the model over the
    global model's. A client's update holds them trained: they become its stored
    version, and the rest of the update, the base layers, takes the FedAvg mean. In the
    global model the personal layers keep their initial values, so a client seen for
    the first time (which is sent none) starts from those, and so does ``final_model.pt``.

    Args:
        personal_layers: name prefixes of the personal tensors, comma-separated or a
            list (e.g. ``"fc"``, ``"fc,layer4"``; see :func:`is_personal`), matched
            against the model's ``state_dict`` keys (also when ``get_model_params()``
            returns a list: its tensors by position).
        max_buffered_updates: see :class:`~fedml_core.aggregation.fedavg.WeightedMeanAccumulator`.
    """

    name = "FedPer"
    # Each client's personal layers come back in its own update: no partial sums.
    accepts_partial_sums = False

    def __init__(self, personal_layers: Union[str, Sequence[str], None] = None, max_buffered_updates: Optional[int] = None) -> None:
        super().__init__(max_buffered_updates)
        self.prefixes = parse_prefixes(personal_layers)
        self._personal: List[TensorSpec] = []
        self.personal_layers = ClientStateStore(None)  # each client's own, by name
        self._returned: Dict[int, Dict[str, torch.Tensor]] = {}

    def setup(self, global_model: PackedTensors, trainable: Sequence[str], federation: FederationInfo) -> None:
        # Matched by the model's names: a list's tensors ("0", "1", ...) by theirs.
        names = [federation.model_name(spec.name) for spec in global_model.specs]
        for prefix in self.prefixes:
            if not any(is_personal(name, [prefix]) for name in names):
                modules = sorted({name.split(".")[0] for name in names})
                close = difflib.get_close_matches(prefix, modules + names, n=1)
                raise ValueError(f"--personal_layers: {prefix!r} names no tensor of the model"
                                 f"{f' (did you mean {close[0]!r}?)' if close else ''}; its top-level modules are "
                                 f"{', '.join(modules[:20])}")
        self._personal = [spec for spec in global_model.specs if is_personal(federation.model_name(spec.name), self.prefixes)]
        personal = {spec.name for spec in self._personal}
        floating = {spec.name for spec in global_model.specs if spec.dtype.is_floating_point}
        federated = [name for name in trainable if name not in personal and name in floating]
        if not federated:
            raise ValueError(f"--personal_layers {','.join(self.prefixes)} takes every parameter of the model: "
                             f"FedPer would federate nothing (name only the layers each client keeps, e.g. the head)")
        self.personal_layers = federation.client_store("fedper")

    def _instructions(self, clients: Sequence[int]) -> Dict[int, ClientInstructions]:
        """Each client's stored personal layers (a client without any is sent none)."""
        instructions = {}
        for client in clients:
            layers = self.personal_layers.get(client)
            if layers is not None:
                instructions[client] = ClientInstructions(tensors=layers)
        return instructions

    def configure_round(self, round_idx: int, clients: Sequence[int], global_model: PackedTensors) -> Dict[int, ClientInstructions]:
        return self._instructions(clients)

    def configure_test(self, round_idx: int, clients: Sequence[int], global_model: PackedTensors) -> Dict[int, ClientInstructions]:
        return self._instructions(clients)

    def add(self, update: ClientUpdate) -> None:
        super().add(update)
        # Copied (each its own memory, which the store writes as it is): the update's
        # params may be lent memory, valid until aggregate returns.
        self._returned[update.client_id] = {spec.name: update.params.view(spec).clone() for spec in self._personal}

    def aggregate(self, global_model: PackedTensors, round_idx: int = 0) -> PackedTensors:
        returned, self._returned = self._returned, {}
        result = super().aggregate(global_model, round_idx)
        for spec in self._personal:  # never a mean: the global model's (initial) values
            result.view(spec).copy_(global_model.view(spec))
        rejected = self.rejected_updates()
        for client, layers in sorted(returned.items()):
            if client not in rejected:  # a rejected update (NaN) leaves the client its last version
                self.personal_layers.put(client, round_idx, layers)
        return result

    def state_dict(self) -> Dict[str, Any]:
        return {"personal_layers": self.personal_layers.snapshot()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if "personal_layers" not in state:
            raise ValueError(f"FedPer: the checkpoint's strategy state holds {sorted(state)}, not FedPer's personal layers")
        self.personal_layers.restore(state["personal_layers"])
        self.personal_layers.check_layout([(s.name, s.dtype, s.shape) for s in self._personal], "FedPer's personal layers")

    def client_algorithm(self, args: Namespace) -> ClientAlgorithm:
        return FedPerClient(self.prefixes)


class FedPerClient(ClientAlgorithm):
    """Loads the personal layers the server sends (this client's own) into the model,
    over the global model's, before training and before testing; a client sent none
    keeps the global model's (their initial values). What it trains goes back in its
    update, as the rest of the model does.

    Args:
        prefixes: the ``--personal_layers`` (see :func:`is_personal`).
    """

    def __init__(self, prefixes: Sequence[str]) -> None:
        self.prefixes = list(prefixes)

    def before_train(self, model: torch.nn.Module, round_info: ClientRound) -> None:
        self._load(model, round_info.tensors)

    def before_test(self, model: torch.nn.Module, round_info: ClientRound) -> None:
        self._load(model, round_info.tensors)

    def _load(self, model: torch.nn.Module, layers: Mapping[str, torch.Tensor]) -> None:
        # Loaded by name into the model's own tensors (a list's arrive renamed to them).
        state = model.state_dict()
        if not any(is_personal(name, self.prefixes) for name in state):
            raise ValueError(f"FedPer: --personal_layers {','.join(self.prefixes)} names no tensor of the model's state_dict(); "
                             f"FedPer needs get_model_params() to name the tensors as state_dict() does")
        with torch.no_grad():
            for name, value in layers.items():
                if name not in state or not is_personal(name, self.prefixes) or state[name].shape != value.shape:
                    raise ValueError(f"FedPer: the server sent the personal layer {name!r} {list(value.shape)}, which is "
                                     f"not one of this model's under --personal_layers {','.join(self.prefixes)}")
                state[name].copy_(value)
