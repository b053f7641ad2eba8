"""The training loop the example clients share: plain SGD epochs over shuffled mini-batches."""

from __future__ import annotations

from typing import Any


def sgd_epochs(model: Any, x: Any, y: Any, epochs: int, batch_size: int, lr: float) -> list[float]:
    """Train ``model`` in place on (x, y); the order comes from torch's (seeded) generator. Returns the losses."""
    import torch
    import torch.nn.functional as F  # noqa: N812

    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    losses = []
    for _ in range(epochs):
        order = torch.randperm(len(x), device=x.device)
        for start in range(0, len(x), batch_size):
            batch = order[start:start + batch_size]
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x[batch]), y[batch])
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    return losses
