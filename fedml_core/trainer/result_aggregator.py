"""Combines the test metrics that the clients report on a test round."""
from __future__ import annotations

from abc import ABC
from numbers import Real
from typing import Any, Dict, Mapping, Union

from .interface import check_methods

# FineFL's result aggregators name the method aggregate_test_result and take the round.
RESULT_AGGREGATOR_METHODS = (
    {"aggregate_result": "(result_dict)", "aggregate_test_result": "(round_idx, result_dict)"},
)


def check_result_aggregator(aggregator: Union[object, type]) -> None:
    """Raise TypeError naming the aggregator's class when it has neither
    ``aggregate_result`` nor ``aggregate_test_result`` (with the closest name it defines)."""
    check_methods(aggregator, "the result aggregator", RESULT_AGGREGATOR_METHODS)


def aggregate_test_results(aggregator: object, round_idx: int, result_dict: Mapping[int, Mapping[str, Any]]) -> Dict[str, Any]:
    """Call the aggregator's ``aggregate_result(result_dict)``, or, when it has none,
    FineFL's ``aggregate_test_result(round_idx, result_dict)``."""
    if callable(getattr(aggregator, "aggregate_result", None)):
        return aggregator.aggregate_result(result_dict)
    return aggregator.aggregate_test_result(round_idx, result_dict)


class ResultAggregator(ABC):
    """Turns every client's ``test()`` result into the round's global metrics.

    A subclass implements ``aggregate_result(self, result_dict)`` (or, as FineFL's
    aggregators do, ``aggregate_test_result(self, round_idx, result_dict)``, which also
    gets the round's index, from 0). ``result_dict[client_idx]`` (``client_idx`` from 0,
    in process-id order) is ``{"result": <dict returned by ModelTrainer.test>,
    "sample_number": <the client's test samples: get_local_sample_number(test_path)>}``.
    It returns the global metrics (JSON-serialisable).

    Any object with one of these methods will do; this base class checks, when a
    subclass is instantiated, that it has one.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> "ResultAggregator":
        check_result_aggregator(cls)
        return super().__new__(cls)


class WeightedMeanResultAggregator(ResultAggregator):
    """Sample-weighted mean of every numeric metric the clients report.

    A metric missing from some clients is averaged over the clients that report it;
    non-numeric values (and booleans) are left out. The total sample count is returned
    as ``"sample_number"``.
    """

    def aggregate_result(self, result_dict: Mapping[int, Mapping[str, Any]]) -> Dict[str, Any]:
        sums: Dict[str, float] = {}
        weights: Dict[str, int] = {}
        total = 0
        for entry in result_dict.values():
            n = int(entry["sample_number"])
            total += n
            for key, value in entry["result"].items():
                if isinstance(value, Real) and not isinstance(value, bool):
                    sums[key] = sums.get(key, 0.0) + float(value) * n
                    weights[key] = weights.get(key, 0) + n
        combined: Dict[str, Any] = {
            key: (sums[key] / weights[key] if weights[key] else float("nan")) for key in sums
        }
        combined["sample_number"] = total
        return combined
