"""Clients for the federated tests: known tensors, a contract breaker, and a client that says when it trains."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

import fedsup
from fedsup.examples.synthetic import SyntheticClient


class KnownClient(fedsup.Task):
    """Returns ``w`` filled with (round x 100 + client id) and ``num_examples`` = client id + 1."""

    def __init__(self, client_id: int) -> None:
        super().__init__()
        self.client_id = client_id

    def load(self) -> None:
        pass

    def initial_state(self) -> dict[str, Any]:
        return {"w": torch.zeros(4, dtype=torch.float32), "steps": torch.zeros((), dtype=torch.int64)}

    def train(self, device: str) -> dict[str, Any]:
        assert self.global_state is not None and set(self.global_state) == {"w", "steps"}
        value = float(self.round * 100 + self.client_id)
        return {"state": {"w": torch.full((4,), value), "steps": torch.tensor(self.client_id)},
                "num_examples": self.client_id + 1, "seen": float(self.global_state["w"][0])}


class NoStateClient(KnownClient):
    """Breaks the contract: train returns metrics but no state."""

    def train(self, device: str) -> dict[str, Any]:
        return {"loss": 1.0}


class SignallingClient(SyntheticClient):
    """Writes one line to a FIFO the first time client ``signal_client`` trains in round ``signal_round``,
    so a test can act at that exact moment; the marker file makes it happen once across restarts."""

    def __init__(self, client_id: int, fifo: str = "", signal_round: int = 2, signal_client: int = -1,
                 **args: Any) -> None:
        super().__init__(client_id, **args)
        self.fifo, self.signal_round, self.signal_client = fifo, signal_round, signal_client

    def train(self, device: str) -> dict[str, Any]:
        marker = Path(self.fifo + ".done")
        if self.round == self.signal_round and self.client_id == self.signal_client and not marker.exists():
            marker.touch()
            with open(self.fifo, "w") as f:  # blocks until the test reads: the test now holds the moment
                f.write(f"{os.getpid()}\n")
        return super().train(device)
