"""Starting task processes: a warm fork server by default, plain ``spawn`` on request.

Mechanism only; what to start and when is the scheduler's business.

The fork server is made by forking the supervisor's own process, which has imported torch already, at the
start of a run and before the supervisor starts any thread. It never touches CUDA. It imports the optimiser
machinery and runs one tiny training step on one thread (the first optimiser in a process costs ~2 s of
imports), then forks one child per task on request: a task then costs milliseconds, not the seconds of
``import torch``. Where forking the supervisor is not safe (other Python threads, CUDA initialised, or an
OpenMP pool that a multi-threaded child would inherit broken), the server is started with ``spawn`` instead
and imports torch and the tasks' modules itself.

```
 supervisor ──socket (SOCK_SEQPACKET)──► fork server ──fork──► task process ─┐
     ▲   requests + the child's pipe end (SCM_RIGHTS)   │ "started" pid         │ pipe: commands down,
     │◄──────────────────────────────────────────────── │ "exited" pid, status  │ status up
     └──────────────────────────────────────────────────────────────────────────┘
```
The server reaps its children and reports each exit status; the supervisor waits on that socket beside the
task pipes in one ``connection.wait``.
"""

from __future__ import annotations

import importlib
import logging
import multiprocessing as mp
import os
import pickle
import select
import signal
import socket
import threading
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, Protocol

import torch

from fedsup.worker import ChildSpec, child_main, die_with_parent

log = logging.getLogger(__name__)

# Threads this process had right after torch was imported: more later means something started threads
# (an OpenMP pool among them) that a forked child would inherit in a broken state.
_BASELINE_THREADS = len(os.listdir("/proc/self/task"))


def thread_count() -> int:
    return len(os.listdir("/proc/self/task"))


@dataclass
class ExitInfo:
    """How a process ended: an exit code, or the signal that killed it."""

    code: int | None
    signal: int | None
    cause: str | None = None  # what fedsup knows beyond the status, e.g. that the fork server died

    @classmethod
    def from_wait_status(cls, status: int) -> ExitInfo:
        if os.WIFSIGNALED(status):
            return cls(None, os.WTERMSIG(status))
        return cls(os.waitstatus_to_exitcode(status), None)

    @classmethod
    def from_exitcode(cls, code: int) -> ExitInfo:
        return cls(None, -code) if code < 0 else cls(code, None)

    def describe(self) -> str:
        if self.signal is not None:
            return f"killed by signal {self.signal} ({signal_name(self.signal)})"
        return f"exit code {self.code}"


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class Child(Protocol):
    """The parent's view of one task process."""

    conn: Connection
    pid: int | None
    exit: ExitInfo | None

    def sentinel(self) -> Any | None: ...

    def poll_exit(self) -> ExitInfo | None: ...

    def kill(self, sig: int) -> None: ...


def kill_group(pid: int, sig: int) -> None:
    """Signal the task's process group (its own helpers too), or the process where the group is gone."""
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def reap_group(pgid: int) -> None:
    """Kill what a finished task process left running in its group (helpers it started and did not stop).

    Only the group: the leader's pid is not signalled, since it may already belong to another process.
    """
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def warm_torch() -> None:
    """Pay torch's first-use costs once, in the server, on one thread so no OpenMP pool exists to inherit."""
    import torch.nn.functional as F  # noqa: N812
    import torch.utils.data  # noqa: F401

    torch.set_num_threads(1)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
    for opt in (torch.optim.SGD(model.parameters(), lr=0.1), torch.optim.Adam(model.parameters())):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


# ---------------------------------------------------------------- spawn


class SpawnChild:
    def __init__(self, process: Any, conn: Connection) -> None:
        self.process = process
        self.conn = conn
        self.pid: int | None = process.pid
        self.exit: ExitInfo | None = None

    def sentinel(self) -> Any:
        return self.process.sentinel

    def poll_exit(self) -> ExitInfo | None:
        if self.exit is None:
            self.process.join(0)
            if self.process.exitcode is not None:
                self.exit = ExitInfo.from_exitcode(self.process.exitcode)
                self.process.close()
        return self.exit

    def kill(self, sig: int) -> None:
        if self.exit is None and self.pid is not None:
            kill_group(self.pid, sig)


