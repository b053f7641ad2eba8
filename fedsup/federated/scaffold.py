"""SCAFFOLD's server side (Karimireddy et al., ICML 2020): the model step and the server control variate.

With y_i each sampled client's trained model, x the global model, N the federation's clients and S the
round's clients that finished, and Δc_i each client's change of control variate (read from its committed
client state, before and after the round):

    x <- x + server_learning_rate * mean_i (y_i - x)
    c <- c + |S| / N * mean_i Δc_i = c + (1 / N) * sum_i Δc_i

as in the paper's Algorithm 1, where the means are plain (not weighted by ``num_examples``). ``c`` starts at
zero, is kept in float64 in the strategy's state (saved with every checkpoint), and reaches every client as
``self.server_control``; the client side is ``fedsup.algorithms.Scaffold``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from fedsup.federated.algorithms import CONTROL_PREFIX
from fedsup.federated.strategies import (
    BLOCK_ELEMENTS,
    ClientUpdate,
    State,
    Strategy,
    StrategyState,
    cast_like,
    checked,
    describe,
    flat_piece,
    max_of,
    positive_option,
    spans,
)


class Scaffold(Strategy):
    """Stochastic controlled averaging: client drift corrected by control variates."""

    name = "scaffold"

    def __init__(self, *, server_learning_rate: float = 1.0) -> None:
        self.server_learning_rate = positive_option("server_learning_rate", server_learning_rate)
        self.clients = 0
        self.control: dict[str, torch.Tensor] = {}

    def setup(self, clients: int) -> None:
        self.clients = clients

    def broadcast(self, global_state: State | None) -> dict[str, State]:
        if global_state is None:
            raise ValueError("scaffold: needs the first global model before round 1; define initial_state()")
        return {"server_control": {key: self._control(key, reference).to(reference.dtype)
                                   for key, reference in global_state.items() if reference.is_floating_point()}}

    def aggregate(self, global_state: State, updates: Sequence[ClientUpdate]) -> State:
        ordered = checked(global_state, updates)
        if not self.clients:
            raise ValueError("scaffold: setup(clients) was not called; the federation's size scales c")
        result: State = {}
        control = dict(self.control)
        for key, reference in global_state.items():
            if not reference.is_floating_point():
                result[key] = max_of(key, reference, ordered)
                continue
            x = reference.to(torch.float64)
            drift = _mean_drift(key, x, ordered)
            result[key] = cast_like(x + self.server_learning_rate * drift, reference)
            control[key] = self._control(key, reference) + self._control_change(key, reference, ordered)
        self.control = control  # only once every key has succeeded: a failed round changes nothing
        return result

    def _control(self, key: str, reference: torch.Tensor) -> torch.Tensor:
        found = self.control.get(key)
        return torch.zeros_like(reference, dtype=torch.float64) if found is None else found.to(reference.device)

    def _control_change(self, key: str, reference: torch.Tensor, ordered: Sequence[ClientUpdate]) -> torch.Tensor:
        total = torch.zeros_like(reference, dtype=torch.float64)
        for update in ordered:
            after = update.client_state.get(CONTROL_PREFIX + key)
            if after is None:
                continue  # a parameter the client keeps no control for (a buffer), or a client without one
            before = update.previous_client_state.get(CONTROL_PREFIX + key)
            change = after.to(reference.device, torch.float64)
            total = total + (change if before is None else change - before.to(reference.device, torch.float64))
        return total / self.clients

    def state_dict(self) -> StrategyState:
        return {"strategy": self.name, "control": dict(self.control)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state) != {"strategy", "control"} or state["strategy"] != self.name:
            raise ValueError(f"scaffold: not a scaffold state (keys {sorted(state)})")
        control = state["control"]
        if not isinstance(control, dict) or not all(isinstance(v, torch.Tensor) and v.dtype == torch.float64
                                                    for v in control.values()):
            raise ValueError(f"scaffold: control must be a dict of float64 tensors, got {describe(control)}")
        self.control = {key: value.detach().clone() for key, value in control.items()}

    def __repr__(self) -> str:
        return f"Scaffold(server_learning_rate={self.server_learning_rate!r})"


def _mean_drift(key: str, x: torch.Tensor, ordered: Sequence[ClientUpdate]) -> torch.Tensor:
    """``mean_i(y_i - x)`` for one key in float64: one pass, a block of coordinates at a time.

    Per coordinate the same operations in the same order as summing ``(y_i - x)`` from zero, client by client.
    """
    numel = x.numel()
    flat_x = x.reshape(-1)
    total = torch.zeros(numel, dtype=torch.float64, device=x.device)
    scratch = torch.empty(min(numel, BLOCK_ELEMENTS), dtype=torch.float64, device=x.device)
    for start, stop in spans(numel, BLOCK_ELEMENTS):
        block, term = total[start:stop], scratch[: stop - start]
        for update in ordered:
            term.copy_(flat_piece(update.state[key], start, stop)).sub_(flat_x[start:stop])
            block.add_(term)
    return total.view(x.shape) / len(ordered)
