"""Helpers a client calls inside ``train``: FedProx's proximal term and SCAFFOLD's control variates.

* FedProx (Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020): with
  ``federation.proximal_mu`` set, every client has ``self.proximal_mu``; add
  ``proximal_term(model, self.global_state, self.proximal_mu)`` to the loss before ``backward()``.
* SCAFFOLD (Karimireddy et al., "SCAFFOLD: Stochastic Controlled Averaging for Federated Learning",
  ICML 2020, option II): with ``strategy: scaffold``, ``Scaffold(self, model)`` reads the server's control
  variate (``self.server_control``) and the client's own (kept in ``self.client_state``); call
  ``correct()`` after each ``backward()`` and before the optimiser's step, and ``finish(lr)`` once after
  the local steps, which stores the client's new control variate in ``self.client_state``. The strategy
  reads each client's change of control variate from the committed client states.

Each works in the client's process, on the client's device; nothing here touches the run directory.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

State = dict[str, torch.Tensor]

# SCAFFOLD's control variate lives in the client's state under these keys, beside anything else it keeps.
CONTROL_PREFIX = "scaffold/"


def proximal_term(model: torch.nn.Module, global_state: State | None, mu: float) -> torch.Tensor:
    """``mu / 2 * ||w - w_global||^2`` over the model's trainable parameters (zero when ``mu`` is 0)."""
    parameters = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if not mu or global_state is None or not parameters:
        device = parameters[0][1].device if parameters else None
        return torch.zeros((), device=device)
    total = sum(((p - global_state[name].to(p.device, p.dtype)) ** 2).sum() for name, p in parameters)
    return 0.5 * mu * total  # type: ignore[return-value]


def control_of(client_state: State, like: Mapping[str, torch.Tensor]) -> State:
    """A client's control variate c_i (zeros before its first round), for the parameters in ``like``."""
    return {name: client_state.get(CONTROL_PREFIX + name, torch.zeros_like(p)).to(p.device, p.dtype)
            for name, p in like.items()}


class Scaffold:
    """SCAFFOLD's client side for one round of local training.

    ``correct()`` turns each parameter's gradient g into g - c_i + c; ``finish(lr)`` computes
    c_i+ = c_i - c + (x - y) / (K * lr), with x the round's global model, y the trained one and K the number
    of corrected steps, and stores it in the task's ``client_state``.
    """

    def __init__(self, task: Any, model: torch.nn.Module) -> None:
        if getattr(task, "server_control", None) is None:
            raise RuntimeError("Scaffold needs the server's control variate: set federation.strategy: scaffold")
        self.task, self.model = task, model
        self.parameters = {name: p for name, p in model.named_parameters() if p.requires_grad}
        server = task.server_control
        self.server = {name: server[name].to(p.device, p.dtype) for name, p in self.parameters.items()}
        self.client = control_of(task.client_state or {}, self.parameters)
        self.correction = {name: self.server[name] - self.client[name] for name in self.parameters}
        self.steps = 0

    def correct(self) -> None:
        """After ``loss.backward()``, before ``optimizer.step()``."""
        with torch.no_grad():
            for name, p in self.parameters.items():
                if p.grad is not None:
                    p.grad.add_(self.correction[name])
        self.steps += 1

    def finish(self, lr: float) -> None:
        """After the local steps: the new control variate goes into ``task.client_state``."""
        if self.steps == 0:
            return  # no step taken: the control variate stays as it was
        x = self.task.global_state
        state = dict(self.task.client_state or {})
        with torch.no_grad():
            for name, p in self.parameters.items():
                drift = (x[name].to(p.device, p.dtype) - p.detach()) / (self.steps * lr)
                state[CONTROL_PREFIX + name] = (self.client[name] - self.server[name] + drift).cpu()
        self.task.client_state = state
