"""Server optimisers: FedAvg's aggregate taken as a pseudo-gradient and stepped with momentum or adaptive moments.

* ``FedAvgM`` (``"fedavgm"``): server learning rate and momentum (Hsu et al., 2019);
* ``FedAdam`` (``"fedadam"``), ``FedYogi`` (``"fedyogi"``), ``FedAdagrad`` (``"fedadagrad"``): the adaptive
  server optimisers of Reddi et al., "Adaptive Federated Optimization" (ICLR 2021).

Parameter names, defaults and update rules are Flower 1.41's (``flwr.serverapp.strategy``), FedAdam's
bias-corrected step included, so a Flower user's hyperparameters carry over; docs/algorithms.md lists them.
Each keeps its buffers (momentum; ``m_t`` and ``v_t``) and a step count in float64, returns them from
``state_dict`` and takes them back with ``load_state_dict``: the runner saves them with every checkpoint.
The FedAvg aggregate is built in one streaming pass, one float64 accumulator per key, never all the
updates stacked. A round that fails part-way leaves the strategy's state as it was.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from fedsup.federated.strategies import (
    ClientUpdate,
    State,
    Strategy,
    StrategyState,
    cast_like,
    checked,
    describe,
    max_of,
    mean64,
    positive_option,
    streaming_weighted_mean,
    unit_interval_option,
)


class _ServerOptimizer(Strategy):
    """Shared machinery: the streaming FedAvg aggregate, named float64 buffers, a step count, saving."""

    # The buffers this optimizer keeps, e.g. ("m_t", "v_t").
    _buffer_names: tuple[str, ...] = ()

    def __init__(self) -> None:
        self._step_count: int = 0
        self._buffers: dict[str, dict[str, torch.Tensor]] = {name: {} for name in self._buffer_names}

    def aggregate(self, global_state: State, updates: Sequence[ClientUpdate]) -> State:
        ordered = checked(global_state, updates)
        self._check_buffers(global_state)
        round_number = self._step_count + 1
        # New buffers go here and replace the old only once every key has succeeded, so a round that
        # fails part-way leaves the strategy as it was.
        pending: dict[str, dict[str, torch.Tensor]] = {name: {} for name in self._buffer_names}
        if self._optimizes():
            result = self._step_all(round_number, global_state, ordered, pending)
        else:
            result = streaming_weighted_mean(global_state, ordered)
        self._step_count = round_number
        self._buffers = pending
        return result

    def _step_all(
        self,
        round_number: int,
        global_state: State,
        ordered: Sequence[ClientUpdate],
        pending: dict[str, dict[str, torch.Tensor]],
    ) -> State:
        result: State = {}
        for key, reference in global_state.items():
            if not reference.is_floating_point():
                result[key] = max_of(key, reference, ordered)
                continue
            current = reference.to(torch.float64)
            aggregate = mean64(key, reference, ordered)
            result[key] = cast_like(self._update(round_number, key, current, aggregate, pending), reference)
        return result

    def _optimizes(self) -> bool:
        """False where the rule reduces to FedAvg exactly, so its result is FedAvg's bit for bit."""
        return True

    def _update(
        self,
        round_number: int,
        key: str,
        current: torch.Tensor,
        aggregate: torch.Tensor,
        pending: dict[str, dict[str, torch.Tensor]],
    ) -> torch.Tensor:
        raise NotImplementedError

    def _buffer(self, name: str, key: str, like: torch.Tensor) -> torch.Tensor | None:
        found = self._buffers[name].get(key)
        return None if found is None else found.to(like.device)

    def _check_buffers(self, global_state: State) -> None:
        """Buffers, if any, must fit the model: a loaded state from another model would silently misapply."""
        floating = {key: tensor for key, tensor in global_state.items() if tensor.is_floating_point()}
        for name, buffers in self._buffers.items():
            if buffers and set(buffers) != set(floating):
                raise ValueError(
                    f"{self.name}: state buffer {name!r} has keys {sorted(buffers)}, "
                    f"the global state's floating keys are {sorted(floating)}"
                )
            for key, tensor in buffers.items():
                if tensor.shape != floating[key].shape:
                    raise ValueError(
                        f"{self.name}: state buffer {name!r}[{key!r}] has shape {tuple(tensor.shape)}, "
                        f"the global state has {tuple(floating[key].shape)}"
                    )

    def state_dict(self) -> StrategyState:
        """The step count and every buffer (float64, shared with the strategy, which never writes in place)."""
        state: StrategyState = {"strategy": self.name, "step": self._step_count}
        for name, buffers in self._buffers.items():
            state[name] = dict(buffers)
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        expected = {"strategy", "step", *self._buffer_names}
        if set(state) != expected:
            raise ValueError(f"{self.name}: state must have keys {sorted(expected)}, got {sorted(state)}")
        if state["strategy"] != self.name:
            raise ValueError(f"{self.name}: state was saved by strategy {state['strategy']!r}")
        step = state["step"]
        if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
            raise ValueError(f"{self.name}: state step must be a non-negative integer, got {step!r}")
        buffers = {name: _loaded_buffers(self.name, name, state[name]) for name in self._buffer_names}
        self._step_count = int(step)
        self._buffers = buffers


