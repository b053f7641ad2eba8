"""The aggregation API under its documented name: ``fedsup.aggregation.Strategy`` and friends.

The code lives in ``fedsup.federated.strategies``; this module keeps the path that configs and user
strategies written against earlier releases import. Nothing inside fedsup imports it.
"""

from fedsup.federated.registry import make_strategy
from fedsup.federated.strategies import (
    ClientUpdate,
    FedAvg,
    FedMedian,
    State,
    Strategy,
    TrimmedMean,
    combine,
    weighted_metrics,
)

__all__ = ["ClientUpdate", "FedAvg", "FedMedian", "State", "Strategy", "TrimmedMean", "combine", "make_strategy",
           "weighted_metrics"]
