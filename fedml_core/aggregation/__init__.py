"""Aggregation strategies: how the server combines client updates into a global model."""
from .strategy import AggregationStrategy, ClientUpdate
from .fedavg import FedAvg, WeightedMeanAccumulator
from .validation import InvalidUpdate, check_layout, non_finite_tensor

__all__ = ["AggregationStrategy", "ClientUpdate", "FedAvg", "InvalidUpdate", "WeightedMeanAccumulator", "check_layout", "non_finite_tensor"]