def _loaded_buffers(strategy: str, name: str, value: object) -> dict[str, torch.Tensor]:
    if not isinstance(value, Mapping):
        raise ValueError(f"{strategy}: state {name!r} must be a dict of tensors, got {type(value).__name__}")
    loaded: dict[str, torch.Tensor] = {}
    for key, tensor in value.items():
        if not isinstance(tensor, torch.Tensor) or tensor.dtype != torch.float64:
            raise ValueError(f"{strategy}: state {name!r}[{key!r}] must be a float64 tensor, got {describe(tensor)}")
        # A copy, so the caller's checkpoint dict and the strategy never share storage.
        loaded[key] = tensor.detach().clone()
    return loaded


class FedAvgM(_ServerOptimizer):
    """FedAvg with server-side learning rate and momentum, as Flower's ``FedAvgM``.

    pseudo_gradient = global - fedavg;  momentum = pseudo_gradient on the first round with momentum, then
    server_momentum * momentum + pseudo_gradient;  new = global - server_learning_rate * momentum (or the
    pseudo-gradient, when server_momentum is 0). With the defaults (1.0, 0.0) it is FedAvg, bit for bit.
    """

    name = "fedavgm"
    _buffer_names = ("momentum",)

    def __init__(self, *, server_learning_rate: float = 1.0, server_momentum: float = 0.0) -> None:
        super().__init__()
        self.server_learning_rate: float = positive_option("server_learning_rate", server_learning_rate)
        self.server_momentum: float = unit_interval_option("server_momentum", server_momentum)

    def _optimizes(self) -> bool:
        # Flower's server_opt flag: without it Flower returns the FedAvg aggregate untouched.
        return self.server_momentum != 0.0 or self.server_learning_rate != 1.0

    def _update(
        self,
        round_number: int,
        key: str,
        current: torch.Tensor,
        aggregate: torch.Tensor,
        pending: dict[str, dict[str, torch.Tensor]],
    ) -> torch.Tensor:
        direction = current - aggregate
        if self.server_momentum > 0.0:
            previous = self._buffer("momentum", key, current)
            direction = direction if previous is None else self.server_momentum * previous + direction
            pending["momentum"][key] = direction
        return current - self.server_learning_rate * direction

    def __repr__(self) -> str:
        return f"FedAvgM(server_learning_rate={self.server_learning_rate!r}, server_momentum={self.server_momentum!r})"


