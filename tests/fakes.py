"""A fake runtime for driving ``fedsup.engine.scheduler.Scheduler`` without a single process.

``FakeRuntime`` implements the ``fedsup.engine.runtime.Runtime`` protocol with a fake clock. Each fake child
follows a script (a ``Behaviour``) chosen by its task id and attempt number (the n-th spawn of that task
id is attempt n). A child handles its commands one after another, like the real worker: a command sent
while it is busy is handled when the current phase ends; a child that hangs never handles another one.

For each command the script says what the child does:

* ``ok(duration, result)``: after ``duration`` fake seconds, ``PhaseDone`` with a ``PhaseRecord``;
* ``fail(kind, ...)``: after ``duration``, ``PhaseFailed`` with an ``ErrorInfo`` of that kind;
* ``die(signal=..)`` / ``die(code=..)``: after ``duration``, the process ends (``Exited``) unannounced;
* ``hang()``: no reply ever (only a kill ends it).

``Exit`` is answered with ``Bye`` then ``Exited(child, ExitInfo(0, None))`` (unless ``Behaviour.exit`` says
otherwise). ``kill`` queues ``Exited`` with that signal at once (a script may ignore SIGTERM). Faults the
scheduler asks for in ``Load``/``Train`` are staged like the real worker stages them.

``wait`` returns the events due by now; when none are, it moves the clock on to the next scheduled
event, or by ``timeout`` if that comes first (then it returns nothing). A ``wait(timeout=None)`` with
nothing scheduled is a deadlock and raises ``Deadlock``.

Everything is recorded in ``log`` with the fake time: spawns, sends, kills, and the messages, exits and
signals as ``wait`` delivers them.
"""

from __future__ import annotations

import heapq
import itertools
import math
import signal
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

from fedsup.engine.launch import ExitInfo
from fedsup.engine.messages import Began, Bye, Exit, Load, PhaseDone, PhaseFailed, Train
from fedsup.engine.records import ErrorInfo, PhaseRecord
from fedsup.engine.runtime import Exited, Message, Signalled

GiB = 1024**3
MiB = 1024**2


class Deadlock(AssertionError):
    """The scheduler waited forever with nothing that could ever happen."""


# ---------------------------------------------------------------- scripts


@dataclass(frozen=True)
class Step:
    """What a child does in reply to one command."""

    action: str = "ok"                # "ok" | "fail" | "die" | "hang"
    duration: float = 1.0
    result: Any = None
    kind: str = "exception"           # ErrorInfo.kind for "fail"
    type: str = "RuntimeError"
    message: str = "scripted failure"
    signal: int | None = None         # for "die"
    code: int | None = None           # for "die"
    peak_memory: int | None = None


def ok(duration: float = 1.0, result: Any = None, peak_memory: int | None = None) -> Step:
    return Step("ok", duration, result=result, peak_memory=peak_memory)


_ERROR_TYPES = {"cuda_oom": "torch.OutOfMemoryError", "host_oom": "MemoryError", "exit": "SystemExit"}


def fail(kind: str = "exception", duration: float = 1.0, message: str | None = None, type: str | None = None) -> Step:
    return Step("fail", duration, kind=kind, type=type or _ERROR_TYPES.get(kind, "RuntimeError"),
                message=message or f"scripted {kind}")


def die(signal: int | None = None, code: int | None = None, duration: float = 1.0) -> Step:
    assert (signal is None) != (code is None), "die(): give a signal or an exit code"
    return Step("die", duration, signal=signal, code=code)


def hang() -> Step:
    return Step("hang", math.inf)


@dataclass(frozen=True)
class Behaviour:
    """One attempt's script: the reply to LOAD, to each TRAIN, and to EXIT; how it takes SIGTERM."""

    load: Step = ok(0.5)
    train: Step = ok(1.0)
    exit: Step = ok(0.0)               # "ok": Bye + exit code 0; "hang": ignores EXIT; "die": dies instead
    ignore_sigterm: bool = False


Script = Union[Behaviour, Sequence[Behaviour], Callable[[int], Behaviour]]  # noqa: UP007 - a runtime alias on 3.10


