#!/usr/bin/env python
"""The pfl side of ``bench/cifar.py``: the CIFAR-shaped workload on pfl 0.6's simulator (pfl-research).

Run with the python of pfl's own venv (``bash bench/setup_pfl.sh`` makes it)::

    bench/.pfl-venv/bin/python bench/pfl_peer.py --clients 1000 --rounds 20 --per-round 50 --plan PLAN

What runs: ``pfl.algorithm.FederatedAveraging`` with ``pfl.aggregate.simulate.SimulatedBackend`` (one process,
pfl's default without its distributed launcher), a ``PyTorchModel`` of bench/cifar_clients.py's CNN with local
SGD (lr 0.05, batch 10, one epoch) and a central SGD of lr 1.0 (plain model averaging), evaluation off. Each
round's users are the plan's (fedsup's own sampling), given to pfl through its ``user_sampler``. pfl's own
local loop and aggregation (sum of model differences weighted by data points) differ from the other
variants' in the last bits, so the model is not compared; the work per round is the same. torch and pfl are
imported before the timer starts.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
MARK = "BENCH_JSON "

import cifar_clients  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from pfl.aggregate.simulate import SimulatedBackend  # noqa: E402
from pfl.algorithm import FederatedAveraging, NNAlgorithmParams  # noqa: E402
from pfl.data.dataset import Dataset  # noqa: E402
from pfl.data.federated_dataset import FederatedDataset  # noqa: E402
from pfl.hyperparam import NNEvalHyperParams, NNTrainHyperParams  # noqa: E402
from pfl.metrics import Weighted  # noqa: E402
from pfl.model.pytorch import PyTorchModel  # noqa: E402


class CNN(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = cifar_clients.make_model()
        self.net.load_state_dict(cifar_clients.initial_state())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def loss(self, x: torch.Tensor, y: torch.Tensor, eval: bool = False) -> torch.Tensor:  # noqa: A002
        self.eval() if eval else self.train()
        return torch.nn.functional.cross_entropy(self(x), y, reduction="sum") / len(y)

    def metrics(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
        with torch.no_grad():
            loss = torch.nn.functional.cross_entropy(self(x), y, reduction="sum")
        return {"loss": Weighted(float(loss), len(y))}


def make_dataset(user_id: int) -> Dataset:
    x, y = cifar_clients.make_data(int(user_id))
    return Dataset(raw_data=[x, y], user_id=user_id)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--per-round", type=int, default=50)
    parser.add_argument("--plan", required=True, help="JSON: round -> client ids")
    args = parser.parse_args()
    torch.set_num_threads(1)
    plan = {int(r): ids for r, ids in json.loads(args.plan).items()}
    order = iter([c for r in sorted(plan) for c in plan[r]] + [0] * args.per_round)  # pfl samples one ahead
    dataset = FederatedDataset(make_dataset, lambda: next(order))
    module = CNN()
    model = PyTorchModel(model=module, local_optimizer_create=torch.optim.SGD,
                         central_optimizer=torch.optim.SGD(module.parameters(), lr=1.0))
    algorithm_params = NNAlgorithmParams(central_num_iterations=args.rounds, evaluation_frequency=10**6,
                                         train_cohort_size=args.per_round, val_cohort_size=0)
    train_params = NNTrainHyperParams(local_num_epochs=1, local_learning_rate=cifar_clients.LR,
                                      local_batch_size=cifar_clients.BATCH)
    eval_params = NNEvalHyperParams(local_batch_size=cifar_clients.BATCH)
    backend = SimulatedBackend(training_data=dataset, val_data=None, postprocessors=[])
    t0 = time.perf_counter()
    FederatedAveraging().run(backend=backend, model=model, algorithm_params=algorithm_params,
                             model_train_params=train_params, model_eval_params=eval_params, callbacks=[])
    wall = time.perf_counter() - t0
    total = float(sum(p.detach().double().sum() for p in module.parameters()))
    print(MARK + json.dumps({"wall": wall, "param_sum": total, "numpy": np.__version__}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
