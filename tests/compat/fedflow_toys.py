"""Tasks for the fedflow compatibility tests, in fedflow's style and in fedsup's own.

They live in an importable module, not in the test file, because fedsup pickles a task by reference to its
class. The fedflow-style half is written as a fedflow script would be, but for its import line; the fedsup half
does the same work through ``fedsup.Task`` directly, so that the two can be compared number for number.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from toys import first_time

import fedsup
from fedsup.compat.fedflow import FedFlow, Task, TaskGroup

FEATURES = 4
STEPS = 20

# ---------------------------------------------------------------- the work, shared by both halves


def make_data(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(32, FEATURES, generator=generator)
    y = x @ torch.arange(1.0, FEATURES + 1) + 0.1 * torch.randn(32, generator=generator)
    return x, y


def fit(data: tuple[torch.Tensor, torch.Tensor], init: dict[str, Any] | None) -> dict[str, Any]:
    """A few steps of SGD on a linear model, from ``init`` (an earlier average) or from zero."""
    x, y = data
    model = torch.nn.Linear(FEATURES, 1)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([init["weight"]]) if init else torch.zeros(1, FEATURES))
        model.bias.fill_(init["bias"] if init else 0.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(STEPS):
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x).squeeze(1), y)
        loss.backward()
        optimizer.step()
    return {"weight": model.weight.detach()[0].tolist(), "bias": float(model.bias.item()), "loss": loss.item()}


def average(results: list[dict[str, Any]]) -> dict[str, Any]:
    weights = torch.tensor([r["weight"] for r in results]).mean(dim=0)
    biases = torch.tensor([r["bias"] for r in results]).mean()
    return {"weight": weights.tolist(), "bias": float(biases)}


# torch's first backward pass and optimiser step cost about a second in each new process. Taken once here, in
# the test process that the fork servers are forked from, they are already done in every task process.
fit(make_data(0), None)


# ---------------------------------------------------------------- fedflow style


class TrainTask(Task):
    """A client: trains from the previous aggregate's result, and leaves its weights in its workdir."""

    def __init__(self, client_id: int, pre_aggregate_task: Task | None = None) -> None:
        super().__init__(client_id)
        self.pre_aggregate_task = pre_aggregate_task

    def load(self) -> None:
        self.data = make_data(int(self.task_id))

    def train(self, device: str) -> dict[str, Any]:
        init = self.pre_aggregate_task.result if self.pre_aggregate_task is not None else None
        result = fit(self.data, init)
        with open("weights.json", "w") as f:  # relative: the task's process works in its workdir
            json.dump(result["weight"], f)
        return result


class AggregateTask(Task):
    """Averages the trained tasks' results, read from the task objects it holds."""

    def __init__(self, tasks: list[Task]) -> None:
        super().__init__()
        self.tasks = tasks

    def load(self) -> None:
        pass

    def train(self, device: str) -> dict[str, Any]:
        return average([t.result for t in self.tasks])


def fedflow_main(rounds: int, clients: int) -> list[Task]:
    """The body of a fedflow script (fedflow's mnist example, in small): rounds of train then aggregate."""
    pre_aggregate_task = None
    aggregates = []
    for r in range(rounds):
        train_group = TaskGroup(f"train-{r + 1}")
        tasks = [TrainTask(i, pre_aggregate_task) for i in range(clients)]
        for t in tasks:
            train_group.add_task(t)
        FedFlow.add_group(train_group)

        aggregate_group = TaskGroup(f"aggregate-{r + 1}")
        aggregate_task = AggregateTask(tasks)
        aggregate_group.add_task(aggregate_task)
        FedFlow.add_group(aggregate_group)

        pre_aggregate_task = aggregate_task
        aggregates.append(aggregate_task)
    FedFlow.start()
    return aggregates


class WhereAmI(Task):
    """Reports the directory it works in, and whether it can read a file a task of an earlier group left."""

    def __init__(self, task_id: str | int | None = None, earlier: Task | None = None, **sizes: Any) -> None:
        super().__init__(task_id, **sizes)
        self.earlier = earlier

    def load(self) -> None:
        pass

    def train(self, device: str) -> dict[str, Any]:
        found = None
        if self.earlier is not None:
            with open(os.path.join(self.earlier.workdir, "weights.json")) as f:
                found = json.load(f)
        return {"cwd": os.getcwd(), "device": device, "self_device": self.device, "found": found}


class FlakyOnce(Task):
    """Raises on its first attempt only, after setting an item that must not reach the main process."""

    def __init__(self, task_id: str, markers: str) -> None:
        super().__init__(task_id)
        self.markers = markers

    def load(self) -> None:
        pass

    def train(self, device: str) -> dict[str, Any]:
        if first_time(self.markers, str(self.task_id)):
            self.set_item("first", True)
            raise RuntimeError("first attempt fails")
        self.set_item("second", True)
        return {"ok": True}


class CrashOnce(Task):
    """Its process dies without a word (``os._exit``) on the first attempt: fedflow waited for it forever."""

    def __init__(self, task_id: str, markers: str) -> None:
        super().__init__(task_id)
        self.markers = markers

    def load(self) -> None:
        pass

    def train(self, device: str) -> dict[str, Any]:
        if first_time(self.markers, "crash"):
            os._exit(7)
        return {"ok": True}


class AlwaysFails(Task):
    def load(self) -> None:
        pass

    def train(self, device: str) -> dict[str, Any]:
        raise ValueError("boom: this task never trains")


class Itemizer(Task):
    """Sets items in load and in train, and returns no dict (fedflow's result is then {})."""

    def load(self) -> None:
        self.set_item("loaded", os.getpid())

    def train(self, device: str) -> None:
        self.set_item("acc", 0.5)
        self.set_item("pid", os.getpid())


class ItemReader(Task):
    """Reads the items of a task of an earlier group, from the task object it holds."""

    def __init__(self, earlier: Task) -> None:
        super().__init__("reader")
        self.earlier = earlier

    def load(self) -> None:
        pass

    def train(self, device: str) -> dict[str, Any]:
        return {"acc": self.earlier.get_item("acc"), "missing": self.earlier.get_item("missing")}


class SetItemInLoad(Task):
    """Checks, in its own process, that get_item sees what set_item kept."""

    def load(self) -> None:
        self.set_item("k", [1, 2])

    def train(self, device: str) -> dict[str, Any]:
        return {"seen": self.get_item("k")}


# ---------------------------------------------------------------- the same work, for fedsup directly


class DirectTrain(fedsup.Task):
    def __init__(self, task_id: str, client_id: int, init: dict[str, Any] | None) -> None:
        super().__init__(task_id)
        self.client_id, self.init = client_id, init

    def load(self) -> None:
        self.data = make_data(self.client_id)

    def train(self, device: str) -> dict[str, Any]:
        return fit(self.data, self.init)


class DirectAggregate(fedsup.Task):
    def __init__(self, task_id: str, results: list[dict[str, Any]]) -> None:
        super().__init__(task_id)
        self.results = results

    def load(self) -> None:
        pass

    def train(self, device: str) -> dict[str, Any]:
        return average(self.results)
