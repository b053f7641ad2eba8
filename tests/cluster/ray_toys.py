"""Clients for the Ray backend's tests, importable by the cluster's workers (the tests put this folder on
their PYTHONPATH)."""

from __future__ import annotations

from typing import Any

from fed_toys import hold_once

from fedsup.examples.synthetic import SyntheticClient


class HoldingSynthetic(SyntheticClient):
    """The synthetic client, but client ``hold_client`` of round ``hold_round`` says its pid on the FIFO
    ``announce`` and then waits for a byte on the FIFO ``go``: the run stays at that moment (a job under way
    on one node) for as long as the test needs. The marker file makes it happen once across restarts, and
    the training that follows is the plain client's, so the model is the same as an undisturbed run's."""

    def __init__(self, client_id: int, announce: str = "", go: str = "", hold_round: int = 2,
                 hold_client: int = -1, **args: Any) -> None:
        super().__init__(client_id, **args)
        self.announce, self.go, self.hold_round, self.hold_client = announce, go, hold_round, hold_client

    def train(self, device: str) -> dict[str, Any]:
        if self.go and self.round == self.hold_round and self.client_id == self.hold_client:
            hold_once(self.announce, self.go)
        return super().train(device)
