"""Combines the test metrics that the clients report on a test round."""
from __future__ import annotations

from abc import ABC, abstractmethod
from numbers import Real
from typing import Any, Dict, Mapping


class ResultAggregator(ABC):
    """Turns every client's ``test()`` result into the round's global metrics."""

    @abstractmethod
    def aggregate_result(self, result_dict: Mapping[int, Mapping[str, Any]]) -> Dict[str, Any]:
        """Combine per-client test results.

        ``result_dict[client_idx]`` (``client_idx`` from 0, in process-id order) is
        ``{"result": <dict returned by ModelTrainer.test>, "sample_number": int}``.
        Returns the global metrics (JSON-serialisable).
        """


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
