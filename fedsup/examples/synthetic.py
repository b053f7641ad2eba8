"""A client that trains a small MLP on synthetic data: the workload fedsup's examples and benchmarks use.

Each client draws its own samples from ``numpy.random.default_rng(client_id)``; labels come from one fixed
teacher network shared by every client, so the problem is learnable and the clients agree on it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

import fedsup


def teacher(features: int, classes: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed + 10_000).standard_normal((features, classes))


def make_data(client_id: int, samples: int, features: int, classes: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(client_id)
    x = rng.standard_normal((samples, features)).astype(np.float32)
    y = (x @ teacher(features, classes)).argmax(axis=1).astype(np.int64)
    return x, y


class SyntheticClient(fedsup.Task):
    """One epoch (or more) of SGD on a 32-64-10 MLP over this client's samples."""

    def __init__(self, client_id: int, samples: int = 2000, features: int = 32, classes: int = 10,
                 hidden: int = 64, epochs: int = 1, batch_size: int = 32, lr: float = 0.01,
                 **task_options: Any) -> None:
        super().__init__(task_options.pop("task_id", f"client-{client_id}"), **task_options)
        self.client_id = client_id
        self.samples, self.features, self.classes, self.hidden = samples, features, classes, hidden
        self.epochs, self.batch_size, self.lr = epochs, batch_size, lr

    def load(self) -> None:
        import torch

        x, y = make_data(self.client_id, self.samples, self.features, self.classes)
        self.x, self.y = torch.from_numpy(x), torch.from_numpy(y)
        torch.manual_seed(self.client_id)
        self.model = torch.nn.Sequential(torch.nn.Linear(self.features, self.hidden), torch.nn.ReLU(),
                                         torch.nn.Linear(self.hidden, self.classes))

    def train(self, device: str) -> dict[str, Any]:
        import torch
        import torch.nn.functional as F  # noqa: N812

        model = self.model.to(device)
        x, y = self.x.to(device), self.y.to(device)
        optimizer = torch.optim.SGD(model.parameters(), lr=self.lr)
        total, batches = 0.0, 0
        for _ in range(self.epochs):
            for start in range(0, len(x), self.batch_size):
                optimizer.zero_grad()
                loss = F.cross_entropy(model(x[start:start + self.batch_size]), y[start:start + self.batch_size])
                loss.backward()
                optimizer.step()
                total += float(loss)
                batches += 1
        with torch.no_grad():
            accuracy = float((model(x).argmax(1) == y).float().mean())
        return {"loss": total / max(batches, 1), "accuracy": accuracy, "num_examples": len(x)}
