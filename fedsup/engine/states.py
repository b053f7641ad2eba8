"""Task lifecycle states and the edges allowed between them. Standard library only.

```
            spawn              LOAD ok                placed: TRAIN            result
  INIT ─────────► AVAILABLE ──► LOADING ──────► WAITING ──────────► TRAINING ───────► FINISHED
   │ ▲                │            │             ▲  │                  │
   │ │                │            │             │  └── EXIT ─► EXITED │   (evicted before training:
   │ │                └─── EXIT ───┼─────────────┼─────────► EXITED    │    queued again)
   │ └───── adopt a loaded process (federated rounds) ───────────────┘│
   │                               │                                   │
   │        LOADING/TRAINING raise ─► EXCEPTION      out of memory ─► INTERRUPT
   │        any live state dies unannounced ─► CRASHED      past its deadline ─► TIMEOUT
   └──── requeue ◄── EXCEPTION | INTERRUPT | CRASHED | TIMEOUT | EXITED
         budget spent ─► FAILED             shutdown before the end ─► CANCELLED
```

INIT ─► WAITING: in a federated run a client's process stays loaded between rounds, and the next round's
task adopts it instead of starting and loading a new one. FINISHED ─► TRAINING and FINISHED ─► EXITED are
allowed for a task that keeps its own process across several TRAINs.

FINISHED, FAILED and CANCELLED are the outcomes a record can end with. FINISHED is not final in a
federated run: the same loaded process trains again in the next round.
"""

from __future__ import annotations

from enum import Enum


class TaskStatus(str, Enum):
    INIT = "INIT"              # queued; no process yet
    AVAILABLE = "AVAILABLE"    # process started, nothing loaded
    LOADING = "LOADING"        # load() running in the child
    WAITING = "WAITING"        # loaded; waiting for a device and a training slot
    TRAINING = "TRAINING"      # train(device) running in the child
    FINISHED = "FINISHED"      # train() returned a result
    EXITED = "EXITED"          # process ended cleanly on EXIT before the task was done
    EXCEPTION = "EXCEPTION"    # load() or train() raised
    INTERRUPT = "INTERRUPT"    # out of memory (GPU or host): retried with a larger estimate or after a pause
    CRASHED = "CRASHED"        # the process died without announcing it
    TIMEOUT = "TIMEOUT"        # a phase ran past its deadline and was killed
    FAILED = "FAILED"          # retries spent; the last error is the root cause
    CANCELLED = "CANCELLED"    # the run stopped before this task was done

    def __str__(self) -> str:
        return self.value


S = TaskStatus

#: Statuses in which the task has a live process.
LIVE = frozenset({S.AVAILABLE, S.LOADING, S.WAITING, S.TRAINING})
#: Statuses of an attempt that went wrong and may be retried.
ATTEMPT_FAILED = frozenset({S.EXCEPTION, S.INTERRUPT, S.CRASHED, S.TIMEOUT})
#: Outcomes a record ends with.
OUTCOMES = frozenset({S.FINISHED, S.FAILED, S.CANCELLED})

_ALLOWED: dict[TaskStatus, frozenset[TaskStatus]] = {
    # queued: a process is started, or a loaded process of the same client is adopted (federated rounds),
    # or the task is given up before it ever ran
    S.INIT: frozenset({S.AVAILABLE, S.WAITING, S.FAILED, S.CANCELLED}),
    # the fresh process gets LOAD, or is told to EXIT, or dies on the way up
    S.AVAILABLE: frozenset({S.LOADING, S.EXITED, S.CRASHED, S.TIMEOUT, S.CANCELLED}),
    S.LOADING: frozenset({S.WAITING, S.EXCEPTION, S.INTERRUPT, S.CRASHED, S.TIMEOUT, S.CANCELLED}),
    # loaded: trained once placed, or evicted to make room
    S.WAITING: frozenset({S.TRAINING, S.EXITED, S.CRASHED, S.CANCELLED}),
    S.TRAINING: frozenset({S.FINISHED, S.EXCEPTION, S.INTERRUPT, S.CRASHED, S.TIMEOUT, S.CANCELLED}),
    # a finished federated client trains again next round, or is evicted; a crash after the result is noted
    S.FINISHED: frozenset({S.TRAINING, S.EXITED, S.CRASHED}),
    # an evicted client is queued to load again
    S.EXITED: frozenset({S.INIT, S.CANCELLED}),
    S.EXCEPTION: frozenset({S.INIT, S.FAILED, S.CANCELLED}),
    S.INTERRUPT: frozenset({S.INIT, S.FAILED, S.CANCELLED}),
    S.CRASHED: frozenset({S.INIT, S.FAILED, S.CANCELLED}),
    S.TIMEOUT: frozenset({S.INIT, S.FAILED, S.CANCELLED}),
    S.FAILED: frozenset(),
    S.CANCELLED: frozenset(),
}


class IllegalTransition(RuntimeError):
    """A state change the diagram does not allow: always a bug in fedsup, never the user's fault."""


def check_transition(old: TaskStatus, new: TaskStatus) -> None:
    """Raise IllegalTransition unless ``old -> new`` is an edge of the diagram."""
    if new not in _ALLOWED[old]:
        raise IllegalTransition(f"{old} -> {new} is not an allowed transition")


def allowed(old: TaskStatus) -> frozenset[TaskStatus]:
    return _ALLOWED[old]
