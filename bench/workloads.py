"""Workloads for ``bench/overhead.py``: the MLP client of ``bench/fl_clients.py`` run as plain tasks (no
federation: each client starts from its own seeded model), and a no-op task.

They live in a module of their own (not in ``__main__``) so that tasks pickle by reference into the fork
server's children. The same plain functions do the work for every variant (fedsup, a process pool, a
sequential loop), so that only the way the work is run differs, and every variant computes the same losses.
"""

from __future__ import annotations

import os
from typing import Any

import fl_clients
import torch

import fedsup


def make_model(client_id: int) -> torch.nn.Module:
    torch.manual_seed(client_id)
    return fl_clients.make_model()


def train_epoch(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, client_id: int,
                device: str = "cpu") -> dict[str, Any]:
    loss, batches = fl_clients.sgd_epoch(model.to(device), x.to(device), y.to(device), seed=client_id)
    return {"client_id": client_id, "loss": loss, "batches": batches, "pid": os.getpid(),
            "threads": torch.get_num_threads()}


def client_job(client_id: int) -> dict[str, Any]:
    """load + train for one client, in whatever process calls it (the pool and sequential baselines)."""
    x, y = fl_clients.make_data(client_id)
    return train_epoch(make_model(client_id), x, y, client_id)


# ---------------------------------------------------------------- fedsup tasks


class NoopTask(fedsup.Task):
    """load() and train() do nothing: what is left is the supervisor's own cost."""

    def load(self) -> None:
        pass

    def train(self, device: str) -> None:
        return None


class MLPTask(fedsup.Task):
    """One client: data and model built in load(), one epoch in train()."""

    def __init__(self, client_id: int) -> None:
        super().__init__(f"mlp-{client_id}")
        self.client_id = client_id

    def load(self) -> None:
        self.x, self.y = fl_clients.make_data(self.client_id)
        self.model = make_model(self.client_id)

    def train(self, device: str) -> dict[str, Any]:
        return train_epoch(self.model, self.x, self.y, self.client_id, device)


class NoopClient(fedsup.Task):
    """A federated client that does nothing: a one-number model, sent back as it came. What is left of a
    round is fedsup's own cost (bench/longrun.py)."""

    def __init__(self, client_id: int) -> None:
        super().__init__()
        self.client_id = client_id

    def load(self) -> None:
        pass

    def initial_state(self) -> dict[str, Any]:
        return {"w": torch.zeros(1)}

    def train(self, device: str) -> dict[str, Any]:
        assert self.global_state is not None
        return {"state": {"w": self.global_state["w"].clone()}, "num_examples": 1}
