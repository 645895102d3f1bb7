"""Tools for the client side of algorithms: acting on the user's training from outside."""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import torch

#: ``correction(name, param, grad)``: the tensor added to ``param``'s gradient (None: nothing).
Correction = Callable[[str, torch.nn.Parameter, torch.Tensor], Optional[torch.Tensor]]


def momentum_a_norm(steps: int, momentum: float) -> float:
    """How many plain SGD steps ``steps`` steps of heavy-ball ``momentum`` amount to:
    the sum over the gradients of each one's total weight in the final displacement,
    ``||a||_1`` of FedNova (Wang et al., 2020, section 5); ``steps`` without momentum."""
    if momentum == 0:
        return float(steps)
    return (steps - momentum * (1 - momentum ** steps) / (1 - momentum)) / (1 - momentum)


def trainable_parameters(model: torch.nn.Module) -> List[Tuple[str, torch.nn.Parameter]]:
    """``(name, parameter)`` of the parameters local training updates."""
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def cpu_copy(model: torch.nn.Module, frozen: bool = False) -> Dict[str, torch.Tensor]:
    """An independent CPU copy of the trainable parameters (never a view of the model's
    memory, which the next received model overwrites); ``frozen``: of every
    floating-point parameter, those with ``requires_grad=False`` too (what a server
    strategy updates: the floating-point entries of ``named_parameters()``)."""
    parameters = ([(name, p) for name, p in model.named_parameters() if p.is_floating_point()] if frozen
                  else trainable_parameters(model))
    return {name: p.detach().to("cpu", copy=True) for name, p in parameters}


class GradientHooks:
    """Adds ``correction(name, param, grad)`` to the gradient of every trainable
    parameter of ``model`` in each backward pass of the user's training loop, and counts
    those passes (:attr:`steps`: local SGD steps, for a loop with one backward per step).

    The parameters' identity survives ``model.to(device)``, so the hooks do too. Use
    :func:`replace_hooks`, so that hooks a failed round left are removed first.
    """

    def __init__(self, model: torch.nn.Module, correction: Correction) -> None:
        self.steps = 0
        parameters = trainable_parameters(model)
        if not parameters:
            raise ValueError("the model has no trainable parameters")
        first = parameters[0][1]

        def hook_for(name: str, param: torch.nn.Parameter):
            def hook(grad: torch.Tensor) -> torch.Tensor:
                if param is first:
                    self.steps += 1
                added = correction(name, param, grad)
                return grad if added is None else grad + added
            return hook

        self._handles = [p.register_hook(hook_for(name, p)) for name, p in parameters]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def replace_hooks(previous: Optional[GradientHooks], model: torch.nn.Module, correction: Correction) -> GradientHooks:
    """New :class:`GradientHooks` on ``model``, after removing ``previous`` (a round
    whose training raised never reached the part's ``after_train``)."""
    if previous is not None:
        previous.remove()
    return GradientHooks(model, correction)


class DeviceCache:
    """CPU tensors by name, moved to a device once per device (training may move the
    model to a GPU after the algorithm got the tensors)."""

    def __init__(self, tensors: Dict[str, torch.Tensor]) -> None:
        self.cpu = tensors
        self._moved: Dict[Tuple[str, torch.device, torch.dtype], torch.Tensor] = {}

    def get(self, name: str, like: torch.Tensor) -> torch.Tensor:
        tensor = self.cpu[name]
        if tensor.device == like.device and tensor.dtype == like.dtype:
            return tensor
        key = (name, like.device, like.dtype)
        if key not in self._moved:
            self._moved[key] = tensor.to(like.device, like.dtype)
        return self._moved[key]
