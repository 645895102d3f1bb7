"""The one class a user writes to federate a model: how to get, set, train and test it."""
from __future__ import annotations

from abc import ABC, abstractmethod
from argparse import Namespace
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Sequence, Union

import numpy as np
import torch

from .interface import check_methods

# What get_model_params may return: name -> tensor or numpy array (a dict, an
# OrderedDict), or a list of them in a fixed order.
ModelParams = Union[Mapping[str, Any], Sequence[Any]]

TRAINER_METHODS = (
    {"get_model_params": "()"},
    {"set_model_params": "(model_parameters)"},
    {"get_local_sample_number": "(train_path)"},
    {"train": "(device, args, train_path)"},
    {"test": "(device, args, test_path)"},
)


# The optional pair of hooks through which a trainer keeps a state per client (see
# ModelTrainer.get_client_state): a trainer defines both or neither.
CLIENT_STATE_METHODS = ("get_client_state", "set_client_state")


def check_trainer(trainer: Union[object, type]) -> None:
    """Raise TypeError naming the trainer's class and the first method of the
    ModelTrainer interface it lacks (with the closest name it defines, if any), or the
    client-state hook it lacks when it defines only one of the two."""
    check_methods(trainer, "the ModelTrainer", TRAINER_METHODS)
    cls = trainer if isinstance(trainer, type) else type(trainer)
    defined = [name for name in CLIENT_STATE_METHODS if _defines(trainer, name)]
    if len(defined) == 1:
        missing = next(name for name in CLIENT_STATE_METHODS if name not in defined)
        raise TypeError(f"{cls.__name__} (the ModelTrainer) defines {defined[0]}() but not {missing}(): a trainer that keeps "
                        f"a state per client defines both (the framework hands back through set_client_state what "
                        f"get_client_state returned)")


def keeps_client_state(trainer: Union[object, type]) -> bool:
    """Whether ``trainer`` keeps a state per client: it defines
    :meth:`ModelTrainer.get_client_state` (and ``set_client_state``) itself."""
    return all(_defines(trainer, name) for name in CLIENT_STATE_METHODS)


def _defines(trainer: Union[object, type], name: str) -> bool:
    """Whether ``trainer`` has a method ``name`` other than ModelTrainer's default."""
    method = getattr(trainer if isinstance(trainer, type) else type(trainer), name, None)
    if method is None:  # an instance may carry it as an attribute (not a ModelTrainer)
        return callable(getattr(trainer, name, None))
    return callable(method) and method is not getattr(ModelTrainer, name)


class ModelTrainer(ABC):
    """Wraps one model instance per process; the federation only talks to it through here.

    Every process (server and clients) builds one in ``main_fedavg.py`` around the same
    architecture. The server uses it only to hold and hand out the global parameters; the
    clients also train and test with it. ``self.model`` is the wrapped ``torch.nn.Module``;
    ``self.id`` is this client's index (``process_id - 1``, the ``client_idx`` of the
    result aggregator's ``result_dict``), set with :meth:`set_id` before the client first
    calls any other method; 0 on the server.

    A trainer that keeps something of its own per client across rounds (its optimizer's
    momentum buffers, a learning-rate scheduler's state) overrides the optional pair
    :meth:`get_client_state` / :meth:`set_client_state`.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> "ModelTrainer":
        # Before ABC's own check: a misspelt method gets a message that says so.
        check_trainer(cls)
        return super().__new__(cls)

    def __init__(self, model: torch.nn.Module, args: Namespace | None = None) -> None:
        self.model = model
        self.args = args
        self.id = 0

    def set_id(self, trainer_id: int) -> None:
        """Set ``self.id``; the federation calls it on each client with ``process_id - 1``."""
        self.id = trainer_id

    def get_model_params(self) -> ModelParams:
        """Return the model's full state: parameters AND buffers (BatchNorm statistics,
        ``num_batches_tracked`` counters), as ``state_dict()`` does. Tensors may share
        memory with the model; the framework copies them before the model changes.

        An override may return numpy arrays instead of tensors, and a list instead of a
        name -> value mapping (see :func:`as_named_tensors`); whatever it returns is the
        federated state, so a subset (e.g. only ``named_parameters()``) is averaged alone.
        """
        return self.model.state_dict()

    def set_model_params(self, model_parameters: Dict[str, torch.Tensor]) -> None:
        """Load a full state (the global model) into ``self.model``; keys must match.

        ``model_parameters`` has the names, dtypes and form that :meth:`get_model_params`
        returned: CPU tensors, or numpy arrays if it returned numpy arrays; a list, in
        that order, if it returned a list (see :class:`ParamsForm`).
        """
        self.model.load_state_dict(model_parameters)

    def get_client_state(self) -> Optional[Dict[str, torch.Tensor]]:
        """Optional hook: this client's own state after :meth:`train` (e.g. its
        optimizer's momentum buffers), as name -> tensor, for the framework to keep and
        hand back to :meth:`set_client_state` before this client next trains.

        Called after every ``train()``. The server keeps the latest state of every client
        on disk (the client-state store under the run directory, saved with the
        checkpoints, so ``--resume`` continues it), whatever the ``--federated_optimizer``;
        it is never averaged, and goes back to this client only. With
        ``--worker_processes`` one trainer serves many clients in turn, so the state must
        be all the trainer carries from one training of a client to its next. Return None
        (or an empty dict) to keep nothing this time (the client's last state stays). The
        default keeps nothing, and then neither hook is called.
        """
        return None

    def set_client_state(self, state: Optional[Dict[str, torch.Tensor]]) -> None:
        """Optional hook: called before every :meth:`train` with what
        :meth:`get_client_state` returned after this client's last training (CPU
        tensors, this trainer's to keep), or None for a client with no state yet (its
        first training): start it fresh. Only for ``train()``: ``test()`` runs without it.
        """

    @abstractmethod
    def get_local_sample_number(self, train_path: str) -> int:
        """Number of training samples under ``train_path``: this client's FedAvg weight."""

    @abstractmethod
    def train(self, device: torch.device, args: Namespace, train_path: str) -> None:
        """Train ``self.model`` in place on the data under ``train_path`` (local epochs,
        batch size, learning rate etc. come from ``args``)."""

    @abstractmethod
    def test(self, device: torch.device, args: Namespace, test_path: str) -> Dict[str, Any]:
        """Evaluate ``self.model`` on the data under ``test_path``.

        Returns a JSON-serialisable dict of metrics, e.g. ``{"accuracy": 0.91, "loss": 0.3}``.
        The server combines the clients' dicts with a :class:`ResultAggregator`.
        """


