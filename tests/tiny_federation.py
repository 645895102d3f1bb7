"""A tiny, fully deterministic federation used by the protocol and MPI tests.

Each client's data is a ``data.pt`` file of its own size (so FedAvg weights differ);
the model has float parameters AND BatchNorm buffers (float running statistics and an
int64 ``num_batches_tracked`` counter); training is full-batch SGD with no randomness,
so the same global model and data always give the same local model.
"""
from __future__ import annotations

import os
import time
from argparse import Namespace
from typing import AbstractSet, Any, Callable, Collection, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from fedml_core.trainer.model_trainer import ModelTrainer

FEATURES, CLASSES, LOCAL_STEPS = 4, 3, 3


def make_model(hidden: int = 8) -> nn.Module:
    """The model; ``hidden`` units (12 float32 numbers each) make it as large as a test needs."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(FEATURES, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, CLASSES))


def client_sample_number(client_id: int) -> int:
    return 7 * client_id + 5


def write_client_data(data_path: str, num_clients: int, train_samples: Callable[[int], int] = client_sample_number,
                      test_samples: Callable[[int], int] = lambda cid: 4 + cid) -> None:
    """``<data_path>/<id>/{train,test}/data.pt`` with a different size per client
    (``train_samples(id)`` and ``test_samples(id)``)."""
    for cid in range(1, num_clients + 1):
        g = torch.Generator().manual_seed(cid)
        for split, n in (("train", train_samples(cid)), ("test", test_samples(cid))):
            x = torch.randn(n, FEATURES, generator=g)
            y = torch.randint(0, CLASSES, (n,), generator=g)
            os.makedirs(os.path.join(data_path, str(cid), split), exist_ok=True)
            torch.save({"x": x, "y": y}, os.path.join(data_path, str(cid), split, "data.pt"))


class TinyTrainer(ModelTrainer):
    def _data(self, path: str) -> Dict[str, torch.Tensor]:
        return torch.load(os.path.join(path, "data.pt"))

    def get_local_sample_number(self, train_path: str) -> int:
        return len(self._data(train_path)["y"])

    def train(self, device: torch.device, args: Namespace, train_path: str) -> None:
        time.sleep(getattr(args, "train_delay", 0.0))  # lets tests act in the middle of a round
        data = self._data(train_path)
        self.model.train()
        opt = torch.optim.SGD(self.model.parameters(), lr=0.1)
        for _ in range(LOCAL_STEPS):
            opt.zero_grad()
            nn.functional.cross_entropy(self.model(data["x"]), data["y"]).backward()
            opt.step()

    def test(self, device: torch.device, args: Namespace, test_path: str) -> Dict[str, float]:
        data = self._data(test_path)
        self.model.eval()
        with torch.no_grad():
            logits = self.model(data["x"])
        return {
            "accuracy": (logits.argmax(1) == data["y"]).float().mean().item(),
            "loss": nn.functional.cross_entropy(logits, data["y"]).item(),
        }


class MomentumTrainer(TinyTrainer):
    """TinyTrainer with heavy-ball SGD whose momentum buffers are each client's own
    across rounds (the framework keeps them: get_client_state / set_client_state)."""

    MOMENTUM = 0.9

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.momentum: Optional[Dict[str, torch.Tensor]] = None

    def set_client_state(self, state: Optional[Dict[str, torch.Tensor]]) -> None:
        self.momentum = state

    def get_client_state(self) -> Optional[Dict[str, torch.Tensor]]:
        return self.momentum

    def train(self, device: torch.device, args: Namespace, train_path: str) -> None:
        data = self._data(train_path)
        self.model.train()
        named = list(self.model.named_parameters())
        opt = torch.optim.SGD([p for _, p in named], lr=0.1, momentum=self.MOMENTUM)
        if self.momentum is not None:  # this client's buffers from its last training
            for name, p in named:
                opt.state[p]["momentum_buffer"] = self.momentum[name].clone()
        for _ in range(LOCAL_STEPS):
            opt.zero_grad()
            nn.functional.cross_entropy(self.model(data["x"]), data["y"]).backward()
            opt.step()
        self.momentum = {name: opt.state[p]["momentum_buffer"] for name, p in named}


def reference_run(data_path: str, total: int, per_round: int, rounds: int, personal: AbstractSet[str] = frozenset(),
                  trainer_factory: Callable[[nn.Module], TinyTrainer] = TinyTrainer, seed: int = 0,
                  ) -> Tuple[Dict[str, torch.Tensor], Dict[int, Dict[str, torch.Tensor]], Dict[int, Dict[str, torch.Tensor]]]:
    """FedAvg in one process, in float64, without any framework code, with the tensors
    named in ``personal`` each client's own (FedPer: never averaged; a client starts
    them from the initial model's) and the trainer's per-client state (handed back to
    ``set_client_state`` before the client's next training, None before its first).

    Returns (global state, {client: its personal tensors}, {client: its trainer state})."""
    global_state = {k: v.clone() for k, v in make_model().state_dict().items()}
    own: Dict[int, Dict[str, torch.Tensor]] = {}
    kept: Dict[int, Dict[str, torch.Tensor]] = {}
    for r in range(rounds):
        states, weights = [], []
        for cid in sampled_clients(seed, r, total, per_round):
            trainer = trainer_factory(make_model())
            trainer.model.load_state_dict({**global_state, **own.get(cid, {})})
            trainer.set_client_state(kept.get(cid))  # (a TinyTrainer's keeps nothing)
            train_path = os.path.join(data_path, str(cid), "train")
            trainer.train(torch.device("cpu"), Namespace(), train_path)
            state = {k: v.clone() for k, v in trainer.model.state_dict().items()}
            own[cid] = {k: state[k] for k in personal}
            if trainer.get_client_state() is not None:
                kept[cid] = {k: v.clone() for k, v in trainer.get_client_state().items()}
            states.append(state)
            weights.append(float(trainer.get_local_sample_number(train_path)))
        new_state = {}
        for key, value in global_state.items():
            if key in personal:
                new_state[key] = value
                continue
            mean = sum(s[key].double() * w for s, w in zip(states, weights)) / sum(weights)
            new_state[key] = mean.round().to(value.dtype) if not value.is_floating_point() else mean.to(value.dtype)
        global_state = new_state
    return global_state, own, kept


def sampled_clients(seed: int, round_idx: int, total: int, per_round: int) -> List[int]:
    """The documented sampling rule, written out independently of the framework."""
    if per_round >= total:
        return list(range(1, total + 1))
    return sorted(int(i) + 1 for i in np.random.default_rng([seed, round_idx]).choice(total, per_round, replace=False))


def reference_fedavg(data_path: str, total: int, per_round: int, rounds: int, seed: int = 0, weighted: bool = True,
                     left_out: Optional[Mapping[int, Collection[int]]] = None) -> Dict[str, torch.Tensor]:
    """FedAvg computed in one process, in float64, without any framework code.

    ``left_out``: round -> the sampled clients whose update does not count in that round
    (they failed for the round only: later rounds sample as if they had not)."""
    global_state = {k: v.clone() for k, v in make_model().state_dict().items()}
    for r in range(rounds):
        states, weights = [], []
        for cid in sampled_clients(seed, r, total, per_round):
            if cid in (left_out or {}).get(r, ()):
                continue
            trainer = TinyTrainer(make_model())
            trainer.model.load_state_dict(global_state)
            train_path = os.path.join(data_path, str(cid), "train")
            trainer.train(torch.device("cpu"), Namespace(), train_path)
            states.append({k: v.clone() for k, v in trainer.model.state_dict().items()})
            weights.append(float(trainer.get_local_sample_number(train_path)) if weighted else 1.0)
        total_weight = sum(weights)
        new_state = {}
        for key, value in global_state.items():
            mean = sum(s[key].double() * w for s, w in zip(states, weights)) / total_weight
            new_state[key] = mean.round().to(value.dtype) if not value.is_floating_point() else mean.to(value.dtype)
        global_state = new_state
    return global_state


class ProcessDied(BaseException):
    """Raised in a process's thread to stop it as if it were killed: nothing catches it
    (the framework catches Exception), and ``run_federation`` reports the death to the
    other ranks (``InProcessHub.fail``)."""


class FaultyTrainer(TinyTrainer):
    """TinyTrainer with bugs on demand: each fault ``"METHOD:CLIENT[:ROUND]"`` makes METHOD
    raise ValueError on client CLIENT (in round ROUND only, for train). METHOD
    ``test_tensor`` / ``test_numpy`` makes test() return a torch / numpy scalar metric
    instead, and ``sample_number_zero`` makes get_local_sample_number return 0."""

    def __init__(self, model: nn.Module, faults: Sequence[str] = ()) -> None:
        super().__init__(model)
        self.faults = list(faults)

    def _fault(self, method: str, path: str, round_idx: Optional[int] = None) -> bool:
        client = int(path.rstrip("/").split("/")[-2])
        for spec in self.faults:
            name, target, *when = spec.split(":")
            if name == method and int(target) == client and (not when or int(when[0]) == round_idx):
                return True
        return False

    def get_local_sample_number(self, train_path: str) -> int:
        self.path = train_path  # the first call: which client this trainer serves
        if self._fault("get_local_sample_number", train_path):
            raise ValueError(f"cannot read {train_path}")
        if self._fault("sample_number_zero", train_path):
            return 0
        return super().get_local_sample_number(train_path)

    def set_model_params(self, model_parameters: Dict[str, torch.Tensor]) -> None:
        if self._fault("set_model_params", self.path):
            raise ValueError("injected bug in set_model_params()")
        super().set_model_params(model_parameters)

    def train(self, device: torch.device, args: Namespace, train_path: str) -> None:
        if self._fault("train", train_path, args.round_idx):
            raise ValueError(f"injected bug in round {args.round_idx}")
        super().train(device, args, train_path)

    def test(self, device: torch.device, args: Namespace, test_path: str) -> Dict[str, Any]:
        result = super().test(device, args, test_path)
        if self._fault("test", test_path):
            raise ValueError("injected bug in test()")
        if self._fault("test_tensor", test_path):
            return {**result, "accuracy": torch.tensor(result["accuracy"])}
        if self._fault("test_numpy", test_path):
            return {**result, "accuracy": np.float32(result["accuracy"])}
        return result