def _behaviour(script: Script, attempt: int) -> Behaviour:
    if isinstance(script, Behaviour):
        return script
    if callable(script):
        return script(attempt)
    seq = list(script)
    return seq[min(attempt, len(seq)) - 1]   # the last one repeats


# ---------------------------------------------------------------- children


class FakeChild:
    """What the scheduler sees of a task process; the runtime keeps the state."""

    def __init__(self, runtime: FakeRuntime, task_id: str, attempt: int, pid: int, spec: Any,
                 behaviour: Behaviour) -> None:
        self.runtime = runtime
        self.conn = None
        self.pid: int | None = pid
        self.exit: ExitInfo | None = None
        self.warm = True
        self.task_id = task_id
        self.attempt = attempt
        self.spec = spec
        self.behaviour = behaviour
        self.busy_until = 0.0          # commands are handled one at a time; inf once it hangs
        self.death: float | None = None  # when its Exited is due
        self.exited = False            # its Exited has been delivered
        self.training: Interval | None = None  # the TRAIN not yet answered (as delivered)

    def sentinel(self) -> None:
        return None

    def poll_exit(self) -> ExitInfo | None:
        return self.exit

    def kill(self, sig: int) -> None:
        """The Child protocol's own kill (the supervisor's last resort): the same as ``runtime.kill``."""
        self.runtime.kill(self, sig)

    def __repr__(self) -> str:
        return f"<FakeChild {self.task_id}#{self.attempt} pid={self.pid}>"


@dataclass(order=True)
class _Due:
    time: float
    seq: int
    event: Any = field(compare=False)
    child: FakeChild | None = field(compare=False, default=None)


@dataclass
class Interval:
    """From a TRAIN sent to its answer (or the process's exit) delivered: when the scheduler counts it."""

    device: str
    start: float
    child: FakeChild
    end: float = math.inf

    @property
    def cpus(self) -> int:
        return self.child.spec.cpus


def max_overlap(intervals: Iterable[tuple[float, float]]) -> int:
    """The most half-open intervals [start, end) that hold at one instant."""
    return max_weighted_overlap((start, end, 1) for start, end in intervals)


def max_weighted_overlap(intervals: Iterable[tuple[float, float, int]]) -> int:
    """The largest sum of weights of half-open intervals [start, end) that hold at one instant."""
    spans = list(intervals)
    # at equal times, ends (negative steps) come before starts: [0, 1) and [1, 2) never overlap
    points = sorted([(s, w) for s, _, w in spans] + [(e, -w) for _, e, w in spans])
    most = current = 0
    for _, step in points:
        current += step
        most = max(most, current)
    return most


@dataclass(frozen=True)
class Entry:
    """One line of the runtime's log."""

    time: float
    action: str                 # "spawn" | "send" | "kill" | "message" | "exited" | "signal"
    task_id: str | None = None
    attempt: int | None = None
    what: Any = None            # the command, the signal, the ExitInfo
    child: Any = None


