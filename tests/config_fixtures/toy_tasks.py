"""Task classes for tests/test_config.py, imported through 'path/to/toy_tasks.py:Class' specs."""

from __future__ import annotations

from typing import Any

import fedsup
from fedsup.federated.strategies import Strategy


class Client(fedsup.Task):
    """A client that takes one argument besides client_id."""

    def __init__(self, client_id: int, size: int = 1) -> None:
        super().__init__(f"client-{client_id}")
        self.size = size

    def load(self) -> None:
        pass

    def train(self, device: str) -> dict[str, Any]:
        return {"num_examples": self.size}


class Unfinished(fedsup.Task):
    """Abstract: defines neither load() nor train()."""


class NotATask:
    """A class, but not a fedsup.Task."""


class Halfway(Strategy):
    """A custom strategy with one option."""

    def __init__(self, weight: float = 0.5) -> None:
        self.weight = weight

    def aggregate(self, global_state: Any, updates: Any) -> Any:
        return global_state
