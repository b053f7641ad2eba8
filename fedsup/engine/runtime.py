"""The scheduler's window on real processes: start, command, kill, and one wait over everything.

``ProcessRuntime.wait`` is the only place the supervisor blocks: one ``multiprocessing.connection.wait``
over every task pipe, every process sentinel (or the fork server's socket, which reports exits), and a
wake-up pipe that signal handlers write to. No sleep-polling. Tests swap this class for a fake.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterable
from dataclasses import dataclass
from multiprocessing.connection import wait
from multiprocessing.reduction import ForkingPickler
from typing import Any, Protocol

from fedsup.engine.errors import FedsupError
from fedsup.engine.launch import Child, ExitInfo, ForkServerLauncher, SpawnLauncher, reap_group
from fedsup.engine.messages import Command
from fedsup.engine.worker import ChildSpec


class CommandNotPicklable(Exception):
    """A command (in practice: a task object) cannot be pickled to its process."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.cause = cause


@dataclass(frozen=True)
class Message:
    child: Any
    message: Any


@dataclass(frozen=True)
class Exited:
    child: Any
    exit: ExitInfo


@dataclass(frozen=True)
class Signalled:
    signum: int


Event = Message | Exited | Signalled


class Runtime(Protocol):
    def now(self) -> float: ...

    def spawn(self, spec: ChildSpec) -> Child: ...

    def can_spawn(self, one_off: bool) -> bool:
        """Whether a process would start now (not wait for a fork server still warming up)."""
        ...

    def send(self, child: Child, command: Command) -> bool: ...

    def kill(self, child: Child, sig: int) -> None: ...

    def wait(self, children: Iterable[Child], timeout: float | None) -> list[Event]: ...

    def take_error(self) -> FedsupError | None:
        """An error that ends the run, learnt while starting or reaping processes, once (then None)."""
        ...

    def close(self) -> None: ...


class ProcessRuntime:
    def __init__(self, launcher: ForkServerLauncher | SpawnLauncher) -> None:
        self.launcher = launcher
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)
        self._closed: set[int] = set()   # ids of children whose pipe reached EOF

    def now(self) -> float:
        return time.monotonic()

    def wake(self, signum: int) -> None:
        """Safe to call from a signal handler: one byte into the wake-up pipe."""
        try:
            os.write(self.wake_w, bytes([signum & 0xFF]))
        except OSError:
            pass

    def nudge(self) -> None:
        """From another thread: end the loop's wait with no event (new work was handed in)."""
        self.wake(0)

    def spawn(self, spec: ChildSpec) -> Child:
        return self.launcher.spawn(spec)

    def can_spawn(self, one_off: bool) -> bool:
        return self.launcher.can_spawn(one_off)

    def send(self, child: Child, command: Command) -> bool:
        """False when the child is gone (its exit is on its way); CommandNotPicklable for a bad payload."""
        try:
            data = ForkingPickler.dumps(command)
        except Exception as exc:  # noqa: BLE001 - pickle raises many types for the same problem
            raise CommandNotPicklable(exc) from exc
        try:
            child.conn.send_bytes(data)
            return True
        except OSError:
            return False

    def kill(self, child: Child, sig: int) -> None:
        child.kill(sig)
        if sig == signal.SIGKILL:
            self.launcher.expect_exit(child)  # its fork server owes us the exit status now

    def take_error(self) -> FedsupError | None:
        error, self.launcher.error = self.launcher.error, None
        return error

    def wait(self, children: Iterable[Child], timeout: float | None) -> list[Event]:
        events: list[Event] = []
        # first: these exits close their children's pipes, which must then not be waited on
        for lost, info in self.launcher.pending_exits():
            events.extend(self._finish(lost, info))
        owners: dict[Any, Child] = {}
        for child in children:
            if id(child) not in self._closed and not child.conn.closed:
                owners[child.conn] = child
            sentinel = child.sentinel()
            if sentinel is not None and child.exit is None:
                owners[sentinel] = child
        server = self.launcher.waitables()
        due = self.launcher.next_deadline()  # a fork server's answer: one missed means it is killed
        if due is not None:
            left = max(0.0, due - self.now())
            timeout = left if timeout is None else min(timeout, left)
        ready = wait([*owners, *server, self.wake_r], 0 if events else timeout)
        for obj in ready:
            if obj == self.wake_r:
                events.extend(Signalled(b) for b in os.read(self.wake_r, 64) if b)  # 0: a nudge
            elif obj in server:
                for child, info in self.launcher.on_ready(obj):
                    events.extend(self._finish(child, info))
            elif obj is owners[obj].conn:
                events.extend(self._drain(owners[obj]))
            else:
                child = owners[obj]
                ended = child.poll_exit()
                if ended is not None:
                    events.extend(self._finish(child, ended))
        for child, info in self.launcher.check_deadlines(self.now()):
            events.extend(self._finish(child, info))
        return events

    def _drain(self, child: Child) -> list[Event]:
        """Every complete message waiting on the child's pipe; EOF marks the pipe closed."""
        events: list[Event] = []
        if id(child) in self._closed or child.conn.closed:
            return events
        try:
            while child.conn.poll():
                events.append(Message(child, child.conn.recv()))
        except (EOFError, OSError):
            self._closed.add(id(child))
            self.launcher.expect_exit(child)  # the process is ending: its fork server owes us its exit status
        except Exception as exc:  # noqa: BLE001 - a torn or undecodable message from a dying child
            events.append(Message(child, exc))
            self._closed.add(id(child))
            self.launcher.expect_exit(child)
        return events

    def _finish(self, child: Child, info: ExitInfo) -> list[Event]:
        events = self._drain(child)
        self._closed.discard(id(child))
        child.conn.close()
        if child.pid is not None:
            reap_group(child.pid)
        self.launcher.release(child)  # what it left in its cgroup, wherever it was reparented
        events.append(Exited(child, info))
        return events

    def close(self) -> None:
        self.launcher.close()
        fds, self.wake_r, self.wake_w = (self.wake_r, self.wake_w), -1, -1  # a late nudge writes nowhere
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass
