"""Aggregation of client model updates into the next global model, in the main process.

A ``Strategy`` turns the global state and the clients' ``ClientUpdate``s into a new global state.
Three come built in:

* ``FedAvg`` (``"fedavg"``): the mean weighted by ``num_examples``;
* ``FedMedian`` (``"fedmedian"``): the coordinate-wise median (unweighted; an even count averages the
  two middle values, like ``numpy.median``);
* ``TrimmedMean`` (``"trimmed_mean"``): per coordinate, drop the ``floor(beta * n)`` smallest and largest
  values and average the rest (unweighted).

Floating-point tensors are combined in float64 and cast back to the dtype of the global state's tensor.
Updates are taken in ``client_id`` order, so the result does not depend on the order they arrive in and
is bit-identical from one call to the next.

Integer and bool tensors (BatchNorm's ``num_batches_tracked``, masks, indices) are not averaged, since
a mean would invent values no client holds: every built-in strategy takes their element-wise maximum
(for bool, a logical OR). For ``num_batches_tracked`` that is the count of the client that trained longest.

Inputs are never modified, so updates may hold read-only tensors mapped from disk
(``torch.load(mmap=True)``). The result holds new tensors on the global state's devices.
"""

from __future__ import annotations

import abc
import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from fedsup.engine.errors import ConfigError

State = dict[str, torch.Tensor]

# What state_dict returns and load_state_dict takes: plain values and float64 tensors, torch.save-able.
StrategyState = dict[str, Any]

# Combines one key's float64 tensors, stacked in client_id order, with the matching num_examples.
Reducer = Callable[[torch.Tensor, list[int]], torch.Tensor]


@dataclass(frozen=True)
class ClientUpdate:
    """What one client sends back after a round: its trained state and how many examples it saw."""

    client_id: int
    state: State
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)
    # What the client keeps across rounds (``self.client_state``): as it left it after this round, and as it
    # was before; for strategies that need it, such as SCAFFOLD's control variates.
    client_state: State = field(default_factory=dict)
    previous_client_state: State = field(default_factory=dict)


