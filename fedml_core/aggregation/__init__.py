"""Federated algorithms: how the server combines client updates into a global model
(:class:`AggregationStrategy`) and what clients do around their training
(:class:`ClientAlgorithm`). ``registry.REGISTRY`` lists them by name."""
from .strategy import AggregationStrategy, ClientAlgorithm, ClientInstructions, ClientReport, ClientRound, ClientUpdate, FederationInfo
from .fedavg import FedAvg, WeightedMeanAccumulator
from .validation import InvalidUpdate, check_layout, non_finite_tensor

__all__ = ["AggregationStrategy", "ClientAlgorithm", "ClientInstructions", "ClientReport", "ClientRound", "ClientUpdate", "FedAvg",
           "FederationInfo", "InvalidUpdate", "WeightedMeanAccumulator", "check_layout", "non_finite_tensor"]
