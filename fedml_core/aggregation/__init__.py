"""Aggregation strategies: how the server combines client updates into a global model."""
from .strategy import AggregationStrategy, ClientUpdate
from .fedavg import FedAvg, WeightedMeanAccumulator
from .validation import InvalidUpdate, check_update

__all__ = ["AggregationStrategy", "ClientUpdate", "FedAvg", "InvalidUpdate", "WeightedMeanAccumulator", "check_update"]
