"""The federated workload of ``bench/compare.py``: the MLP client, FedAvg, and a no-op task.

The same plain functions do the work in every variant (fedsup, a process pool, one plain process, Flower),
so that only the way the work is run differs, and every variant ends with the same global model:

* data: 2,000 samples of 32 features from ``numpy.random.default_rng(client_id)``; labels
  ``argmax(X @ W)`` with ``W`` (32 x 10) from ``numpy.random.default_rng(10_000)``, shared by every client
  (the product is taken in torch: see ``make_data``);
* model: Linear(32, 64)-ReLU-Linear(64, 10); the initial global model is built under
  ``torch.manual_seed(INIT_SEED)``, and every client starts each round from the global model;
* training: one epoch of SGD (lr 0.01, batch 32, cross-entropy), the order shuffled by a generator seeded
  with (client id, round); ``train`` notes ``time.time()`` on entry and on exit (``train_started``,
  ``train_ended``);
* aggregation: FedAvg weighted by ``num_examples``, accumulated in float64 in client-id order (a plain loop
  of multiply then add, as ``fedsup.federated.strategies`` does), cast back to float32.

This module is also imported by ``bench/flower_peer.py`` inside Flower's own venv, where fedsup is not
installed: the fedsup tasks at the bottom are defined on first use, and only then is fedsup imported.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from functools import lru_cache
from types import ModuleType
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812

N_SAMPLES = 2000
N_FEATURES = 32
N_HIDDEN = 64
N_CLASSES = 10
BATCH = 32
LR = 0.01
LABEL_SEED = 10_000   # the fixed teacher W that labels every client's data
INIT_SEED = 0         # the initial global model
RUN_SEED = 0          # fedsup's run seed: it decides which clients a round samples

State = dict[str, torch.Tensor]


@lru_cache(maxsize=1)
def teacher() -> np.ndarray:
    return np.random.default_rng(LABEL_SEED).standard_normal((N_FEATURES, N_CLASSES)).astype(np.float32)


def make_data(client_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.from_numpy(np.random.default_rng(client_id).standard_normal((N_SAMPLES, N_FEATURES)).astype(np.float32))
    # X @ W in torch, on the caller's torch threads (one everywhere here). numpy's own matmul would go to
    # OpenBLAS, whose worker threads busy-wait between calls: a second core burnt in every process, which
    # slowed the pool and fedsup (two or more such processes on two cores) far more than the sequential run.
    y = (x @ torch.from_numpy(teacher())).argmax(dim=1)
    return x, y


def make_model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(N_FEATURES, N_HIDDEN), torch.nn.ReLU(),
                               torch.nn.Linear(N_HIDDEN, N_CLASSES))


def initial_state() -> State:
    # A private generator state: the caller's RNG (fedsup seeds torch before initial_state) does not matter.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(INIT_SEED)
        return make_model().state_dict()


def sgd_epoch(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, seed: int, lr: float = LR,
              batch: int = BATCH) -> tuple[float, int]:
    """One epoch of SGD in an order shuffled by ``seed``: the mean loss and the number of batches."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    total, batches = 0.0, 0
    model.train()
    for start in range(0, len(x), batch):
        idx = order[start:start + batch]
        opt.zero_grad()
        loss = F.cross_entropy(model(x[idx]), y[idx])
        loss.backward()
        opt.step()
        total += loss.item()
        batches += 1
    return total / batches, batches


def train_client(client_id: int, round_: int, global_state: State, x: torch.Tensor, y: torch.Tensor,
                 model: torch.nn.Module | None = None, device: str = "cpu") -> dict[str, Any]:
    """One epoch from the global model; the fedsup result contract: state, num_examples, metrics."""
    started = time.time()
    model = (model if model is not None else make_model()).to(device)
    model.load_state_dict(global_state)
    loss, _ = sgd_epoch(model, x.to(device), y.to(device), seed=client_id * 1_000 + round_)
    return {"state": {k: v.detach().clone() for k, v in model.state_dict().items()}, "num_examples": len(x),
            "loss": loss, "train_started": started, "train_ended": time.time()}


def client_job(client_id: int, round_: int, global_state: State) -> dict[str, Any]:
    """Load and train one client in whatever process calls it (the pool and in-process baselines)."""
    x, y = make_data(client_id)
    return train_client(client_id, round_, global_state, x, y)


def fedavg(global_state: State, updates: Sequence[tuple[int, State, int]]) -> State:
    """``updates``: (client_id, state, num_examples). Weighted mean in float64, client-id order."""
    ordered = sorted(updates, key=lambda u: u[0])
    weights = [n for _, _, n in ordered]
    out: State = {}
    for key, ref in global_state.items():
        total = ordered[0][1][key].to(torch.float64) * weights[0]
        for (_, state, _), w in zip(ordered[1:], weights[1:], strict=True):
            total = total + state[key].to(torch.float64) * w
        out[key] = (total / sum(weights)).to(ref.dtype).contiguous()
    return out


def fingerprint(state: State) -> list[float]:
    """A few numbers that tell two final models apart: per tensor, the float64 sum and sum of squares."""
    return [float(v.to(torch.float64).sum()) for v in state.values()] + \
           [float(v.to(torch.float64).square().sum()) for v in state.values()]


def noop_job(i: int) -> dict[str, Any]:
    return {"train_started": time.time()}


# ---------------------------------------------------------------- fedsup tasks
#
# Defined on first access (``fl_clients.MLPClient``), so that the baselines, which never touch them, do not
# import fedsup (its modules would add to their memory), and so that Flower's venv, which has no fedsup,
# can import this module. Pickle and fedsup's config loader find them by name like any module attribute.

_FEDSUP_TASKS = ("MLPClient", "NoopTask")


def client_class(name: str, work: ModuleType) -> type:
    """A fedsup client of the workload in module ``work`` (its make_data, make_model, initial_state and
    train_client): data and model built in load(), one epoch from the global model in train(). Named ``name``
    in ``work``, where pickle and fedsup's config loader find it."""
    import fedsup

    class Client(fedsup.Task):
        def __init__(self, client_id: int, **options: Any) -> None:
            super().__init__(f"client-{client_id}", **options)
            self.client_id = client_id

        def load(self) -> None:
            self.x, self.y = work.make_data(self.client_id)
            self.model = work.make_model()

        def initial_state(self) -> State:
            return work.initial_state()

        def train(self, device: str) -> dict[str, Any]:
            assert self.global_state is not None
            return work.train_client(self.client_id, self.round, self.global_state, self.x, self.y, self.model,
                                     device)

    Client.__name__ = Client.__qualname__ = name
    Client.__module__ = work.__name__
    return Client


def _define_fedsup_tasks() -> None:
    import fedsup

    MLPClient = client_class("MLPClient", sys.modules[__name__])  # noqa: N806 - a class

    class NoopTask(fedsup.Task):
        """load() and train() do nothing but note the time: what is left is the supervisor's own cost."""

        def load(self) -> None:
            pass

        def train(self, device: str) -> dict[str, Any]:
            return {"train_started": time.time()}

    for cls in (MLPClient, NoopTask):
        cls.__qualname__ = cls.__name__  # module-level names, for pickle
        globals()[cls.__name__] = cls


def __getattr__(name: str) -> Any:
    if name in _FEDSUP_TASKS:
        _define_fedsup_tasks()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
