"""Checks that a user's class has the methods the federation will call, before it calls them.

A missing or misspelt method would otherwise surface as an AttributeError in the middle
of a run (a result aggregator's, after a whole round of training). These checks run
when the object is built and name the class, the method, and the closest name the
class does define.
"""
from __future__ import annotations

import difflib
from typing import Mapping, Sequence, Union


def check_methods(obj: Union[object, type], role: str, required: Sequence[Mapping[str, str]]) -> None:
    """Raise TypeError unless ``obj`` (an instance or a class) implements every requirement.

    Args:
        obj: the user's object, or its class.
        role: what the object is for, for the message (e.g. ``"the ModelTrainer"``).
        required: one mapping per requirement, from each accepted method name to the
            signature shown in the message; a requirement is met by any one of its
            names (e.g. ``{"aggregate_result": "(result_dict)",
            "aggregate_test_result": "(round_idx, result_dict)"}``). An abstract method
            does not count.
    """
    cls = obj if isinstance(obj, type) else type(obj)
    abstract = getattr(cls, "__abstractmethods__", frozenset())
    # Looked up on obj itself: an instance may carry a method as an attribute.
    defined = [name for name in dir(obj) if not name.startswith("_") and callable(getattr(obj, name, None))]
    for accepted in required:
        if any(callable(getattr(obj, name, None)) and name not in abstract for name in accepted):
            continue
        wanted = " or ".join(f"{name}{signature}" for name, signature in accepted.items())
        message = f"{cls.__name__} ({role}) does not implement {wanted}"
        # A near miss among its other methods is most likely a misspelling (not another
        # method of the interface: get_model_params is no misspelt set_model_params).
        others = [name for name in defined if name not in abstract and not any(name in r for r in required)]
        for name in accepted:
            close = difflib.get_close_matches(name, others, n=1, cutoff=0.6)
            if close:
                message += f"; it defines {close[0]}(): misspelt? Rename it to {name}"
                break
        raise TypeError(message)
