"""How the server combines the clients' ResNet18Trainer.test() results."""

from __future__ import annotations

from fedml_core.trainer.result_aggregator import WeightedMeanResultAggregator


class ResNet18ResultAggregator(WeightedMeanResultAggregator):
    """Global accuracy and loss as the sample-weighted means of the clients' values.

    Each client's ``accuracy`` and ``loss`` count in proportion to its ``sample_number``,
    so the result equals the accuracy and mean loss over the union of the clients' test
    sets; ``sample_number`` in the result is the total number of test samples.
    """
