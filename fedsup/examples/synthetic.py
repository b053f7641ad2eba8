"""A client that trains a small MLP on synthetic data, split non-IID across clients.

Every class is a Gaussian cluster around a centre shared by all clients; each client sees the classes in its
own proportions, drawn from a Dirichlet(alpha) by ``numpy.random.default_rng(client_id)`` (small alpha: a
few classes dominate each client). No client sees enough of every class alone, so the global model learns
more than any client could, and its accuracy on a balanced held-out set rises over the rounds.
"""

from __future__ import annotations

from typing import Any

import numpy as np

import fedsup
from fedsup.examples.training import sgd_epochs

DATA_SEED = 10_000  # the shared class centres and the held-out set; clients draw from their own rng


def centres(features: int, classes: int, spread: float) -> np.ndarray:
    return np.random.default_rng(DATA_SEED).standard_normal((classes, features)) * spread


def client_data(client_id: int, samples: int, features: int, classes: int, alpha: float,
                spread: float) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(client_id)
    proportions = rng.dirichlet(np.full(classes, alpha))
    y = rng.choice(classes, size=samples, p=proportions)
    x = centres(features, classes, spread)[y] + rng.standard_normal((samples, features))
    return x.astype(np.float32), y.astype(np.int64)


def test_data(samples: int, features: int, classes: int, spread: float) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(DATA_SEED + 1)
    y = np.arange(samples) % classes
    x = centres(features, classes, spread)[y] + rng.standard_normal((samples, features))
    return x.astype(np.float32), y.astype(np.int64)


class SyntheticClient(fedsup.Task):
    """SGD on a features-hidden-classes MLP over this client's samples; evaluates on a balanced held-out set."""

    def __init__(self, client_id: int, samples: int = 2000, features: int = 32, classes: int = 10,
                 hidden: int = 64, epochs: int = 1, batch_size: int = 32, lr: float = 0.01, alpha: float = 0.3,
                 spread: float = 1.0, test_samples: int = 2000, **task_options: Any) -> None:
        super().__init__(task_options.pop("task_id", f"client-{client_id}"), **task_options)
        self.client_id = client_id
        self.samples, self.features, self.classes, self.hidden = samples, features, classes, hidden
        self.epochs, self.batch_size, self.lr = epochs, batch_size, lr
        self.alpha, self.spread, self.test_samples = alpha, spread, test_samples

    def build_model(self) -> Any:
        import torch

        return torch.nn.Sequential(torch.nn.Linear(self.features, self.hidden), torch.nn.ReLU(),
                                   torch.nn.Linear(self.hidden, self.classes))

    def load(self) -> None:
        import torch

        x, y = client_data(self.client_id, self.samples, self.features, self.classes, self.alpha, self.spread)
        self.x, self.y = torch.from_numpy(x), torch.from_numpy(y)
        tx, ty = test_data(self.test_samples, self.features, self.classes, self.spread)
        self.test_x, self.test_y = torch.from_numpy(tx), torch.from_numpy(ty)
        torch.manual_seed(self.client_id)
        self.model = self.build_model()

    def initial_state(self) -> dict[str, Any]:
        return self.build_model().state_dict()

    def train(self, device: str) -> dict[str, Any]:
        import torch

        model = self.model.to(device)
        if self.global_state is not None:
            model.load_state_dict(self.global_state)
        x, y = self.x.to(device), self.y.to(device)
        losses = sgd_epochs(model, x, y, self.epochs, self.batch_size, self.lr)
        with torch.no_grad():
            accuracy = float((model(x).argmax(1) == y).float().mean())
        return {"state": model.state_dict(), "num_examples": len(x), "loss": sum(losses) / max(len(losses), 1),
                "accuracy": accuracy}

    def evaluate(self, device: str) -> dict[str, Any]:
        import torch
        import torch.nn.functional as F  # noqa: N812

        model = self.model.to(device)
        if self.global_state is not None:
            model.load_state_dict(self.global_state)
        x, y = self.test_x.to(device), self.test_y.to(device)
        with torch.no_grad():
            logits = model(x)
            return {"num_examples": len(x), "loss": float(F.cross_entropy(logits, y)),
                    "accuracy": float((logits.argmax(1) == y).float().mean())}
