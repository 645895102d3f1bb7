"""The client's side of FedAvg computation: wraps the user's ModelTrainer."""
from __future__ import annotations

import json
import operator
import time
from argparse import Namespace
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

import torch

from fedml_api.utils.process_setup import seed_everything
from fedml_core.aggregation import ClientAlgorithm, ClientReport, ClientRound
from fedml_core.trainer.model_trainer import ModelTrainer, ParamsForm, as_named_tensors, keeps_client_state, model_keys


def round_seed(seed: int, round_idx: int, client_id: int) -> int:
    """A seed for one client's local training in one round (distinct per triple)."""
    return (seed * 1_000_003 + round_idx) * 1_000_003 + client_id


class UserCodeError(RuntimeError):
    """A method of the user's ModelTrainer raised, or returned something unusable.

    The message names the class, the method and the original exception, e.g.
    ``"MyTrainer.train() raised ValueError: bad shape"``; it is what the server records
    as the client's failure.
    """


class FedAVGTrainer:
    """Loads the global model, trains and tests it on this client's own data.

    Every call into the user's ModelTrainer goes through here, so an exception in it
    becomes a :class:`UserCodeError` naming the method (the client reports it to the
    server instead of dying silently).

    Args:
        client_id: this client's process id (1..CLIENT_NUM).
        train_path, test_path: ``<data_path>/<client_id>/train`` and ``.../test``.
        device: where to train.
        args: the run's arguments, handed to the ModelTrainer.
        model_trainer: the user's :class:`ModelTrainer`.
        algorithms: what runs around the user's ``train()`` (the algorithm's client
            part, an attack), in order.
        sample_numbers: ``(train, test)`` sample numbers counted before (a worker
            process counts its clients' once); None: count them here.

    Raises:
        UserCodeError: ``get_local_sample_number`` raised or did not return a sample
            count (an integer, at least 1 for the training data, at least 0 for the test data).
    """

    def __init__(self, client_id: int, train_path: str, test_path: str, device: torch.device, args: Namespace, model_trainer: ModelTrainer,
                 algorithms: Sequence[ClientAlgorithm] = (), sample_numbers: Optional[Tuple[int, int]] = None) -> None:
        self.client_id = client_id
        self.train_path = train_path
        self.test_path = test_path
        self.device = device
        self.args = args
        self.trainer = model_trainer
        self.algorithms = list(algorithms)
        self.keeps_client_state = keeps_client_state(model_trainer)
        # set_model_params gets the global model as get_model_params gives it (numpy, a list).
        params = self._call("get_model_params")
        self.params_form = ParamsForm.of(params)
        # A list's tensors are "0", "1", ... on the wire, while the algorithm parts know the
        # model's names (SCAFFOLD's control variates are per named parameter): wire name ->
        # model name, to rename the extra tensors both ways.
        model = getattr(model_trainer, "model", None)
        self._model_names: Dict[str, str] = {}
        if self.params_form.as_list and isinstance(model, torch.nn.Module):
            self._model_names = model_keys([str(i) for i in range(len(params))], model)
        if sample_numbers is None:
            sample_numbers = self._sample_number(train_path, minimum=1), self._sample_number(test_path, minimum=0)
        self.train_sample_number, self.test_sample_number = sample_numbers

    def _call(self, method: str, *args: Any) -> Any:
        """``self.trainer.<method>(*args)``, with any exception turned into a UserCodeError."""
        function: Callable[..., Any] = getattr(self.trainer, method)
        try:
            return function(*args)
        except Exception as error:
            raise UserCodeError(f"{self._name(method)} raised {type(error).__name__}: {error}") from error

    def _name(self, method: str) -> str:
        return f"{type(self.trainer).__name__}.{method}()"

    def _model_params(self) -> Dict[str, torch.Tensor]:
        """``get_model_params()`` as name -> tensor (it may return numpy arrays, a list)."""
        try:
            return as_named_tensors(self._call("get_model_params"), self.trainer)
        except TypeError as error:  # neither tensors nor arrays: unusable
            raise UserCodeError(str(error)) from None

    def _sample_number(self, path: str, minimum: int) -> int:
        count = self._call("get_local_sample_number", path)
        try:
            if isinstance(count, bool):
                raise TypeError
            number = operator.index(count)  # int, numpy integers; not 3.0 or "3"
        except TypeError:
            raise UserCodeError(f"{self._name('get_local_sample_number')} must return an integer sample count "
                                f"for {path}, got {count!r} ({type(count).__name__})") from None
        if number < minimum:
            expected = "a positive sample count" if minimum == 1 else f"a sample count of at least {minimum}"
            raise UserCodeError(f"{self._name('get_local_sample_number')} returned {number} for {path}; expected {expected}")
        return number

    def update_model(self, global_params: Mapping[str, torch.Tensor]) -> None:
        self._call("set_model_params", self.params_form.convert(global_params))

    def train(self, round_idx: int, config: Optional[Mapping[str, Any]] = None,
              tensors: Optional[Mapping[str, torch.Tensor]] = None,
              client_state: Optional[Dict[str, torch.Tensor]] = None) -> Tuple[Dict[str, torch.Tensor], int, float, ClientReport]:
        """Train locally for round ``round_idx`` with the server's ``config`` and extra
        ``tensors`` for it; returns (state, sample number, seconds, what the algorithms
        send besides the state), the state as name -> tensor whatever ``get_model_params``
        returned (numpy arrays, a list).

        ``client_state``: what the server kept of this client's trainer state (None:
        none yet), handed to the trainer's ``set_client_state`` first, when it keeps one;
        its new state is then the report's ``client_state``.

        The random generators are re-seeded from ``(args.seed, round_idx, client_id)``
        first, so a client's update is a function of the global model, its state and the
        round alone: runs are reproducible and a resumed run continues bit-exactly.
        """
        # The ModelTrainer signature has no round index; learning-rate schedules read it here.
        self.args.round_idx = round_idx
        seed_everything(round_seed(getattr(self.args, "seed", 0), round_idx, self.client_id))
        start = time.perf_counter()
        if self.keeps_client_state:
            self._call("set_client_state", client_state)
        round_info = self._round_info(round_idx, config, tensors)
        for algorithm in self.algorithms:
            algorithm.before_train(self.trainer.model, round_info)
        self._call("train", self.device, self.args, self.train_path)
        state = self._model_params()
        report = ClientReport(client_state=self._client_state() if self.keeps_client_state else None)
        for algorithm in self.algorithms:
            part = algorithm.after_train(self.trainer.model, state)
            report.tensors.update(part.tensors)
            report.metadata.update(part.metadata)
        if self._model_names:
            wire_names = {model_name: name for name, model_name in self._model_names.items()}
            report.tensors = {wire_names.get(name, name): t for name, t in report.tensors.items()}
        seconds = time.perf_counter() - start
        return state, self.train_sample_number, seconds, report

    def _round_info(self, round_idx: int, config: Optional[Mapping[str, Any]],
                    tensors: Optional[Mapping[str, torch.Tensor]]) -> ClientRound:
        """What the algorithm parts get of the round, the tensors by the model's names."""
        tensors = {self._model_names.get(name, name): t for name, t in (tensors or {}).items()}
        return ClientRound(round_idx, self.client_id, dict(config or {}), tensors, self.args)

    def _client_state(self) -> Optional[Dict[str, torch.Tensor]]:
        """``get_client_state()`` as CPU copies (the trainer goes on changing its own
        tensors, and the next client's training may start before they are sent);
        None when it returned None or nothing."""
        returned = self._call("get_client_state")
        if returned is None:
            return None
        if not isinstance(returned, Mapping) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in returned.items()):
            raise UserCodeError(f"{self._name('get_client_state')} must return None or a dict of name (str) -> torch tensor, "
                                f"got {type(returned).__name__}")
        return {name: t.detach().to("cpu", copy=True) for name, t in returned.items()} or None

    def test(self, round_idx: int = 0, config: Optional[Mapping[str, Any]] = None,
             tensors: Optional[Mapping[str, torch.Tensor]] = None) -> Tuple[Dict[str, Any], int, float]:
        """Test the current model on this client's test data; (metrics, sample number,
        seconds). The algorithms' ``before_test`` get the server's ``config`` and extra
        ``tensors`` for this client's test in round ``round_idx`` first (e.g. its own
        personal layers)."""
        start = time.perf_counter()
        round_info = self._round_info(round_idx, config, tensors)
        for algorithm in self.algorithms:
            algorithm.before_test(self.trainer.model, round_info)
        result = self._call("test", self.device, self.args, self.test_path)
        seconds = time.perf_counter() - start
        try:
            json.dumps(result, allow_nan=True)
        except (TypeError, ValueError) as error:
            raise UserCodeError(
                f"{self._name('test')} must return a JSON-serialisable dict of metrics "
                f"(plain floats/ints/strings; convert tensors with .item()), got {result!r}: {error}"
            ) from None
        return result, self.test_sample_number, seconds