class FakeRuntime:
    def __init__(self, scripts: dict[str, Script] | None = None,
                 default: Behaviour | Callable[[str, int], Behaviour] = Behaviour(),
                 max_waits: int = 100_000) -> None:
        self.scripts = dict(scripts or {})
        self.default = default
        self.clock = 0.0
        self.queue: list[_Due] = []
        self._seq = itertools.count()
        self._pids = itertools.count(1000)
        self.attempts: dict[str, int] = {}
        self.children: list[FakeChild] = []
        self.log: list[Entry] = []
        self.waits = 0
        self.max_waits = max_waits
        self.closed = False
        # maxima observed at each spawn / each TRAIN sent
        self.max_live = 0
        self.max_training = 0
        self.max_training_per_device: dict[str, int] = {}
        self.max_cpus_training = 0
        self.intervals: list[Interval] = []
        self.on_send: Callable[[Entry], None] | None = None   # a test's hook, called at every send

    # -- the Runtime protocol

    def now(self) -> float:
        return self.clock

    def spawn(self, spec: Any) -> FakeChild:
        task_id = spec.task_id
        attempt = self.attempts[task_id] = self.attempts.get(task_id, 0) + 1
        script = self.scripts.get(task_id)
        if script is not None:
            behaviour = _behaviour(script, attempt)
        elif isinstance(self.default, Behaviour):
            behaviour = self.default
        else:
            behaviour = self.default(task_id, attempt)
        child = FakeChild(self, task_id, attempt, next(self._pids), spec, behaviour)
        self.children.append(child)
        self.log.append(Entry(self.clock, "spawn", task_id, attempt, spec, child))
        self.max_live = max(self.max_live, len(self.live()))
        return child

    def can_spawn(self, one_off: bool) -> bool:
        return True

    def send(self, child: FakeChild, command: Any) -> bool:
        entry = Entry(self.clock, "send", child.task_id, child.attempt, command, child)
        self.log.append(entry)
        if self.on_send is not None:
            self.on_send(entry)
        if child.exited or (child.death is not None and child.death <= self.clock):
            return False  # the pipe is broken; its exit is on its way
        start = max(self.clock, child.busy_until)
        if math.isinf(start):
            return True   # hung: the command sits in the pipe forever
        b = child.behaviour
        if isinstance(command, Load):
            self._queue(start, Message(child, Began(child.pid)), child)  # as the worker does, before load()
            step = _fault_step(command.fault, "load") or b.load
            self._phase(child, "load", step, start, None)
        elif isinstance(command, Train):
            assert child.training is None, f"TRAIN sent to {child} while it trains"
            child.training = Interval(command.device, self.clock, child)
            self.intervals.append(child.training)
            training = [c for c in self.children if c.training is not None]
            on_device = [c for c in training if c.training.device == command.device]  # type: ignore[union-attr]
            self.max_training = max(self.max_training, len(training))
            self.max_training_per_device[command.device] = max(
                self.max_training_per_device.get(command.device, 0), len(on_device))
            self.max_cpus_training = max(self.max_cpus_training, sum(c.spec.cpus for c in training))
            step = _fault_step(command.fault, "train") or b.train
            self._phase(child, "train", step, start, command.device)
        elif isinstance(command, Exit):
            step = b.exit
            if step.action == "hang":
                child.busy_until = math.inf
            elif step.action == "die":
                self._die(child, start + step.duration, ExitInfo(step.code, step.signal))
            else:
                at = start + step.duration
                self._queue(at, Message(child, Bye()), child)
                self._die(child, at, ExitInfo(0, None))
        else:
            raise AssertionError(f"unexpected command {command!r}")
        return True

    def kill(self, child: FakeChild, sig: int) -> None:
        self.log.append(Entry(self.clock, "kill", child.task_id, child.attempt, sig, child))
        if child.exited or (child.death is not None and child.death <= self.clock):
            return
        if sig == signal.SIGTERM and child.behaviour.ignore_sigterm:
            return
        self._die(child, self.clock, ExitInfo(None, sig))

    def take_error(self) -> None:
        return None

    def wait(self, children: Iterable[FakeChild], timeout: float | None) -> list[Any]:
        self.waits += 1
        if self.waits > self.max_waits:
            raise AssertionError(f"the scheduler called wait() more than {self.max_waits} times: a busy loop?")
        children = list(children)
        assert all(not c.exited for c in children), "wait() on a child whose exit was already delivered"
        assert timeout is None or timeout >= 0, f"negative timeout {timeout}"
        if not self._due():
            nxt = self.queue[0].time if self.queue else None
            if nxt is None and timeout is None:
                raise Deadlock(f"wait(timeout=None) at t={self.clock} with nothing scheduled; live: {children}")
            if nxt is not None and (timeout is None or self.clock + timeout >= nxt):
                self.clock = max(self.clock, nxt)
            else:
                assert timeout is not None
                self.clock += timeout
                return []
        events = []
        while self._due():
            due = heapq.heappop(self.queue)
            event = due.event
            if isinstance(event, Exited):
                child = event.child
                child.exited = True
                child.exit = event.exit
                self._end_training(child)
                self.log.append(Entry(self.clock, "exited", child.task_id, child.attempt, event.exit, child))
            elif isinstance(event, Message):
                child = event.child
                if isinstance(event.message, (PhaseDone, PhaseFailed)) and event.message.phase == "train":
                    self._end_training(child)
                self.log.append(Entry(self.clock, "message", child.task_id, child.attempt, event.message, child))
            elif isinstance(event, Signalled):
                self.log.append(Entry(self.clock, "signal", what=event.signum))
            events.append(event)
        return events

    def close(self) -> None:
        self.closed = True

    # -- for tests

    def signal_at(self, time: float, signum: int = signal.SIGINT) -> None:
        """Deliver a Signalled event (as the real runtime's wake-up pipe would) at fake time ``time``."""
        self._queue(time, Signalled(signum), None)

    def live(self) -> list[FakeChild]:
        return [c for c in self.children if not c.exited]

    def entries(self, action: str, task_id: str | None = None) -> list[Entry]:
        return [e for e in self.log if e.action == action and (task_id is None or e.task_id == task_id)]

    def sends(self, kind: type, task_id: str | None = None) -> list[Entry]:
        return [e for e in self.entries("send", task_id) if isinstance(e.what, kind)]

    def spawn_times(self, task_id: str) -> list[float]:
        return [e.time for e in self.entries("spawn", task_id)]

    def kills(self, task_id: str | None = None) -> list[tuple[float, int]]:
        return [(e.time, e.what) for e in self.entries("kill", task_id)]

    def live_intervals(self) -> list[tuple[float, float]]:
        """[spawned, exit delivered) for every process."""
        spawned = {id(e.child): e.time for e in self.entries("spawn")}
        exited = {id(e.child): e.time for e in self.entries("exited")}
        return [(spawned[id(c)], exited.get(id(c), math.inf)) for c in self.children]

    # -- internals

    def _end_training(self, child: FakeChild) -> None:
        if child.training is not None:
            child.training.end = self.clock
            child.training = None

    def _due(self) -> bool:
        return bool(self.queue) and self.queue[0].time <= self.clock

    def _queue(self, time: float, event: Any, child: FakeChild | None) -> None:
        if child is not None and child.death is not None and time > child.death:
            return  # a dead process says nothing more
        heapq.heappush(self.queue, _Due(time, next(self._seq), event, child))

    def _die(self, child: FakeChild, time: float, info: ExitInfo) -> None:
        if child.death is not None and child.death <= time:
            return  # already dying earlier
        child.death = time
        child.busy_until = math.inf
        # Whatever it would have said later, and an exit scheduled later, never happen; what it said by
        # then is still read before its exit (as the real runtime drains a pipe before reporting the exit).
        self.queue = [d for d in self.queue if d.child is not child or d.time <= time]
        heapq.heapify(self.queue)
        self._queue(time, Exited(child, info), child)

    def _phase(self, child: FakeChild, phase: str, step: Step, start: float, device: str | None) -> None:
        end = start + step.duration
        if step.action == "hang":
            child.busy_until = math.inf
            return
        if step.action == "die":
            self._die(child, end, ExitInfo(step.code, step.signal))
            return
        child.busy_until = end
        record = PhaseRecord(phase=phase, device=device, started=start, duration=step.duration,
                             cpu_time=step.duration / 2, peak_memory=step.peak_memory)
        if step.action == "ok":
            message: Any = PhaseDone(phase, record, step.result)  # type: ignore[arg-type]
        elif step.action == "fail":
            error = ErrorInfo(kind=step.kind, type=step.type, message=step.message,  # type: ignore[arg-type]
                              phase=phase, device=device, traceback=f"Traceback: {step.type}: {step.message}")
            message = PhaseFailed(phase, record, error)  # type: ignore[arg-type]
        else:
            raise AssertionError(f"unknown step action {step.action!r}")
        self._queue(end, Message(child, message), child)


def _fault_step(fault: str | None, phase: str) -> Step | None:
    """The real worker's ``stage_fault``, scripted."""
    if fault is None:
        return None
    return {
        "exception": fail("exception", 0.0, f"fault injected by fedsup: exception in {phase}"),
        "exit": die(code=3, duration=0.0),
        "sigkill": die(signal=signal.SIGKILL, duration=0.0),
        "cuda_oom": fail("cuda_oom", 0.0, "CUDA out of memory (fault injected)"),
        "hang": hang(),
    }[fault]