class SpawnLauncher:
    """One fresh interpreter per task: slow (each imports torch) but shares nothing with the parent."""

    name = "spawn"

    def __init__(self) -> None:
        self._ctx = mp.get_context("spawn")

    def start(self, preload: list[str]) -> None:
        pass

    def spawn(self, spec: ChildSpec) -> SpawnChild:
        parent_conn, child_conn = mp.Pipe(duplex=True)
        process = self._ctx.Process(target=child_main, args=(child_conn, spec), name=f"fedsup:{spec.task_id}")
        process.start()
        child_conn.close()
        return SpawnChild(process, parent_conn)

    def waitables(self) -> list[Any]:
        return []

    def pending_exits(self) -> list[tuple[SpawnChild, ExitInfo]]:
        return []

    def on_ready(self, obj: Any) -> list[tuple[SpawnChild, ExitInfo]]:
        return []

    def alive(self) -> bool:
        return True

    def close(self) -> None:
        pass


# ---------------------------------------------------------------- fork server


class ServerChild:
    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.pid: int | None = None
        self.exit: ExitInfo | None = None
        self.pending_signal: int | None = None

    def sentinel(self) -> None:
        return None  # the server reports the exit on its socket

    def poll_exit(self) -> ExitInfo | None:
        return self.exit

    def kill(self, sig: int) -> None:
        if self.exit is not None:
            return
        if self.pid is None:
            self.pending_signal = sig  # sent as soon as the server tells us the pid
        else:
            kill_group(self.pid, sig)


