"""The built-in strategies by name, and ``make_strategy``: a name or ``"module:Class"`` and its options.

The config reads the names, each strategy's option names (``options_of``) and how many clients a round
needs (``min_clients``) from here, so that a wrong option or a round too small is refused before a run.
"""

from __future__ import annotations

import importlib
import inspect
from functools import reduce
from typing import Any

from fedsup.engine.errors import ConfigError
from fedsup.federated.optimizers import FedAdagrad, FedAdam, FedAvgM, FedYogi
from fedsup.federated.robust import Bulyan, Krum, MultiKrum
from fedsup.federated.scaffold import Scaffold
from fedsup.federated.strategies import FedAvg, FedMedian, Strategy, TrimmedMean

BUILTIN: dict[str, type[Strategy]] = {
    cls.name: cls
    for cls in (FedAvg, FedMedian, TrimmedMean, FedAvgM, FedAdam, FedYogi, FedAdagrad, Krum, MultiKrum, Bulyan,
                Scaffold)
}


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
    if spec in BUILTIN:
        return BUILTIN[spec]
    if ":" not in spec:
        known = ", ".join(sorted(BUILTIN))
        raise ConfigError(f"strategy: unknown name {spec!r}; known names are {known}, or give 'module:Class'")
    module_name, _, attribute = spec.partition(":")
    try:
        found = reduce(getattr, attribute.split("."), importlib.import_module(module_name))
    except (ImportError, AttributeError, ValueError) as exc:
        raise ConfigError(f"strategy: cannot load {spec!r}: {exc}") from exc
    if not (isinstance(found, type) and issubclass(found, Strategy)):
        raise ConfigError(f"strategy: {spec!r} is {found!r}, not a subclass of fedsup.Strategy")
    return found


def options_of(name: str) -> tuple[str, ...]:
    """The option names the built-in strategy ``name`` takes, in its signature's order."""
    return tuple(inspect.signature(BUILTIN[name]).parameters)


def min_clients(name: str, options: dict[str, Any]) -> int:
    """The fewest updates one round of the built-in strategy ``name`` can aggregate with ``options``."""
    needs = getattr(BUILTIN[name], "min_clients", None)
    return int(needs(options)) if needs is not None else 1
