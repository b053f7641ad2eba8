"""What a run records: one TaskRecord per task, an AttemptRecord per attempt, a PhaseRecord per phase.

A run is the root, each attempt of a task a subtask, load and train its phases. The records are pydantic
models so that they round-trip through JSON in the run directory.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, field_serializer, field_validator

from fedsup.engine.states import TaskStatus

Phase = Literal["load", "train", "evaluate", "initial_state"]

#: How an attempt went wrong, by cause. Decides which retry budget it spends.
ErrorKind = Literal[
    "exception",    # load() or train() raised
    "cuda_oom",     # CUDA out-of-memory (torch.cuda.OutOfMemoryError, cuBLAS/cudaMalloc failures)
    "host_oom",     # MemoryError, or a SIGKILL fedsup did not send (the kernel's OOM killer, most likely)
    "exit",         # the task called sys.exit()/exit()
    "unpicklable",  # a result or an error could not be sent back
    "crash",        # the process died without announcing it (exit code, segfault, signal)
    "timeout",      # a phase ran past its deadline and fedsup killed it
    "placement",    # the task can never fit on any device
    "contract",     # train() or evaluate() returned something the run cannot use: a bug, never retried
    "cancelled",    # the run stopped first
    "node_lost",    # the cluster node running it went away (Ray backend): its own budget, not max_retries
    "superseded",   # a straggler's race with its speculative copy: this one lost and was ended
]


class _Record(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=False)


class ErrorInfo(_Record):
    """Why an attempt did not succeed, with the facts to act on."""

    kind: ErrorKind
    type: str
    message: str
    traceback: str | None = None
    phase: Phase | None = None
    exit_code: int | None = None
    signal: str | None = None
    device: str | None = None
    estimate_cuda_memory: int | None = None
    stderr_tail: list[str] | None = None

    @field_validator("kind", mode="before")
    @classmethod
    def _renamed_kind(cls, kind: object) -> object:
        # Records written before the kind was renamed still read (and resume) as they were meant.
        return "contract" if kind == "bad_result" else kind

    def summary(self) -> str:
        return f"{self.type}: {self.message}"


class SpanRecord(_Record):
    """A measured span inside a phase (``fedsup.span``), with the spans opened inside it."""

    name: str
    data: dict[str, Any] = {}
    started: float                 # seconds since the epoch
    duration: float                # wall seconds
    cpu_time: float                # user + system CPU seconds of the task's process
    peak_memory: int | None = None  # bytes: VmHWM over the span
    peak_gpu_memory: int | None = None  # bytes: torch.cuda.max_memory_allocated over the span, where CUDA was used
    failed: bool = False           # left by an exception
    error: str | None = None       # that exception, "Type: message"
    children: list[SpanRecord] = []


class PhaseRecord(_Record):
    """One phase of one attempt, measured in the child."""

    phase: Phase
    device: str | None = None
    started: float                 # seconds since the epoch
    duration: float                # wall seconds
    cpu_time: float                # user + system CPU seconds of the task's process
    peak_memory: int | None = None  # bytes: VmHWM, reset at the start of the phase
    peak_gpu_memory: int | None = None  # bytes: torch.cuda.max_memory_reserved, where CUDA was used
    spans: list[SpanRecord] = []   # the phase's top-level spans (fedsup.span)


class AttemptRecord(_Record):
    """One process's go at a task."""

    attempt: int
    pid: int | None = None
    device: str | None = None
    node: str | None = None            # the cluster node it ran on (Ray backend); None on one machine
    status: TaskStatus
    started: float
    ended: float | None = None
    load: PhaseRecord | None = None
    train: PhaseRecord | None = None
    evaluate: PhaseRecord | None = None
    initial_state: PhaseRecord | None = None
    error: ErrorInfo | None = None


def superseded(history: list[AttemptRecord]) -> int:
    """The attempts that lost a straggler's race with its speculative copy: not retries, though they count
    among a task's attempts (the loser is kept in the history with the error kind ``superseded``)."""
    return sum(1 for a in history if a.error is not None and a.error.kind == "superseded")


def to_jsonable(value: Any) -> Any:
    """Results are user data: keep what JSON can hold, describe the rest (tensors by shape and dtype)."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    shape = getattr(value, "shape", None)
    if shape is not None and hasattr(value, "dtype"):
        if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):
            return to_jsonable(value.item())
        return f"<{type(value).__name__} shape={list(shape)} dtype={value.dtype}>"
    return repr(value)


class TaskRecord(_Record):
    """Everything known about a task at the end of a run.

    ``duration`` runs from the first attempt's start to the last one's end; ``cpu_time`` sums every phase of
    every attempt (what the task cost); the peaks are the largest of any phase. ``load`` and ``train`` are the
    phases of the last attempt; ``history`` holds every attempt.
    """

    task_id: str
    status: TaskStatus
    attempts: int = 0
    device: str | None = None
    node: str | None = None            # the cluster node of the last attempt (Ray backend)
    result: Any = None
    error: ErrorInfo | None = None
    reason: str | None = None          # why it ended FAILED or CANCELLED, beyond the last error
    duration: float | None = None
    cpu_time: float = 0.0
    peak_memory: int | None = None
    peak_gpu_memory: int | None = None
    estimate_memory: int = 0
    estimate_cuda_memory: int = 0
    load: PhaseRecord | None = None
    train: PhaseRecord | None = None
    evaluate: PhaseRecord | None = None
    history: list[AttemptRecord] = []

    @property
    def spans(self) -> list[SpanRecord]:
        """The last attempt's top-level spans, phase by phase (load, train, evaluate)."""
        return [s for p in (self.load, self.train, self.evaluate) if p is not None for s in p.spans]

    @field_serializer("result")
    def _serialize_result(self, value: Any) -> Any:
        return to_jsonable(value)

    @property
    def ok(self) -> bool:
        return self.status is TaskStatus.FINISHED

    @property
    def retried(self) -> bool:
        """Whether an attempt went wrong and the task ran again (see ``superseded``)."""
        return self.attempts - superseded(self.history) > 1

    def raise_for_status(self) -> None:
        """Raise TaskFailed (with the child's traceback as its cause) unless the task finished."""
        if not self.ok:
            from fedsup.engine.errors import TaskFailed

            raise TaskFailed(self)
