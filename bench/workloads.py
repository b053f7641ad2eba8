"""Workloads for the fedsup benchmarks.

They live in a module of their own (not in ``__main__``) so that tasks pickle by reference into the fork
server's children. The same plain functions do the work for every variant (fedsup, a process pool, a
sequential loop), so that only the way the work is run differs.

The MLP client: 2,000 samples of 32 features drawn from ``numpy.random.default_rng(client_id)``, labels
from a fixed random linear map (the same for every client, applied with torch), a Linear(32, 64)-ReLU-
Linear(64, 10) model initialised from ``torch.manual_seed(client_id)``, one epoch of SGD (lr 0.01, batch
32, cross-entropy, shuffled by a generator seeded with the client id). Every variant computes the same
numbers.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812

import fedsup

N_SAMPLES = 2000
N_FEATURES = 32
N_HIDDEN = 64
N_CLASSES = 10
BATCH = 32
LR = 0.01
LABEL_SEED = 12345  # the fixed random linear map that labels every client's data


# ---------------------------------------------------------------- the work itself


def make_data(client_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(client_id)
    x = torch.from_numpy(rng.standard_normal((N_SAMPLES, N_FEATURES)).astype(np.float32))
    w = np.random.default_rng(LABEL_SEED).standard_normal((N_FEATURES, N_CLASSES)).astype(np.float32)
    # The product in torch, not numpy: numpy's OpenBLAS would start a thread of its own in every process
    # (OPENBLAS_NUM_THREADS set after numpy is loaded does not stop it), which is noise, not supervision.
    y = torch.argmax(x @ torch.from_numpy(w), dim=1)
    return x, y


def make_model(client_id: int) -> torch.nn.Module:
    torch.manual_seed(client_id)
    return torch.nn.Sequential(
        torch.nn.Linear(N_FEATURES, N_HIDDEN), torch.nn.ReLU(), torch.nn.Linear(N_HIDDEN, N_CLASSES)
    )


def train_epoch(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, client_id: int,
                device: str = "cpu") -> dict[str, Any]:
    model = model.to(device)
    x, y = x.to(device), y.to(device)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(client_id))
    total, batches = 0.0, 0
    model.train()
    for start in range(0, len(x), BATCH):
        idx = order[start:start + BATCH]
        opt.zero_grad()
        loss = F.cross_entropy(model(x[idx]), y[idx])
        loss.backward()
        opt.step()
        total += loss.item()
        batches += 1
    return {"client_id": client_id, "loss": total / batches, "batches": batches, "pid": os.getpid(),
            "threads": torch.get_num_threads()}


def client_job(client_id: int) -> dict[str, Any]:
    """load + train for one client, in whatever process calls it (the pool and sequential baselines)."""
    x, y = make_data(client_id)
    model = make_model(client_id)
    return train_epoch(model, x, y, client_id)


# ---------------------------------------------------------------- fedsup tasks


class NoopTask(fedsup.Task):
    """load() and train() do nothing: what is left is the supervisor's own cost."""

    def load(self) -> None:
        pass

    def train(self, device: str) -> None:
        return None


class MLPTask(fedsup.Task):
    """One federated client: data and model built in load(), one epoch in train()."""

    def __init__(self, client_id: int) -> None:
        super().__init__(f"mlp-{client_id}")
        self.client_id = client_id

    def load(self) -> None:
        self.x, self.y = make_data(self.client_id)
        self.model = make_model(self.client_id)

    def train(self, device: str) -> dict[str, Any]:
        return train_epoch(self.model, self.x, self.y, self.client_id, device)
