"""Messages over a task's pipe: commands down to the child, status up to the supervisor.

They stay small: a task object once, device names, records. Model state never travels here in bulk.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from fedsup.engine.records import ErrorInfo, Phase, PhaseRecord

#: A fault the supervisor asks the child to stage, for testing recovery.
Fault = Literal["exception", "exit", "sigkill", "cuda_oom", "hang"]


@dataclass(frozen=True)
class Load:
    task: Any
    fault: Fault | None = None
    setup: Any = None  # a ChildSpec when a process that finished another task takes this one


@dataclass(frozen=True)
class StateRef:
    """A model state saved at ``path`` (under /dev/shm where there is one) by ``tensorfile.write_state`` or
    ``torch.save``: read with ``tensorfile.read_state``, memory-mapped, so every reader shares one copy."""

    path: str


@dataclass(frozen=True)
class Train:
    device: str                  # the inventory's name, for records
    local_device: str            # what the child passes to train(): "cpu" or "cuda:0"
    cuda_visible: str | None     # CUDA_VISIBLE_DEVICES for the child, set before its first CUDA call
    fault: Fault | None = None
    method: Literal["train", "evaluate", "initial_state"] = "train"
    # Attributes set on the task before the call; a StateRef value is loaded first (the global model).
    context: dict[str, Any] = field(default_factory=dict)
    # Federated contract: the result must be {"state": ..., "num_examples": n, ...} ("train") or
    # {"num_examples": n, ...} ("evaluate"); the state goes to this file and a StateRef comes back.
    federated: bool = False
    state_path: str | None = None
    seed: int | None = None      # seeds torch, random and numpy before the call, for reproducible rounds
    cuda_limit: int | None = None  # enforce_memory on a GPU: bytes torch's allocator may hold in this process
    # Federated train: where the task's ``client_state`` (a dict of tensors it keeps across rounds) is saved
    # after the call, before the result is sent; an empty one removes the file.
    client_state_path: str | None = None


@dataclass(frozen=True)
class Exit:
    pass


Command = Load | Train | Exit


@dataclass(frozen=True)
class PhaseDone:
    phase: Phase
    record: PhaseRecord
    result: Any = None


@dataclass(frozen=True)
class PhaseFailed:
    phase: Phase
    record: PhaseRecord
    error: ErrorInfo


@dataclass(frozen=True)
class Began:
    """The child has its task and starts load(): the load deadline counts from here."""

    pid: int


@dataclass(frozen=True)
class Bye:
    """The child is about to exit on purpose; any other death is a crash."""


Status = Began | PhaseDone | PhaseFailed | Bye