class ForkServerLauncher:
    name = "forkserver"

    def __init__(self, cpus_wanted: int = 1) -> None:
        self._cpus_wanted = cpus_wanted
        self._sock: socket.socket | None = None
        self._server_pid: int | None = None
        self._process: Any = None  # the multiprocessing.Process when started with spawn
        self._next_id = 0
        self._preload: list[str] = []
        self.restarts = 0
        self._lost: list[tuple[ServerChild, ExitInfo]] = []   # exits learnt outside on_ready
        self._starting: dict[int, ServerChild] = {}
        self._by_pid: dict[int, ServerChild] = {}
        self.forked = False

    # -- starting and stopping the server

    def fork_is_safe(self) -> str | None:
        """Why forking this process would be unsafe, or None when it is safe."""
        if threading.active_count() > 1:
            return f"{threading.active_count() - 1} other Python thread(s) are running"
        if torch.cuda.is_initialized():
            return "CUDA is initialised in this process"
        if self._cpus_wanted > 1 and thread_count() > _BASELINE_THREADS:
            return "native threads (an OpenMP pool, most likely) were started since torch was imported"
        return None

    def start(self, preload: list[str]) -> None:
        self._preload = preload
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        reason = self.fork_is_safe()
        parent = os.getpid()
        if reason is None:
            pid = os.fork()
            if pid == 0:
                ours.close()
                code = 1
                try:
                    server_main(theirs, [], parent)
                    code = 0
                finally:
                    os._exit(code)
            self._server_pid = pid
            self.forked = True
        else:
            log.info("starting the fork server with spawn: %s", reason)
            self._process = mp.get_context("spawn").Process(
                target=server_main, args=(theirs, ["torch", *preload], parent), name="fedsup-forkserver"
            )
            self._process.start()
            self._server_pid = self._process.pid
        theirs.close()
        self._sock = ours

    def alive(self) -> bool:
        return self._sock is not None

    def close(self) -> None:
        if self._sock is None:
            return
        try:
            self._sock.send(pickle.dumps(("stop",)))
        except OSError:
            pass
        self._reap_server()

    def _reap_server(self) -> None:
        """Close our end of the server's socket and wait for the server to be gone."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._process is not None:
            self._process.join()
            self._process.close()
            self._process = None
        elif self._server_pid is not None:
            os.waitpid(self._server_pid, 0)
        self._server_pid = None

    # -- children

    def spawn(self, spec: ChildSpec) -> ServerChild:
        if self._sock is None:  # it died (killed from outside): start another, the tasks go on
            self.restarts += 1
            log.warning("restarting the fork server (restart %d)", self.restarts)
            self.start(self._preload)
        assert self._sock is not None
        parent_conn, child_conn = mp.Pipe(duplex=True)
        self._next_id += 1
        request = pickle.dumps(("spawn", self._next_id, spec))
        try:
            socket.send_fds(self._sock, [request], [child_conn.fileno()])
        except OSError:  # the server died since the last wait: report its children, start another
            self._lost.extend(self._server_lost([]))
            child_conn.close()
            parent_conn.close()
            return self.spawn(spec)
        child_conn.close()
        child = ServerChild(parent_conn)
        self._starting[self._next_id] = child
        return child

    def waitables(self) -> list[Any]:
        return [self._sock] if self._sock is not None else []

    def pending_exits(self) -> list[tuple[ServerChild, ExitInfo]]:
        lost, self._lost = self._lost, []
        return lost

    def on_ready(self, obj: Any) -> list[tuple[ServerChild, ExitInfo]]:
        """Read the server's reports; return the children that exited, with how."""
        exited: list[tuple[ServerChild, ExitInfo]] = []
        if self._sock is None or obj is not self._sock:
            return exited
        while True:
            try:
                data = self._sock.recv(4096, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return exited
            except OSError:
                data = b""
            if not data:
                return self._server_lost(exited)
            message = pickle.loads(data)
            if message[0] == "started":
                child = self._starting.pop(message[1])
                child.pid = message[2]
                self._by_pid[child.pid] = child
                if child.pending_signal is not None:
                    kill_group(child.pid, child.pending_signal)
            elif message[0] == "exited":
                child = self._by_pid.pop(message[1])
                child.exit = ExitInfo.from_wait_status(message[2])
                exited.append((child, child.exit))

    def _server_lost(self, exited: list[tuple[ServerChild, ExitInfo]]) -> list[tuple[ServerChild, ExitInfo]]:
        """The server died: its children died with it (PDEATHSIG). Report them all as killed."""
        log.error("the fork server died; its task processes died with it")
        lost = ExitInfo(None, signal.SIGKILL, cause="the fork server died, and its task processes with it")
        for child in [*self._starting.values(), *self._by_pid.values()]:
            child.exit = lost
            exited.append((child, lost))
        self._starting.clear()
        self._by_pid.clear()
        self._reap_server()
        return exited


def server_main(sock: socket.socket, preload: list[str], supervisor_pid: int) -> None:
    """The fork server's loop: fork children on request, reap them, report their exits."""
    die_with_parent(supervisor_pid)
    os.setpgid(0, 0)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    for module in preload:
        importlib.import_module(module)
    warm_torch()
    me = os.getpid()
    while True:
        ready, _, _ = select.select([sock.fileno(), wake_r], [], [])
        if wake_r in ready:
            os.read(wake_r, 4096)
            _reap(sock)
        if sock.fileno() in ready:
            data, fds, _, _ = socket.recv_fds(sock, 1 << 16, 4)
            if not data:
                return  # the supervisor is gone
            request = pickle.loads(data)
            if request[0] == "stop":
                return
            _, request_id, spec = request
            pid = os.fork()
            if pid == 0:
                _become_child(sock, wake_r, wake_w, fds[0], spec, me)
            os.close(fds[0])
            try:
                os.setpgid(pid, pid)  # also done by the child: whichever runs first wins the race
            except OSError:
                pass
            sock.send(pickle.dumps(("started", request_id, pid)))


def _reap(sock: socket.socket) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        sock.send(pickle.dumps(("exited", pid, status)))


def _become_child(sock: socket.socket, wake_r: int, wake_w: int, fd: int, spec: ChildSpec, server: int) -> None:
    code = 1
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        sock.close()
        os.close(wake_r)
        os.close(wake_w)
        spec = ChildSpec(**{**spec.__dict__, "parent_pid": server})
        child_main(Connection(fd), spec)
        code = 0
    except BaseException:  # noqa: BLE001 - never fall back into the server's loop
        import traceback

        traceback.print_exc()
    finally:
        os._exit(code)


def make_launcher(start_method: str, cpus_wanted: int) -> SpawnLauncher | ForkServerLauncher:
    if start_method == "spawn":
        return SpawnLauncher()
    if start_method == "forkserver":
        return ForkServerLauncher(cpus_wanted)
    raise ValueError(f"start_method: expected 'forkserver' or 'spawn', got {start_method!r}")
