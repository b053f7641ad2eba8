"""The Task base class that users subclass."""

from __future__ import annotations

import abc
import uuid
from collections.abc import Sequence
from typing import Any

from fedsup.engine.states import TaskStatus
from fedsup.engine.units import parse_bytes


class Task(abc.ABC):
    """One unit of work, run in a process of its own.

    ``load()`` runs first, in the task's process, before it holds a device: read data, build the model.
    ``train(device)`` runs once a device is free: ``device`` is ``"cpu"`` or ``"cuda:0"``-style as seen
    inside the child (the child only sees the GPU it was given). It returns a dict of results, or None.

    In a federated run the process stays loaded across rounds: each round ``self.global_state`` holds the
    global model (a dict of tensors, the same for every client) and ``self.round`` the round number, and
    ``train`` returns ``{"state": model.state_dict(), "num_examples": n, **metrics}``. For a resumed run to
    end with the same model, ``train`` should depend only on the global state, the data and the seeded RNGs.

    The task object is pickled to its process, so it must be defined at module level and hold only
    picklable state before ``load()``; what ``load()`` builds stays in the child.
    """

    labels: tuple[str, ...] = ()  # for subclasses that set up without Task.__init__
    idempotent: bool | None = None

    def __init__(
        self,
        task_id: str | None = None,
        *,
        estimate_memory: int | str | None = None,
        estimate_cuda_memory: int | str | None = None,
        cpus: int = 1,
        device: str | None = None,
        labels: Sequence[str] = (),
        idempotent: bool | None = None,
    ) -> None:
        if task_id is not None and (not isinstance(task_id, str) or not task_id):
            raise ValueError(f"task_id: expected a non-empty string, got {task_id!r}")
        if not isinstance(cpus, int) or isinstance(cpus, bool) or cpus < 1:
            raise ValueError(f"cpus: expected a whole number >= 1, got {cpus!r}")
        if device is not None and not isinstance(device, str):
            raise ValueError(f"device: expected a device name such as 'cpu' or 'cuda:0', got {device!r}")
        if isinstance(labels, str) or not all(isinstance(x, str) and x for x in labels):
            raise ValueError(f"labels: expected a list of non-empty names such as ['download'], got {labels!r}")
        self.task_id: str = task_id or uuid.uuid4().hex
        self.estimate_memory: int = parse_bytes(estimate_memory, "estimate_memory")
        self.estimate_cuda_memory: int = parse_bytes(estimate_cuda_memory, "estimate_cuda_memory")
        self.cpus: int = cpus
        self.device: str | None = device
        # what the supervisor's ``limits`` cap: at most N tasks holding a label loaded or training at once
        self.labels: tuple[str, ...] = tuple(dict.fromkeys(labels))
        # may run twice at once with the same result (speculative copies of stragglers); None: the default,
        # true for federated clients (their jobs are seeded), false otherwise
        self.idempotent: bool | None = idempotent
        self.status: TaskStatus = TaskStatus.INIT
        # Set in the task's process before each train()/evaluate() of a federated run.
        self.global_state: dict[str, Any] | None = None
        self.round: int = 0

    @abc.abstractmethod
    def load(self) -> None:
        """Prepare in the task's own process: read data, build the model. No device is held yet."""

    @abc.abstractmethod
    def train(self, device: str) -> dict[str, Any] | None:
        """Do the work on ``device`` and return a dict of results (picklable), or None."""

    # -- federated runs: these are optional

    def initial_state(self) -> dict[str, Any] | None:
        """The first global model (a state_dict), built once before round 1 with torch seeded from the run seed.

        Without it, round 1's ``global_state`` is None and the first aggregate comes from the clients' models.
        """
        return None

    def evaluate(self, device: str) -> dict[str, Any] | None:
        """Evaluate ``self.global_state`` (the new global model) and return ``{"num_examples": n, **metrics}``."""
        return None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.task_id!r} {self.status}>"
