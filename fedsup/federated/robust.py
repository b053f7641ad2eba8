"""Byzantine-robust aggregation: Krum, MultiKrum and Bulyan, beside the median and trimmed mean.

* ``Krum`` (``"krum"``) and ``MultiKrum`` (``"multikrum"``): Blanchard et al., "Machine Learning with
  Adversaries: Byzantine Tolerant Gradient Descent" (NeurIPS 2017);
* ``Bulyan`` (``"bulyan"``): El Mhamdi et al., "The Hidden Vulnerability of Distributed Learning in
  Byzantium" (ICML 2018), as the paper defines it and Flower's ``aggregate_bulyan`` computes it: Krum
  applied again and again, each pick removed before the next, until n - 2f are chosen, then per coordinate
  the mean of the values closest to the median.

Distances are squared Euclidean over every floating key, in float64; ties go to the lower ``client_id``.
Each rule says how many updates it needs (``min_clients(options)``), so a config whose rounds are too
small for its ``num_malicious_nodes`` is refused before the run starts.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from fedsup.engine.errors import ConfigError
from fedsup.federated.strategies import (
    ClientUpdate,
    State,
    Strategy,
    checked,
    combine,
    count_option,
    streaming_weighted_mean,
)


def squared_distances(global_state: State, ordered: Sequence[ClientUpdate]) -> torch.Tensor:
    """The n x n float64 matrix of squared Euclidean distances between the updates' floating keys.

    Equal to the distance between the models flattened and concatenated in key order, accumulated key by
    key so that only one key's tensors are held in float64 at a time. Exactly symmetric, zero diagonal.
    Integer and bool keys are left out (Flower's concatenation would include them).
    """
    count = len(ordered)
    distances = torch.zeros(count, count, dtype=torch.float64)
    for key, reference in global_state.items():
        if not reference.is_floating_point():
            continue
        stacked = torch.stack([u.state[key].to(reference.device).to(torch.float64).reshape(-1) for u in ordered])
        for i in range(count - 1):
            difference = stacked[i + 1 :] - stacked[i]
            distances[i, i + 1 :] += (difference * difference).sum(dim=1).cpu()
    return distances + distances.T


def krum_scores(distances: torch.Tensor, active: Sequence[int], num_malicious_nodes: int) -> list[float]:
    """Krum's score of each index in ``active``: the sum of its ``max(1, n - f - 2)`` smallest distances to the others.

    ``n`` is ``len(active)``. The ``max(1, ...)`` is Flower's: it keeps the rule defined when n < f + 3.
    """
    neighbours = max(1, len(active) - num_malicious_nodes - 2)
    table = distances.tolist()
    scores = []
    for i in active:
        nearest = sorted(table[i][j] for j in active if j != i)[:neighbours]
        scores.append(math.fsum(nearest))
    return scores


def _ranked(scores: Sequence[float]) -> list[int]:
    """Positions by ascending score; ties go to the earlier position, i.e. the lower client_id."""
    return sorted(range(len(scores)), key=lambda position: (scores[position], position))


def _pick_one(global_state: State, chosen: ClientUpdate) -> State:
    # The chosen update itself (cast to the global dtypes); no weighted mean, whose x*n/n could round.
    return combine(global_state, [chosen], lambda values, _weights: values[0])


class _RobustRule(Strategy):
    """A stateless rule that needs enough updates for its ``num_malicious_nodes``."""

    def __init__(self, *, num_malicious_nodes: int = 0) -> None:
        self.num_malicious_nodes: int = count_option("num_malicious_nodes", num_malicious_nodes, 0)

    @classmethod
    def min_clients(cls, options: Mapping[str, Any] | None = None) -> int:
        """The fewest updates a round with these options can aggregate; raises ConfigError on bad options.

        For the config to reject a run whose rounds would be too small, before the run starts.
        """
        options = dict(options or {})
        try:
            inspect.signature(cls).bind(**options)
        except TypeError as exc:
            raise ConfigError(f"strategy {cls.name!r}: options {options!r} do not fit {cls.__name__}: {exc}") from None
        return cls(**options).required_clients()

    def required_clients(self) -> int:
        raise NotImplementedError

    def _require(self, count: int, rule: str) -> None:
        need = self.required_clients()
        if count < need:
            raise ValueError(
                f"{self.name}: needs at least {need} client updates ({rule}) "
                f"with num_malicious_nodes={self.num_malicious_nodes}, got {count}"
            )


class MultiKrum(_RobustRule):
    """The ``num_nodes_to_select`` updates with the lowest Krum scores, averaged weighted by ``num_examples``.

    Selecting one returns that update unchanged (Krum). Integer and bool keys: max over the selected.
    """

    name = "multikrum"

    def __init__(self, *, num_malicious_nodes: int = 0, num_nodes_to_select: int = 1) -> None:
        super().__init__(num_malicious_nodes=num_malicious_nodes)
        self.num_nodes_to_select: int = count_option("num_nodes_to_select", num_nodes_to_select, 1)

    def required_clients(self) -> int:
        # Krum's n > 2f + 2 (Blanchard et al.), and enough updates to select from.
        return max(2 * self.num_malicious_nodes + 3, self.num_nodes_to_select)

    def aggregate(self, global_state: State, updates: Sequence[ClientUpdate]) -> State:
        ordered = checked(global_state, updates)
        self._require(len(ordered), "2 * num_malicious_nodes + 3, and at least num_nodes_to_select")
        scores = krum_scores(squared_distances(global_state, ordered), range(len(ordered)), self.num_malicious_nodes)
        best = sorted(_ranked(scores)[: self.num_nodes_to_select])
        if len(best) == 1:
            return _pick_one(global_state, ordered[best[0]])
        return streaming_weighted_mean(global_state, [ordered[i] for i in best])

    def __repr__(self) -> str:
        options = f"num_malicious_nodes={self.num_malicious_nodes!r}, num_nodes_to_select={self.num_nodes_to_select!r}"
        return f"MultiKrum({options})"


class Krum(MultiKrum):
    """The single update with the lowest Krum score (``num_examples`` plays no part), as Flower's ``Krum``."""

    name = "krum"

    def __init__(self, *, num_malicious_nodes: int = 0) -> None:
        super().__init__(num_malicious_nodes=num_malicious_nodes, num_nodes_to_select=1)

    def __repr__(self) -> str:
        return f"Krum(num_malicious_nodes={self.num_malicious_nodes!r})"


class Bulyan(_RobustRule):
    """Bulyan over Krum, the paper's iterative form, as Flower's ``aggregate_bulyan``.

    theta = n - 2f times: score the remaining updates with Krum (on the remaining count), move the best to
    the selection. Then per coordinate, the mean of the beta = theta - 2f selected values closest to the
    selection's median. ``num_examples`` plays no part. Integer and bool keys: max over the selection.
    """

    name = "bulyan"

    def required_clients(self) -> int:
        return 4 * self.num_malicious_nodes + 3

    def aggregate(self, global_state: State, updates: Sequence[ClientUpdate]) -> State:
        ordered = checked(global_state, updates)
        self._require(len(ordered), "4 * num_malicious_nodes + 3")
        chosen = self.select(squared_distances(global_state, ordered))
        selection = [ordered[i] for i in chosen]
        beta = len(selection) - 2 * self.num_malicious_nodes
        return combine(global_state, selection, lambda values, _weights: _mean_nearest_median(values, beta))

    def select(self, distances: torch.Tensor) -> list[int]:
        """Positions (in client_id order) picked by repeated Krum, each pick removed before the next, sorted."""
        remaining = list(range(distances.shape[0]))
        picked: list[int] = []
        for _ in range(len(remaining) - 2 * self.num_malicious_nodes):
            scores = krum_scores(distances, remaining, self.num_malicious_nodes)
            picked.append(remaining.pop(_ranked(scores)[0]))
        return sorted(picked)

    def __repr__(self) -> str:
        return f"Bulyan(num_malicious_nodes={self.num_malicious_nodes!r})"


def _mean_nearest_median(values: torch.Tensor, beta: int) -> torch.Tensor:
    """Per coordinate, the mean of the ``beta`` values nearest the median (even counts: mean of the middle two).

    A stable sort breaks ties in distance by client_id, so the result is reproducible; Flower's
    argpartition leaves that choice to the partition algorithm.
    """
    ordered = values.sort(dim=0).values
    middle = values.shape[0] // 2
    median = ordered[middle] if values.shape[0] % 2 else (ordered[middle - 1] + ordered[middle]) / 2
    nearest = (values - median).abs().sort(dim=0, stable=True).indices[:beta]
    return values.gather(0, nearest).mean(dim=0)


# Name -> class, for registering beside fedsup.aggregation's built-ins.