def as_named_tensors(params: ModelParams, trainer: object) -> Dict[str, torch.Tensor]:
    """``get_model_params()``'s result as name -> tensor, converted once.

    Args:
        params: a mapping (dict, OrderedDict) from names to torch tensors or numpy
            arrays, or a list/tuple of them (named ``"0"``, ``"1"``, ... in order).
        trainer: the ModelTrainer that returned them, named in errors.

    A numpy array becomes a tensor of the same dtype over the same memory (a
    non-contiguous one is made contiguous first); the framework copies every tensor
    once, into the buffers it sends or aggregates. Raises TypeError naming the trainer
    and the entry for anything else.
    """
    if isinstance(params, Mapping):
        items = list(params.items())
    elif isinstance(params, (list, tuple)):
        items = [(str(i), value) for i, value in enumerate(params)]
    else:
        raise TypeError(f"{type(trainer).__name__}.get_model_params() must return a dict (name -> tensor or numpy "
                        f"array) or a list of tensors or arrays, got {type(params).__name__}")
    named: Dict[str, torch.Tensor] = {}
    for name, value in items:
        if isinstance(value, np.ndarray):
            # (np.ascontiguousarray would turn a 0-d array into a 1-d one.)
            value = torch.from_numpy(value if value.flags.c_contiguous else value.copy())
        elif not isinstance(value, torch.Tensor):
            raise TypeError(f"{type(trainer).__name__}.get_model_params()[{name!r}] is a {type(value).__name__}; "
                            f"expected a torch tensor or a numpy array")
        named[str(name)] = value
    return named


def model_keys(names: Sequence[str], model: torch.nn.Module) -> Dict[str, str]:
    """Which of ``model``'s tensors each of a ``get_model_params()`` result's ``names`` is:
    name -> ``state_dict`` key.

    Names that are ``state_dict`` keys are themselves. A list's tensors, named ``"0"``,
    ``"1"``, ..., are matched by position with the ``state_dict`` when there are as many,
    else with ``named_parameters()`` (a list of the parameters only). Empty when neither
    fits: the result cannot be told apart.
    """
    keys = list(model.state_dict())
    if set(names) & set(keys):
        return {name: name for name in names if name in set(keys)}
    parameters = [name for name, _ in model.named_parameters()]
    for candidates in (keys, parameters):
        if len(candidates) == len(names):
            return dict(zip(names, candidates))
    return {}


@dataclass(frozen=True)
class ParamsForm:
    """The form of a trainer's ``get_model_params()`` result, so that its
    ``set_model_params`` gets the global model in the same form.

    Attributes:
        as_list: it is a list (or tuple) rather than a name -> value mapping.
        as_numpy: its values are numpy arrays rather than tensors.
    """

    as_list: bool
    as_numpy: bool

    @classmethod
    def of(cls, params: ModelParams) -> "ParamsForm":
        values = list(params.values()) if isinstance(params, Mapping) else list(params)
        return cls(as_list=not isinstance(params, Mapping),
                   as_numpy=bool(values) and all(isinstance(v, np.ndarray) for v in values))

    def convert(self, state: Mapping[str, torch.Tensor]) -> ModelParams:
        """``state`` (name -> CPU tensor, in get_model_params order) in this form; numpy
        arrays share the tensors' memory."""
        if not (self.as_list or self.as_numpy):
            return state
        values = [t.numpy() for t in state.values()] if self.as_numpy else list(state.values())
        return values if self.as_list else dict(zip(state, values))
