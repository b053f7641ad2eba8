"""The parent side of one task: its status, its attempts, its current process.

This is the one place a task's status changes: ``TaskHandle.transition`` checks the edge against the
diagram in ``states.py`` and tells the listener (the run directory's event log, the live view).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from fedsup.engine.launch import Child
from fedsup.engine.records import AttemptRecord, ErrorInfo, Phase, PhaseRecord, TaskRecord
from fedsup.engine.states import LIVE, TaskStatus, check_transition
from fedsup.engine.task import Task

Listener = Callable[["TaskHandle", TaskStatus, TaskStatus, dict[str, Any]], None]


class TaskHandle:
    """One unit of work: a task's ``train`` (or ``evaluate``), with its attempts.

    In a one-shot run there is one handle per task. In a federated run there is one per client and round;
    ``key`` (the task's own id) names the client, whose loaded process the next round's handle may adopt.
    """

    def __init__(self, task: Task, index: int, listener: Listener | None = None, *, task_id: str | None = None,
                 method: str = "train", context: dict[str, Any] | None = None, state_path: str | None = None,
                 seed: int | None = None, federated: bool = False, one_off: bool = False,
                 client_state_path: str | None = None, run_dir: Any = None, namespace: str = "") -> None:
        self.task = task
        self.index = index
        self.id = task_id or task.task_id
        self.namespace = namespace  # a sweep's run: its ids, parked processes and ledger slots are its own
        self.run_dir = run_dir      # that run's RunDir, where the scheduler's own is not the one
        self.key = f"{namespace}/{task.task_id}" if namespace else task.task_id
        self.method = method
        self.context = context or {}
        self.state_path = state_path
        self.client_state_path = client_state_path
        self.seed = seed
        self.federated = federated
        self.one_off = one_off
        self.status = TaskStatus.INIT
        self.listener = listener
        self.estimate_cuda = task.estimate_cuda_memory
        self.estimate_host = task.estimate_memory
        self.failures = 0           # spent from max_retries: exceptions, crashes, timeouts
        self.interrupts = 0         # spent from max_interrupts: out of memory, host or GPU
        self.faults_injected = 0
        self.not_before = 0.0       # back-off: not started again before this (runtime clock)
        self.child: Child | None = None
        self.device: Any = None     # the Device it is placed on while training
        self.resident: str | None = None   # the GPU its live process has a CUDA context on
        self.phase: Phase | None = None
        self.deadline: float | None = None
        self.kill_reason: str | None = None
        self.timed_out: Phase | None = None  # the phase whose deadline passed
        self.reason: str | None = None        # why the task ended FAILED or CANCELLED
        self.stderr_offset = 0
        self.history: list[AttemptRecord] = []
        self._current: AttemptRecord | None = None
        self.numbered = 0           # attempt numbers given out, a speculative copy's included
        # speculative execution: a straggler's copy (its ``primary`` is the original handle), and the
        # original's ``rival`` while both run; the copy works in a folder of its own
        self.primary: TaskHandle | None = None
        self.rival: TaskHandle | None = None
        self.folder = task.task_id
        self.batch = 0              # the submit() it came in: a federated round, or a whole plain run
        self.train_began: float | None = None   # runtime clock, when TRAIN was sent
        self.idempotent = bool(task.idempotent) if task.idempotent is not None else federated
        self.speculated = False     # a copy was started for it once: never a second
        self.result: Any = None
        self.error: ErrorInfo | None = None
        self.started: float | None = None
        self.ended: float | None = None

    @property
    def task_id(self) -> str:
        return self.id

    @property
    def slot(self) -> str:
        """Its name in the device ledger: a speculative copy holds a reservation beside its original's."""
        name = f"{self.namespace}/{self.id}" if self.namespace else self.id
        return name if self.primary is None else f"{name}~copy"

    @property
    def attempt(self) -> AttemptRecord | None:
        """The attempt under way, or the last one (a speculative copy's attempts are in ``history`` too)."""
        return self._current

    @property
    def live(self) -> bool:
        return self.status in LIVE

    def transition(self, new: TaskStatus, **info: Any) -> None:
        old = self.status
        check_transition(old, new)
        self.status = new
        if self.primary is None:  # a speculative copy's steps are not the task's
            self.task.status = new
        if self.listener is not None:
            self.listener(self, old, new, info)

    # -- attempts

    def begin_attempt(self, pid: int | None = None) -> AttemptRecord:
        now = time.time()
        if self.started is None:
            self.started = now
        self.numbered += 1
        record = AttemptRecord(attempt=self.numbered, pid=pid, status=TaskStatus.AVAILABLE, started=now)
        self.history.append(record)
        self._current = record
        return record

    def spawn_copy(self, listener: Listener) -> TaskHandle:
        """A speculative copy of this training straggler: the same job, under the next attempt number."""
        copy = TaskHandle(self.task, self.index, listener, task_id=self.id, method=self.method,
                          context=self.context, state_path=self.state_path, seed=self.seed,
                          federated=self.federated, client_state_path=self.client_state_path,
                          run_dir=self.run_dir, namespace=self.namespace)
        copy.primary, self.rival = self, copy
        self.speculated = True
        copy.numbered = self.numbered
        self.numbered += 1
        copy.folder = f"{self.folder}.speculative"
        copy.batch = self.batch
        copy.estimate_cuda, copy.estimate_host = self.estimate_cuda, self.estimate_host
        return copy

    def take_attempt(self, record: AttemptRecord, current: bool = False) -> None:
        """Add a copy's attempt to this task's history, in attempt order; ``current``: it is the one that won."""
        self.history.append(record)
        self.history.sort(key=lambda a: a.attempt)
        if current:
            self._current = record

    def note_phase(self, record: PhaseRecord) -> None:
        attempt = self.attempt
        assert attempt is not None
        setattr(attempt, record.phase, record)
        if record.device is not None:
            attempt.device = record.device

    def end_attempt(self, status: TaskStatus, error: ErrorInfo | None = None) -> None:
        attempt = self.attempt
        if attempt is None or attempt.ended is not None:
            return
        attempt.status = status
        attempt.error = error
        attempt.ended = time.time()
        self.ended = attempt.ended

    def to_record(self) -> TaskRecord:
        phases = [p for a in self.history for p in (a.load, a.train, a.evaluate, a.initial_state) if p is not None]
        last = self.attempt  # for a finished task, the attempt that finished (a speculative copy may have lost)
        peaks = [p.peak_memory for p in phases if p.peak_memory is not None]
        gpu_peaks = [p.peak_gpu_memory for p in phases if p.peak_gpu_memory is not None]
        return TaskRecord(
            task_id=self.task_id,
            status=self.status,
            attempts=len(self.history),
            device=last.device if last else None,
            result=self.result,
            error=self.error,
            reason=self.reason,
            duration=(self.ended - self.started) if (self.started and self.ended) else None,
            cpu_time=sum(p.cpu_time for p in phases),
            peak_memory=max(peaks, default=None),
            peak_gpu_memory=max(gpu_peaks, default=None),
            estimate_memory=self.estimate_host,
            estimate_cuda_memory=self.estimate_cuda,
            load=last.load if last else None,
            train=last.train if last else None,
            evaluate=last.evaluate if last else None,
            history=[a.model_copy() for a in self.history],
        )
