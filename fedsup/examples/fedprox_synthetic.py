"""FedProx's Synthetic(alpha, beta) federation and a multinomial logistic regression client for it.

The data follow Li et al., "Federated Optimization in Heterogeneous Networks" (MLSys 2020), and the generator
in their code (github.com/litian96/FedProx, ``data/synthetic_1_1/generate_synthetic.py``), draw for draw, with
the global ``np.random`` replaced by a ``numpy.random.RandomState(data_seed)``. For each device k:

* its size is ``int(lognormal(4, 2)) + 50``;
* ``u_k ~ N(0, alpha)`` and ``B_k ~ N(0, beta)``;
* ``W_k ~ N(u_k, 1)`` (features x classes), ``b_k ~ N(u_k, 1)`` and ``v_k ~ N(B_k, 1)`` (features);
* ``x ~ N(v_k, Sigma)``, with Sigma diagonal and ``Sigma_jj = j^-1.2``, and ``y = argmax(softmax(W_k^T x + b_k))``.

The code reads alpha and beta as standard deviations (the paper writes variances; for Synthetic(1, 1) the two
agree). Each device's samples are shuffled and split ``train_fraction`` / rest into train and test, 0.9 as
in that code. Every client process builds the whole federation in ``load()`` (a few thousand rows of 60
floats, cached per process) and keeps its own device's rows for training; ``evaluate`` scores the new global
model on every device's training data, the paper's "training loss" (FedProx's ``train_error_and_loss``).

``train`` runs ``max(1, round(epochs * self.work_fraction))`` epochs of minibatch SGD on cross-entropy plus
``fedsup.algorithms.proximal_term`` (zero when ``federation.proximal_mu`` is 0, which makes it FedAvg's local
solver). ``configs/fedprox_synthetic.yaml`` runs the paper's setting; docs/algorithms.md compares the result
with the paper's Figure 1.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

import fedsup
from fedsup.algorithms import proximal_term

Arrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def generate_synthetic(alpha: float, beta: float, devices: int = 30, features: int = 60, classes: int = 10,
                       seed: int = 0) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Synthetic(alpha, beta): per device, float64 features (n_k x features) and int64 labels (n_k,).

    The draws come in the order of FedProx's ``generate_synthetic.py``, from one ``RandomState(seed)``.
    """
    rng = np.random.RandomState(seed)
    samples = rng.lognormal(4, 2, devices).astype(int) + 50
    mean_w = rng.normal(0, alpha, devices)
    mean_b = mean_w
    mean_v = rng.normal(0, beta, devices)
    cov_x = np.diag(np.power(np.arange(1, features + 1, dtype=np.float64), -1.2))
    mean_x = np.zeros((devices, features))
    for k in range(devices):
        mean_x[k] = rng.normal(mean_v[k], 1, features)
    xs, ys = [], []
    for k in range(devices):
        w = rng.normal(mean_w[k], 1, (features, classes))
        b = rng.normal(mean_b[k], 1, classes)
        x = rng.multivariate_normal(mean_x[k], cov_x, samples[k])
        ys.append(np.argmax(x @ w + b, axis=1).astype(np.int64))  # argmax of the softmax is argmax of the logits
        xs.append(x)
    return xs, ys


@functools.lru_cache(maxsize=4)
def federation(alpha: float, beta: float, devices: int, features: int, classes: int, seed: int,
               train_fraction: float) -> tuple[list[Arrays], Arrays]:
    """Every device's (train x, train y, test x, test y) as float32/int64, and all devices' rows concatenated."""
    xs, ys = generate_synthetic(alpha, beta, devices, features, classes, seed)
    split = np.random.RandomState(seed + 1)  # FedProx shuffles each device with Python's random; any seed will do
    parts: list[Arrays] = []
    for x, y in zip(xs, ys, strict=True):
        order = split.permutation(len(y))
        cut = int(train_fraction * len(y))
        x, y = x[order].astype(np.float32), y[order]
        parts.append((x[:cut], y[:cut], x[cut:], y[cut:]))
    merged = tuple(np.concatenate([p[i] for p in parts]) for i in range(4))
    return parts, merged  # type: ignore[return-value]


