"""System heterogeneity, drawn per round from the run's seed like client sampling: stragglers and dropouts.

Of each round's sampled clients, every one independently fails to report with probability ``dropout``
(it is not asked to train), and ``straggler_count(fraction, clients_per_round)`` of the rest are stragglers.
A straggler in ``partial`` mode trains with ``self.work_fraction`` in (0, 1) and does that share of its local
work (FedProx's stragglers); in ``drop`` mode its update never arrives (FedAvg drops them). Everyone else
has ``work_fraction`` 1. The draw depends only on (seed, round, the sampled clients), so a resumed round
sees the same stragglers as the uninterrupted one, and a change of stragglers never changes which clients
are sampled.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass, field

# The smallest share of work a straggler is given: it still takes at least one step.
MIN_WORK_FRACTION = 0.01


@dataclass(frozen=True)
class RoundPlan:
    """Who of a round's sampled clients trains, and how much of their local work each does."""

    train: list[int]                                        # asked to train, in client order
    work: dict[int, float] = field(default_factory=dict)    # partial stragglers: their work_fraction
    dropped: list[int] = field(default_factory=list)        # stragglers whose updates are dropped
    dropped_out: list[int] = field(default_factory=list)    # failed to report (dropout)

    def work_fraction(self, client: int) -> float:
        return self.work.get(client, 1.0)


def straggler_count(fraction: float, clients_per_round: int) -> int:
    """How many of a round's clients are stragglers: ``fraction`` of them, rounded to the nearest."""
    return min(clients_per_round, math.floor(fraction * clients_per_round + 0.5))


def plan_round(seed: int, round_: int, chosen: list[int], *, dropout: float = 0.0,
               straggler_fraction: float = 0.0, mode: str = "partial") -> RoundPlan:
    """The round's stragglers and dropouts among ``chosen`` (sorted client ids), from (seed, round)."""
    rng = random.Random(_seed(seed, round_))
    dropped_out = [c for c in chosen if rng.random() < dropout] if dropout else []
    gone = set(dropped_out)  # once, not per client: the work is per sampled client, never per client of the run
    present = [c for c in chosen if c not in gone]
    count = min(len(present), straggler_count(straggler_fraction, len(chosen)))
    slow = sorted(rng.sample(present, count)) if count else []
    if mode == "drop":
        late = set(slow)
        return RoundPlan([c for c in present if c not in late], dropped=slow, dropped_out=dropped_out)
    work = {c: max(MIN_WORK_FRACTION, rng.random()) for c in slow}
    return RoundPlan(present, work=work, dropped_out=dropped_out)


def _seed(seed: int, round_: int) -> int:
    digest = hashlib.sha256(f"{seed}:heterogeneity:{round_}".encode()).digest()
    return int.from_bytes(digest[:4], "little")
