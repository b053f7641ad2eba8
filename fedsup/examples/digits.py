"""Real data without a download: scikit-learn's bundled handwritten digits (8x8 images, 10 classes).

A fifth of the images is held out, stratified, for evaluation; the rest is split across clients with a
Dirichlet(alpha) label skew. Every client computes the same split from ``split_seed``, so nothing but the
client id travels to its process. Needs the ``examples`` extra (scikit-learn).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np

import fedsup
from fedsup.examples.training import sgd_epochs
from fedsup.federated.partition import dirichlet


@lru_cache(maxsize=4)
def split(clients: int, alpha: float, split_seed: int) -> tuple[np.ndarray, np.ndarray, list[np.ndarray],
                                                                 np.ndarray, np.ndarray]:
    """(train x, train y, each client's indices into train, test x, test y), the same in every process."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    rng = np.random.default_rng(split_seed)
    test = np.concatenate([rng.permutation(np.flatnonzero(y == c))[: int(round((y == c).sum() * 0.2))]
                           for c in range(10)])
    train = np.setdiff1d(np.arange(len(y)), test)
    parts = dirichlet(y[train], clients, alpha, seed=split_seed, min_size=10)
    return x[train], y[train], parts, x[np.sort(test)], y[np.sort(test)]


class DigitsClient(fedsup.Task):
    """An MLP (64-hidden-10) trained on this client's share of the digits; evaluated on the held-out fifth."""

    def __init__(self, client_id: int, clients: int = 10, alpha: float = 0.5, split_seed: int = 0,
                 hidden: int = 64, epochs: int = 2, batch_size: int = 16, lr: float = 0.1) -> None:
        super().__init__(f"client-{client_id}")
        self.client_id, self.clients, self.alpha, self.split_seed = client_id, clients, alpha, split_seed
        self.hidden, self.epochs, self.batch_size, self.lr = hidden, epochs, batch_size, lr

    def build_model(self) -> Any:
        import torch

        return torch.nn.Sequential(torch.nn.Linear(64, self.hidden), torch.nn.ReLU(), torch.nn.Linear(self.hidden, 10))

    def load(self) -> None:
        import torch

        x, y, parts, tx, ty = split(self.clients, self.alpha, self.split_seed)
        mine = parts[self.client_id]
        self.x, self.y = torch.from_numpy(x[mine]), torch.from_numpy(y[mine])
        self.test_x, self.test_y = torch.from_numpy(tx), torch.from_numpy(ty)
        self.model = self.build_model()

    def initial_state(self) -> dict[str, Any]:
        return self.build_model().state_dict()

    def train(self, device: str) -> dict[str, Any]:
        model = self.model.to(device)
        if self.global_state is not None:
            model.load_state_dict(self.global_state)
        losses = sgd_epochs(model, self.x.to(device), self.y.to(device), self.epochs, self.batch_size, self.lr)
        return {"state": model.state_dict(), "num_examples": len(self.x), "loss": sum(losses) / len(losses)}

    def evaluate(self, device: str) -> dict[str, Any]:
        import torch
        import torch.nn.functional as F  # noqa: N812

        model = self.model.to(device)
        model.load_state_dict(self.global_state)
        with torch.no_grad():
            logits = model(self.test_x.to(device))
            y = self.test_y.to(device)
            return {"num_examples": len(y), "loss": float(F.cross_entropy(logits, y)),
                    "accuracy": float((logits.argmax(1) == y).float().mean())}