class FedProxSyntheticClient(fedsup.Task):
    """One device of Synthetic(alpha, beta): a features-to-classes linear softmax model trained with SGD."""

    def __init__(self, client_id: int, alpha: float = 1.0, beta: float = 1.0, devices: int = 30,
                 features: int = 60, classes: int = 10, data_seed: int = 0, train_fraction: float = 0.9,
                 epochs: int = 20, batch_size: int = 10, lr: float = 0.01, **task_options: Any) -> None:
        super().__init__(task_options.pop("task_id", f"client-{client_id}"), **task_options)
        if not 0 <= client_id < devices:
            raise ValueError(f"client_id {client_id}: Synthetic has {devices} devices (set federation.clients "
                             f"to {devices} or task.args.devices)")
        self.client_id = client_id
        self.alpha, self.beta, self.devices = float(alpha), float(beta), devices
        self.features, self.classes, self.data_seed = features, classes, data_seed
        self.train_fraction = float(train_fraction)
        self.epochs, self.batch_size, self.lr = epochs, batch_size, lr

    def _federation(self) -> tuple[list[Arrays], Arrays]:
        return federation(self.alpha, self.beta, self.devices, self.features, self.classes, self.data_seed,
                          self.train_fraction)

    def build_model(self) -> Any:
        import torch

        return torch.nn.Linear(self.features, self.classes)

    def load(self) -> None:
        import torch

        parts, merged = self._federation()
        x, y, _, _ = parts[self.client_id]
        self.x, self.y = torch.from_numpy(x), torch.from_numpy(y)
        self.all_x, self.all_y, self.all_test_x, self.all_test_y = (torch.from_numpy(a) for a in merged)
        self.model = self.build_model()

    def initial_state(self) -> dict[str, Any]:
        """As FedProx's TensorFlow model starts: Glorot-uniform weights and zero biases (seeded by fedsup)."""
        import torch

        model = self.build_model()
        torch.nn.init.xavier_uniform_(model.weight)
        torch.nn.init.zeros_(model.bias)
        return model.state_dict()

    def local_epochs(self) -> int:
        """The full ``epochs``, or a straggler's share of them (at least one)."""
        return max(1, round(self.epochs * float(getattr(self, "work_fraction", 1.0) or 1.0)))

    def train(self, device: str) -> dict[str, Any]:
        import torch
        import torch.nn.functional as F  # noqa: N812

        model = self.model.to(device)
        if self.global_state is not None:
            model.load_state_dict(self.global_state)
        mu = float(getattr(self, "proximal_mu", 0.0) or 0.0)
        x, y = self.x.to(device), self.y.to(device)
        optimizer = torch.optim.SGD(model.parameters(), lr=self.lr)
        epochs = self.local_epochs()
        total, steps = 0.0, 0
        for _ in range(epochs):
            order = torch.randperm(len(x), device=x.device)
            for start in range(0, len(x), self.batch_size):
                batch = order[start:start + self.batch_size]
                optimizer.zero_grad()
                loss = F.cross_entropy(model(x[batch]), y[batch])
                (loss + proximal_term(model, self.global_state, mu)).backward()
                optimizer.step()
                total += loss.item()
                steps += 1
        return {"state": model.state_dict(), "num_examples": len(x), "loss": total / max(steps, 1),
                "epochs": epochs}

    def evaluate(self, device: str) -> dict[str, Any]:
        """The global model on every device's data: training loss and accuracy (the paper's), test accuracy.

        Each evaluating client computes the same federation-wide numbers, so their weighted mean is that number.
        """
        import torch
        import torch.nn.functional as F  # noqa: N812

        model = self.model.to(device)
        if self.global_state is not None:
            model.load_state_dict(self.global_state)
        with torch.no_grad():
            logits = model(self.all_x.to(device))
            y = self.all_y.to(device)
            test_logits = model(self.all_test_x.to(device))
            test_y = self.all_test_y.to(device)
            return {"num_examples": len(self.all_y),
                    "train_loss": float(F.cross_entropy(logits, y)),
                    "train_accuracy": float((logits.argmax(1) == y).float().mean()),
                    "test_accuracy": float((test_logits.argmax(1) == test_y).float().mean())}