class Strategy(abc.ABC):
    """Turns the global state and the clients' updates into the next global state."""

    name: ClassVar[str]

    @abc.abstractmethod
    def aggregate(self, global_state: State, updates: Sequence[ClientUpdate]) -> State:
        """Return a new state with the keys, shapes and dtypes of ``global_state``."""

    def setup(self, clients: int) -> None:
        """Told once, before the first round, how many clients the federation has (SCAFFOLD scales by it)."""
        del clients  # most strategies do not depend on it

    def broadcast(self, global_state: State | None) -> dict[str, State]:
        """Named states sent to every client with the round's model, each set as an attribute of the client
        (SCAFFOLD's ``server_control``); none by default."""
        return {}

    def state_dict(self) -> StrategyState:
        """Everything ``aggregate`` carries from one round to the next (server momentum, moments); ``{}`` for a
        rule that keeps none. Saved with each round's checkpoint, so a resumed run continues bit for bit."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned; a rule that keeps no state accepts only ``{}``."""
        if state:
            raise ValueError(f"{self.name}: keeps no state, got a state with keys {sorted(state)}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class FedAvg(Strategy):
    """The mean of the clients' tensors weighted by ``num_examples``."""

    name = "fedavg"

    def aggregate(self, global_state: State, updates: Sequence[ClientUpdate]) -> State:
        return streaming_weighted_mean(global_state, updates)


class FedMedian(Strategy):
    """The coordinate-wise median of the clients' tensors (unweighted)."""

    name = "fedmedian"

    def aggregate(self, global_state: State, updates: Sequence[ClientUpdate]) -> State:
        return combine(global_state, updates, _median)


class TrimmedMean(Strategy):
    """Per coordinate, the mean after dropping the ``floor(beta * n)`` smallest and largest values."""

    name = "trimmed_mean"

    def __init__(self, beta: float = 0.1) -> None:
        if isinstance(beta, bool) or not isinstance(beta, numbers.Real) or not 0 <= beta < 0.5:
            raise ConfigError(f"beta: must be a number in [0, 0.5), got {beta!r}")
        self.beta: float = float(beta)

    def aggregate(self, global_state: State, updates: Sequence[ClientUpdate]) -> State:
        n = len(updates)
        trim = math.floor(self.beta * n)
        if n and n - 2 * trim < 1:
            raise ValueError(f"trimmed_mean: beta={self.beta} with n={n} clients would drop every value")
        return combine(global_state, updates, lambda values, _: _trimmed_mean(values, trim))

    def __repr__(self) -> str:
        return f"TrimmedMean(beta={self.beta!r})"


def combine(global_state: State, updates: Sequence[ClientUpdate], reducer: Reducer) -> State:
    """Check ``updates`` against ``global_state``, then combine every key: floats with ``reducer``, the rest by max.

    ``reducer`` receives one key's values as a float64 tensor stacked along dim 0 in ``client_id`` order,
    and the clients' ``num_examples`` in the same order; it returns a float64 tensor of one client's shape.
    """
    ordered = checked(global_state, updates)
    weights = [update.num_examples for update in ordered]
    result: State = {}
    for key, reference in global_state.items():
        values = [update.state[key].to(reference.device) for update in ordered]
        if reference.is_floating_point():
            combined = reducer(torch.stack([value.to(torch.float64) for value in values]), weights)
        else:
            combined = torch.stack([value.to(reference.dtype) for value in values]).amax(dim=0)
        result[key] = combined.to(reference.dtype).contiguous()
    return result


def _median(values: torch.Tensor, weights: list[int]) -> torch.Tensor:
    ordered = values.sort(dim=0).values
    count = values.shape[0]
    middle = count // 2
    if count % 2:
        return ordered[middle]
    return (ordered[middle - 1] + ordered[middle]) / 2


def _trimmed_mean(values: torch.Tensor, trim: int) -> torch.Tensor:
    kept = values.sort(dim=0).values[trim : values.shape[0] - trim]
    return kept.mean(dim=0)


def checked(global_state: State, updates: Sequence[ClientUpdate]) -> list[ClientUpdate]:
    """Return ``updates`` sorted by client_id; raise ValueError on anything that cannot be combined."""
    if not updates:
        raise ValueError("updates: need at least one client update, got none")
    for key, tensor in global_state.items():
        if not isinstance(tensor, torch.Tensor) or tensor.is_complex():
            raise ValueError(f"global state: {key!r} must be a real-valued tensor, got {describe(tensor)}")
    seen: set[int] = set()
    for update in updates:
        if update.client_id in seen:
            raise ValueError(f"updates: client_id {update.client_id!r} appears more than once")
        seen.add(update.client_id)
        _check_update(global_state, update)
    return sorted(updates, key=lambda update: update.client_id)


def _check_update(global_state: State, update: ClientUpdate) -> None:
    client = update.client_id
    n = update.num_examples
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n <= 0:
        raise ValueError(f"client {client}: num_examples must be a positive integer, got {n!r}")
    for key in update.state:
        if key not in global_state:
            raise ValueError(f"client {client}: state has key {key!r}, which the global state does not")
    for key, reference in global_state.items():
        if key not in update.state:
            raise ValueError(f"client {client}: state is missing key {key!r}")
        tensor = update.state[key]
        if not isinstance(tensor, torch.Tensor) or tensor.is_complex():
            raise ValueError(f"client {client}: {key!r} must be a real-valued tensor, got {describe(tensor)}")
        if tensor.shape != reference.shape:
            raise ValueError(
                f"client {client}: {key!r} has shape {tuple(tensor.shape)}, "
                f"the global state has {tuple(reference.shape)}"
            )


def describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor"
    return f"{type(value).__name__} {value!r}"


# -- options and the streaming pass, shared with fedsup.federated.optimizers and .robust


def real_option(option: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ConfigError(f"{option}: must be a finite number, got {value!r}")
    return float(value)


def positive_option(option: str, value: object) -> float:
    number = real_option(option, value)
    if number <= 0:
        raise ConfigError(f"{option}: must be a number > 0, got {value!r}")
    return number


def unit_interval_option(option: str, value: object) -> float:
    # [0, 1): at 1 a moment never forgets, and FedAdam's bias correction would divide by zero.
    number = real_option(option, value)
    if not 0 <= number < 1:
        raise ConfigError(f"{option}: must be a number in [0, 1), got {value!r}")
    return number


def count_option(option: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ConfigError(f"{option}: must be an integer >= {minimum}, got {value!r}")
    return int(value)


def mean64(key: str, reference: torch.Tensor, ordered: Sequence[ClientUpdate]) -> torch.Tensor:
    """One key's ``num_examples``-weighted mean in float64, reading one client at a time.

    The same operations in the same order as ``_weighted_mean`` did before it: multiply, then add,
    each rounded once, in client_id order, then one division; so the result is bit-identical to FedAvg's.
    """
    total: torch.Tensor | None = None
    for update in ordered:
        term = update.state[key].to(reference.device).to(torch.float64) * update.num_examples
        total = term if total is None else total + term
    assert total is not None  # _checked rejects an empty round
    return total / sum(update.num_examples for update in ordered)


def max_of(key: str, reference: torch.Tensor, ordered: Sequence[ClientUpdate]) -> torch.Tensor:
    """One integer or bool key's element-wise max (OR for bool), as the built-in strategies do."""
    result: torch.Tensor | None = None
    for update in ordered:
        value = update.state[key].to(reference.device).to(reference.dtype)
        # The first value is copied: a result must never share memory with an update (or the global state).
        result = value.clone() if result is None else torch.maximum(result, value)
    assert result is not None
    return result.contiguous()


def cast_like(value: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    return value.to(reference.dtype).contiguous()


def streaming_weighted_mean(global_state: State, updates: Sequence[ClientUpdate]) -> State:
    """``FedAvg().aggregate(global_state, updates)``, bit for bit, without stacking the updates.

    Peak extra memory is one float64 accumulator (plus one converted client tensor) for the key at hand,
    instead of all n clients' tensors in float64.
    """
    ordered = checked(global_state, updates)
    result: State = {}
    for key, reference in global_state.items():
        if reference.is_floating_point():
            result[key] = cast_like(mean64(key, reference, ordered), reference)
        else:
            result[key] = max_of(key, reference, ordered)
    return result


def weighted_metrics(updates: Sequence[tuple[int, dict[str, Any]]]) -> dict[str, float]:
    """Return the ``num_examples``-weighted mean of every numeric metric, keys sorted by name.

    Bools and non-numbers are skipped. A metric some clients lack is averaged over those that have it;
    clients with zero examples count for nothing.
    """
    sums: dict[str, list[float]] = {}
    counts: dict[str, list[int]] = {}
    for n, metrics in updates:
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0:
            raise ValueError(f"num_examples: must be a non-negative integer, got {n!r}")
        if n == 0:
            continue
        for key, value in metrics.items():
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                continue
            sums.setdefault(key, []).append(int(n) * float(value))
            counts.setdefault(key, []).append(int(n))
    # fsum rounds once, so the mean does not depend on the order the clients are listed in.
    return {key: math.fsum(sums[key]) / sum(counts[key]) for key in sorted(sums)}
