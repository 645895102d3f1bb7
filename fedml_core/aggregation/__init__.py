"""Aggregation strategies: how the server combines client updates into a global model."""
from .strategy import AggregationStrategy, ClientUpdate
from .fedavg import FedAvg, WeightedMeanAccumulator

__all__ = ["AggregationStrategy", "ClientUpdate", "FedAvg", "WeightedMeanAccumulator"]
