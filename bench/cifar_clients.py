"""The CIFAR-shaped workload of ``bench/cifar.py`` (pfl-research's CIFAR-10 benchmark, scaled down): a small
CNN on synthetic 32x32x3 images, 50 per client, one local epoch of batch 10 a round. The same plain functions
do the work in every variant, so that every variant ends with the same global model.

* data: client ``c``'s 50 images and labels from ``torch.Generator().manual_seed(c)``;
* model: Conv(3, 16, 3)-ReLU-MaxPool-Conv(16, 32, 3)-ReLU-MaxPool-Linear(2048, 64)-ReLU-Linear(64, 10), the
  initial global model under ``torch.manual_seed(0)``;
* training: ``fl_clients.sgd_epoch`` with SGD lr 0.05, batch 10, the order shuffled by (client, round);
* aggregation: FedAvg by ``num_examples``, float64, client-id order (``fl_clients.fedavg``).
"""

from __future__ import annotations

import time
from typing import Any

import torch
from fl_clients import sgd_epoch

SAMPLES, BATCH, LR, INIT_SEED = 50, 10, 0.05, 0
State = dict[str, torch.Tensor]


def make_data(client_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(client_id)
    return torch.randn(SAMPLES, 3, 32, 32, generator=generator), torch.randint(0, 10, (SAMPLES,), generator=generator)


def make_model() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Flatten(), torch.nn.Linear(32 * 8 * 8, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))


def initial_state() -> State:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(INIT_SEED)
        return make_model().state_dict()


def train_client(client_id: int, round_: int, global_state: State, x: torch.Tensor, y: torch.Tensor,
                 model: torch.nn.Module | None = None, device: str = "cpu") -> dict[str, Any]:
    started = time.time()
    model = (model if model is not None else make_model()).to(device)
    model.load_state_dict(global_state)
    loss, _ = sgd_epoch(model, x.to(device), y.to(device), seed=client_id * 1_000 + round_, lr=LR, batch=BATCH)
    return {"state": {k: v.detach().clone() for k, v in model.state_dict().items()}, "num_examples": len(x),
            "loss": loss, "train_started": started, "train_ended": time.time()}


def client_job(client_id: int, round_: int, global_state: State) -> dict[str, Any]:
    x, y = make_data(client_id)
    return train_client(client_id, round_, global_state, x, y)


def __getattr__(name: str) -> Any:
    # the fedsup client is made on first use, so that the pool and in-process variants never import fedsup
    if name != "CNNClient":
        raise AttributeError(name)
    import sys

    from fl_clients import client_class

    globals()[name] = client_class(name, sys.modules[__name__])
    return globals()[name]
