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

Memory stays bounded: the distances are accumulated a chunk of coordinates at a time (all clients'
values for the chunk in float64, never a whole key of every client), and Bulyan's coordinate-wise step is
chunked like the median's. Time is O(n^2) in the number of updates: every pair's distance is summed.
"""

from __future__ import annotations

import inspect
import math
from array import array
from bisect import bisect_left
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from fedsup.engine.errors import ConfigError
from fedsup.federated import strategies
from fedsup.federated.strategies import (
    ClientUpdate,
    State,
    Strategy,
    checked,
    combine,
    count_option,
    stacked_chunks,
    streaming_weighted_mean,
    sum_rows,
)

# Coordinates per chunk of the distance sums, at most: the pairwise differences of a chunk then stay in the
# CPU's cache (wider chunks made the O(n^2) loop memory-bound and several times slower).
DISTANCE_COLUMNS = 512


def squared_distances(global_state: State, ordered: Sequence[ClientUpdate]) -> torch.Tensor:
    """The n x n float64 matrix of squared Euclidean distances between the updates' floating keys.

    Equal to the distance between the models flattened and concatenated in key order, accumulated a chunk
    of coordinates at a time, so that only a chunk of every client's values is held in float64 at once:
    each chunk's sum of squared differences is added to the pair's total. Exactly symmetric, zero diagonal.
    Integer and bool keys are left out (Flower's concatenation would include them).
    """
    count = len(ordered)
    distances = torch.zeros(count, count, dtype=torch.float64)
    for key, reference in global_state.items():
        if not reference.is_floating_point():
            continue
        columns = max(1, min(DISTANCE_COLUMNS, strategies.CHUNK_BYTES // (8 * count)))
        for _start, _stop, values in stacked_chunks(key, reference, ordered, columns):
            _add_distances(distances, values)
    return distances.add_(distances.T.clone())  # the lower triangle is still zero: a mirror, exactly


def _add_distances(distances: torch.Tensor, values: torch.Tensor) -> None:
    """Add each pair's sum of squared differences over this chunk's columns to the upper triangle."""
    count = values.shape[0]
    scratch = torch.empty_like(values)
    for i in range(count - 1):
        difference = scratch[: count - 1 - i]
        torch.sub(values[i + 1 :], values[i], out=difference)
        difference.mul_(difference)
        distances[i, i + 1 :] += difference.sum(dim=1).cpu()


def krum_scores(distances: torch.Tensor, active: Sequence[int], num_malicious_nodes: int) -> list[float]:
    """Krum's score of each index in ``active``: the sum of its ``max(1, n - f - 2)`` smallest distances to the others.

    ``n`` is ``len(active)``. The ``max(1, ...)`` is Flower's: it keeps the rule defined when n < f + 3.
    """
    return _NearestDistances(distances, list(active)).scores(num_malicious_nodes)


class _NearestDistances:
    """Each active index's distances to the other active ones, kept sorted as indices are removed.

    Repeated Krum (Bulyan) scores n - 2f shrinking sets: removing one index from every sorted row costs a
    bisection, where re-sorting every row each time made the selection O(n^3 log n) in Python. Rows are
    arrays of doubles (8 bytes a distance, not a Python float's 32).
    """

    def __init__(self, distances: torch.Tensor, active: list[int]) -> None:
        self.distances = distances
        self.active = active
        index = torch.tensor(active, dtype=torch.long)
        self.sorted: dict[int, array[float]] = {}
        for position, i in enumerate(active):
            others = torch.cat([index[:position], index[position + 1 :]])
            self.sorted[i] = array("d", sorted(distances[i, others].tolist()))

    def scores(self, num_malicious_nodes: int) -> list[float]:
        neighbours = max(1, len(self.active) - num_malicious_nodes - 2)
        return [math.fsum(self.sorted[i][:neighbours]) for i in self.active]

    def remove(self, position: int) -> int:
        """Drop ``self.active[position]`` from the set and from every other row; return it."""
        gone = self.active.pop(position)
        del self.sorted[gone]
        column = self.distances[:, gone].tolist()
        for i in self.active:
            row, value = self.sorted[i], column[i]
            found = bisect_left(row, value)
            if found == len(row) or row[found] != value:
                # NaN (from a non-finite update) breaks the order bisection relies on: search for it.
                found = next(k for k, item in enumerate(row) if item == value or (item != item and value != value))
            del row[found]
        return gone


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
        count = distances.shape[0]
        nearest = _NearestDistances(distances, list(range(count)))
        picked: list[int] = []
        for _ in range(count - 2 * self.num_malicious_nodes):
            scores = nearest.scores(self.num_malicious_nodes)
            picked.append(nearest.remove(_ranked(scores)[0]))
        return sorted(picked)

    def __repr__(self) -> str:
        return f"Bulyan(num_malicious_nodes={self.num_malicious_nodes!r})"


def _mean_nearest_median(values: torch.Tensor, beta: int) -> torch.Tensor:
    """Per coordinate, the mean of the ``beta`` values nearest the median (even counts: mean of the middle two).

    A stable sort breaks ties in distance by client_id, so the result is reproducible; Flower's
    argpartition leaves that choice to the partition algorithm. The kept values are summed nearest first.
    """
    distance = (values - strategies.median_of(values)).abs_()
    # Sorted along a contiguous dimension: several times faster than along dim 0, the same order.
    transposed = distance.T.contiguous()
    del distance
    nearest = transposed.sort(dim=1, stable=True).indices[:, :beta]
    del transposed
    kept = values.T.gather(1, nearest).T.contiguous()
    return sum_rows(kept) / beta


# Name -> class, for registering beside fedsup.aggregation's built-ins.