class _FedOpt(_ServerOptimizer):
    """Flower's ``FedOpt`` family: delta = fedavg - global; m_t = beta_1 m_t + (1 - beta_1) delta; v_t per rule;
    new = global + step_size * m_t / (sqrt(v_t) + tau). Buffers start at zero, as Flower's."""

    _buffer_names = ("m_t", "v_t")

    def __init__(self, *, eta: float, eta_l: float, beta_1: float, beta_2: float, tau: float) -> None:
        super().__init__()
        self.eta: float = positive_option("eta", eta)
        # The clients' learning rate: Flower keeps it on the strategy but never uses it server-side; so do we.
        self.eta_l: float = positive_option("eta_l", eta_l)
        self.beta_1: float = unit_interval_option("beta_1", beta_1)
        self.beta_2: float = unit_interval_option("beta_2", beta_2)
        self.tau: float = positive_option("tau", tau)

    def _update(
        self,
        round_number: int,
        key: str,
        current: torch.Tensor,
        aggregate: torch.Tensor,
        pending: dict[str, dict[str, torch.Tensor]],
    ) -> torch.Tensor:
        # Flower's numpy expressions, operation for operation; written in place where a temporary would be
        # one more key-sized float64 tensor (each operation still rounds once, so the bits are the same).
        delta = aggregate.sub_(current)  # the aggregate is this round's own tensor
        m_old = self._buffer("m_t", key, current)
        v_old = self._buffer("v_t", key, current)
        m_t = (torch.zeros_like(delta) if m_old is None else m_old) * self.beta_1
        m_t.add_(delta * (1 - self.beta_1))
        v_t = self._second_moment(torch.zeros_like(delta) if v_old is None else v_old, delta)
        del delta
        pending["m_t"][key] = m_t
        pending["v_t"][key] = v_t
        # current + step * m_t / (sqrt(v_t) + tau). Results still differ from Flower's in the last bit now and
        # then: torch's CPU float64 sqrt is not always correctly rounded (numpy's is).
        step = m_t * self._step_size(round_number)
        step.div_(torch.sqrt(v_t).add_(self.tau))
        return step.add_(current)

    def _second_moment(self, v_t: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _step_size(self, round_number: int) -> float:
        return self.eta

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(eta={self.eta!r}, eta_l={self.eta_l!r}, beta_1={self.beta_1!r}, "
            f"beta_2={self.beta_2!r}, tau={self.tau!r})"
        )


class FedAdam(_FedOpt):
    """Adam on the server: v_t = beta_2 v_t + (1 - beta_2) delta^2, with Flower's bias-corrected step size.

    Flower's step is eta * sqrt(1 - beta_2^(t+1)) / (1 - beta_1^(t+1)) at round t (1-based): the exponent is
    one ahead of Adam's usual t. We count t ourselves (aggregate calls, saved in the state) and keep Flower's.
    """

    name = "fedadam"

    def __init__(
        self,
        *,
        eta: float = 1e-1,
        eta_l: float = 1e-1,
        beta_1: float = 0.9,
        beta_2: float = 0.99,
        tau: float = 1e-3,
    ) -> None:
        super().__init__(eta=eta, eta_l=eta_l, beta_1=beta_1, beta_2=beta_2, tau=tau)

    def _second_moment(self, v_t: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        # beta_2 * v_t + (1 - beta_2) * (delta * delta)
        square = delta * delta
        return (v_t * self.beta_2).add_(square.mul_(1 - self.beta_2))

    def _step_size(self, round_number: int) -> float:
        # math.pow is correctly rounded on every machine; numpy's power can be an ulp away (so Flower's can).
        exponent = round_number + 1.0
        return self.eta * math.sqrt(1 - math.pow(self.beta_2, exponent)) / (1 - math.pow(self.beta_1, exponent))


class FedYogi(_FedOpt):
    """Yogi on the server: v_t = v_t - (1 - beta_2) delta^2 sign(v_t - delta^2); no bias correction (as Flower)."""

    name = "fedyogi"

    def __init__(
        self,
        *,
        eta: float = 1e-2,
        eta_l: float = 0.0316,
        beta_1: float = 0.9,
        beta_2: float = 0.99,
        tau: float = 1e-3,
    ) -> None:
        super().__init__(eta=eta, eta_l=eta_l, beta_1=beta_1, beta_2=beta_2, tau=tau)

    def _second_moment(self, v_t: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        # v_t - (1 - beta_2) * square * sign(v_t - square)
        square = delta * delta
        change = (v_t - square).sign_()
        change.mul_(square.mul_(1.0 - self.beta_2))
        return v_t - change


class FedAdagrad(_FedOpt):
    """Adagrad on the server: v_t = v_t + delta^2. Flower fixes beta_1 = beta_2 = 0, so m_t = delta each round."""

    name = "fedadagrad"

    def __init__(self, *, eta: float = 1e-1, eta_l: float = 1e-1, tau: float = 1e-3) -> None:
        super().__init__(eta=eta, eta_l=eta_l, beta_1=0.0, beta_2=0.0, tau=tau)

    def _second_moment(self, v_t: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        return (delta * delta).add_(v_t)  # v_t + delta * delta

    def __repr__(self) -> str:
        return f"FedAdagrad(eta={self.eta!r}, eta_l={self.eta_l!r}, tau={self.tau!r})"
