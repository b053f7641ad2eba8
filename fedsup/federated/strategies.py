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
import importlib
import inspect
import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import reduce
from typing import Any, ClassVar

import torch

from fedsup.engine.errors import ConfigError

State = dict[str, torch.Tensor]

# Combines one key's float64 tensors, stacked in client_id order, with the matching num_examples.
Reducer = Callable[[torch.Tensor, list[int]], torch.Tensor]


@dataclass(frozen=True)
class ClientUpdate:
    """What one client sends back after a round: its trained state and how many examples it saw."""

    client_id: int
    state: State
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)


class Strategy(abc.ABC):
    """Turns the global state and the clients' updates into the next global state."""

    name: ClassVar[str]

    @abc.abstractmethod
    def aggregate(self, global_state: State, updates: Sequence[ClientUpdate]) -> State:
        """Return a new state with the keys, shapes and dtypes of ``global_state``."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class FedAvg(Strategy):
    """The mean of the clients' tensors weighted by ``num_examples``."""

    name = "fedavg"

    def aggregate(self, global_state: State, updates: Sequence[ClientUpdate]) -> State:
        return combine(global_state, updates, _weighted_mean)


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
    ordered = _checked(global_state, updates)
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


def _weighted_mean(values: torch.Tensor, weights: list[int]) -> torch.Tensor:
    # A plain loop of multiply then add, each rounded once, in client_id order: no fused multiply-add
    # and no reduction whose summation order could change between calls or builds.
    total = values[0] * weights[0]
    for value, weight in zip(values[1:], weights[1:], strict=True):
        total = total + value * weight
    return total / sum(weights)


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


def _checked(global_state: State, updates: Sequence[ClientUpdate]) -> list[ClientUpdate]:
    """Return ``updates`` sorted by client_id; raise ValueError on anything that cannot be combined."""
    if not updates:
        raise ValueError("updates: need at least one client update, got none")
    for key, tensor in global_state.items():
        if not isinstance(tensor, torch.Tensor) or tensor.is_complex():
            raise ValueError(f"global state: {key!r} must be a real-valued tensor, got {_describe(tensor)}")
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
            raise ValueError(f"client {client}: {key!r} must be a real-valued tensor, got {_describe(tensor)}")
        if tensor.shape != reference.shape:
            raise ValueError(
                f"client {client}: {key!r} has shape {tuple(tensor.shape)}, "
                f"the global state has {tuple(reference.shape)}"
            )


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor"
    return f"{type(value).__name__} {value!r}"


_BUILTIN: dict[str, type[Strategy]] = {cls.name: cls for cls in (FedAvg, FedMedian, TrimmedMean)}


def make_strategy(spec: str, options: dict[str, Any] | None = None) -> Strategy:
    """Build the strategy ``spec`` names, a built-in name or ``"module:Class"``, with ``options`` as keywords."""
    options = dict(options or {})
    cls = _strategy_class(spec)
    try:
        inspect.signature(cls).bind(**options)
    except TypeError as exc:
        raise ConfigError(f"strategy {spec!r}: options {options!r} do not fit {cls.__name__}: {exc}") from None
    return cls(**options)


def _strategy_class(spec: str) -> type[Strategy]:
    if not isinstance(spec, str):
        raise ConfigError(f"strategy: expected a name or 'module:Class', got {spec!r}")
    if spec in _BUILTIN:
        return _BUILTIN[spec]
    if ":" not in spec:
        known = ", ".join(sorted(_BUILTIN))
        raise ConfigError(f"strategy: unknown name {spec!r}; known names are {known}, or give 'module:Class'")
    module_name, _, attribute = spec.partition(":")
    try:
        found = reduce(getattr, attribute.split("."), importlib.import_module(module_name))
    except (ImportError, AttributeError, ValueError) as exc:
        raise ConfigError(f"strategy: cannot load {spec!r}: {exc}") from exc
    if not (isinstance(found, type) and issubclass(found, Strategy)):
        raise ConfigError(f"strategy: {spec!r} is {found!r}, not a subclass of fedsup.Strategy")
    return found


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
