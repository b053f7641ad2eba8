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

import gc
import importlib
import logging
import multiprocessing as mp
import os
import pickle
import select
import signal
import socket
import sys
import threading
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any, Protocol

import torch

from fedsup.engine.devices import cpu_cores
from fedsup.engine.forking import prepare_to_fork
from fedsup.engine.worker import ChildSpec, child_main, die_with_parent, find_threadpools

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
    warm: bool  # started with torch's first-use costs paid (a warm server's child): its first task shows them not

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
    """Pay torch's first-use costs once, in the server, so that no task process pays them again.

    On one thread, so that no OpenMP pool exists for a child to inherit. Each step is a cost measured in a
    fresh child: the first optimiser imports ``torch._dynamo`` (~2 s); the first ``torch.manual_seed`` reads
    source files for the stack trace CUDA's lazy seeding keeps (~5 ms); the first ``torch.load`` of a
    memory-mapped state and the first ``torch.save`` set up their machinery (~4 ms and ~2 ms); numpy's first
    generator ~4 ms.
    """
    import tempfile

    import torch.nn.functional as F  # noqa: N812
    import torch.utils.data  # noqa: F401

    torch.set_num_threads(1)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
    for opt in (torch.optim.SGD(model.parameters(), lr=0.1), torch.optim.Adam(model.parameters())):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    torch.manual_seed(0)
    folder = "/dev/shm" if os.path.isdir("/dev/shm") else None
    with tempfile.NamedTemporaryFile(dir=folder, prefix="fedsup-warm-", suffix=".pt") as f:
        torch.save(model.state_dict(), f)
        f.flush()
        torch.load(f.name, mmap=True, weights_only=True)
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        numpy.random.default_rng(0).standard_normal(8).astype(numpy.float32)


# ---------------------------------------------------------------- spawn


class SpawnChild:
    def __init__(self, process: Any, conn: Connection) -> None:
        self.process = process
        self.conn = conn
        self.pid: int | None = process.pid
        self.exit: ExitInfo | None = None
        self.warm = False

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

    def can_spawn(self, one_off: bool) -> bool:
        return True

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
    def __init__(self, conn: Connection, warm: bool) -> None:
        self.conn = conn
        self.pid: int | None = None
        self.exit: ExitInfo | None = None
        self.warm = warm
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


@dataclass(eq=False)
class _Server:
    """One fork server as the supervisor sees it: its socket, its process, the children it holds."""

    sock: socket.socket
    pid: int
    warm: bool                    # warms torch before it forks; the other kind serves at once, cold
    process: Any = None           # the multiprocessing.Process when started with spawn
    ready: bool = False           # warm and forking (a cold server is ready from the start)
    retiring: bool = False        # told to exit once its last child has
    asked: int = 0                # children requested from it, ever (one-off jobs aside)
    starting: dict[int, ServerChild] = field(default_factory=dict)
    by_pid: dict[int, ServerChild] = field(default_factory=dict)

    def holds(self) -> int:
        return len(self.starting) + len(self.by_pid)


class ForkServerLauncher:
    """Two generations of fork server, so that the first task starts at once and later ones start warm.

    Warming a server costs ~1 s of CPU (``warm_up``), during which it forks nothing. So at the start of a run
    a cold server (torch imported, nothing else) and a warm one are forked side by side: the cold one takes
    the first tasks (one per core where processes are reused, else one fewer than the cores) while the other
    warms at the lowest priority; a one-off job that trains nothing (a federated run's initial model) may go
    there too without counting. Those first tasks pay torch's first-use costs themselves, as a pool's workers
    do; later ones wait for the warm server rather than pay them again (``can_spawn`` says when a child
    would only wait, so that the scheduler may hand the task to a process that frees up first). Once the
    warm server reports ready, every new task goes to it, and the cold one exits when its last task process
    has (its children die with it: PR_SET_PDEATHSIG). A server still warming when the run ends holds no
    child, and is killed rather than waited for.
    """

    name = "forkserver"

    def __init__(self, cpus_wanted: int = 1, reuse: bool = False) -> None:
        self._cpus_wanted = cpus_wanted
        # Where processes are reused, the first ones serve many tasks, so one per core starts cold, as a
        # pool's workers do, and the warm-up takes what CPU they leave; otherwise one core is left to it.
        self._cold_limit = cpu_cores() if reuse else max(1, cpu_cores() - 1)
        self._warm: _Server | None = None
        self._cold: _Server | None = None
        self._next_id = 0
        self._preload: list[str] = []
        self.restarts = 0
        self._lost: list[tuple[ServerChild, ExitInfo]] = []   # exits learnt outside on_ready
        self.forked = False

    # -- starting and stopping the servers

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
        reason = self.fork_is_safe()
        if reason is not None:
            log.info("starting the fork server with spawn: %s", reason)
        self._cold = self._start_server(warm=False, spawn_reason=reason)
        self._warm = self._start_server(warm=True, spawn_reason=reason)

    def _start_server(self, warm: bool, spawn_reason: str | None) -> _Server:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        parent = os.getpid()
        process = None
        if spawn_reason is None:
            pid = os.fork()
            if pid == 0:
                ours.close()
                code = 1
                try:
                    server_main(theirs, [], parent, warm)
                    code = 0
                finally:
                    os._exit(code)
            self.forked = True
        else:
            process = mp.get_context("spawn").Process(
                target=server_main, args=(theirs, ["torch", *self._preload], parent, warm),
                name="fedsup-forkserver")
            process.start()
            assert process.pid is not None
            pid = process.pid
        theirs.close()
        return _Server(ours, pid, warm, process, ready=not warm)

    def alive(self) -> bool:
        return self._warm is not None

    def close(self) -> None:
        for server in (self._cold, self._warm):
            if server is None:
                continue
            if not server.ready:  # still warming up, so it has forked nothing: waiting for it is time lost
                kill_group(server.pid, signal.SIGKILL)
            try:
                server.sock.send(pickle.dumps(("stop",)))
            except OSError:
                pass
            self._reap_server(server)
        self._cold = self._warm = None

    @staticmethod
    def _reap_server(server: _Server) -> None:
        """Close our end of the server's socket and wait for the server to be gone."""
        server.sock.close()
        if server.process is not None:
            server.process.join()
            server.process.close()
        else:
            os.waitpid(server.pid, 0)

    def _servers(self) -> list[_Server]:
        return [s for s in (self._cold, self._warm) if s is not None]

    # -- children

    def spawn(self, spec: ChildSpec) -> ServerChild:
        if self._warm is None:  # it died (killed from outside): start another, the tasks go on
            self.restarts += 1
            log.warning("restarting the fork server (restart %d)", self.restarts)
            self._warm = self._start_server(warm=True, spawn_reason=self.fork_is_safe())
        server = self._cold if self._cold_serves(spec.one_off) else self._warm
        assert server is not None
        parent_conn, child_conn = mp.Pipe(duplex=True)
        self._next_id += 1
        request = pickle.dumps(("spawn", self._next_id, spec))
        try:
            socket.send_fds(server.sock, [request], [child_conn.fileno()])
        except OSError:  # the server died since the last wait: report its children, ask another
            self._lost.extend(self._server_lost(server, []))
            child_conn.close()
            parent_conn.close()
            return self.spawn(spec)
        child_conn.close()
        child = ServerChild(parent_conn, server.warm)
        server.starting[self._next_id] = child
        server.asked += 0 if spec.one_off else 1
        return child

    def _cold_serves(self, one_off: bool) -> bool:
        """Whether the cold server takes the next child: the warm one is not ready, and the cold one's budget
        (of processes alive and started) has room, or the child is a one-off job."""
        cold, warm = self._cold, self._warm
        return (cold is not None and warm is not None and not warm.ready and not cold.retiring
                and cold.holds() < self._cold_limit and (one_off or cold.asked < self._cold_limit))

    def can_spawn(self, one_off: bool) -> bool:
        """False while a child would only queue behind the warm server's warm-up."""
        return self._warm is None or self._warm.ready or self._cold_serves(one_off)

    def waitables(self) -> list[Any]:
        return [s.sock for s in self._servers()]

    def pending_exits(self) -> list[tuple[ServerChild, ExitInfo]]:
        lost, self._lost = self._lost, []
        return lost

    def on_ready(self, obj: Any) -> list[tuple[ServerChild, ExitInfo]]:
        """Read a server's reports; return the children that exited, with how."""
        exited: list[tuple[ServerChild, ExitInfo]] = []
        server = next((s for s in self._servers() if s.sock is obj), None)
        if server is None:
            return exited
        while True:
            try:
                data = server.sock.recv(4096, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return exited
            except OSError:
                data = b""
            if not data:
                return self._server_gone(server, exited)
            self._on_report(server, pickle.loads(data), exited)

    def _on_report(self, server: _Server, message: tuple[Any, ...],
                   exited: list[tuple[ServerChild, ExitInfo]]) -> None:
        if message[0] == "ready":
            server.ready = True
            if self._cold is not None and not self._cold.retiring:
                self._cold.retiring = True
                try:
                    self._cold.sock.send(pickle.dumps(("retire",)))
                except OSError:
                    pass  # it died: its end of file comes through on_ready
        elif message[0] == "started":
            child = server.starting.pop(message[1])
            child.pid = message[2]
            server.by_pid[child.pid] = child
            if child.pending_signal is not None:
                kill_group(child.pid, child.pending_signal)
        elif message[0] == "exited":
            child = server.by_pid.pop(message[1])
            child.exit = ExitInfo.from_wait_status(message[2])
            exited.append((child, child.exit))

    def _server_gone(self, server: _Server,
                     exited: list[tuple[ServerChild, ExitInfo]]) -> list[tuple[ServerChild, ExitInfo]]:
        if server.retiring and server.holds() == 0:  # a cold server, done: it exited as asked
            self._forget(server)
            self._reap_server(server)
            return exited
        return self._server_lost(server, exited)

    def _server_lost(self, server: _Server,
                     exited: list[tuple[ServerChild, ExitInfo]]) -> list[tuple[ServerChild, ExitInfo]]:
        """A server died: its children died with it (PDEATHSIG). Report them all as killed."""
        log.error("a fork server died; its task processes died with it")
        lost = ExitInfo(None, signal.SIGKILL, cause="the fork server died, and its task processes with it")
        for child in [*server.starting.values(), *server.by_pid.values()]:
            child.exit = lost
            exited.append((child, lost))
        server.starting.clear()
        server.by_pid.clear()
        self._forget(server)
        self._reap_server(server)
        return exited

    def _forget(self, server: _Server) -> None:
        if server is self._cold:
            self._cold = None
        if server is self._warm:
            self._warm = None


def warm_up(preload: list[str]) -> None:
    """Import and warm in a thread at the lowest priority, then get ready to fork.

    A warm-up costs ~1 s of CPU. Started beside the cold server's first tasks on a small machine, it would
    slow them down; at nice 19 (Linux sets it per thread) it takes mostly the CPU they leave, and nice 19
    still makes progress on a busy machine, where SCHED_IDLE could wait forever. The thread has ended
    before the first fork: the server forks single-threaded. The collector is off meanwhile:
    ``torch._dynamo``'s import set off collections that took a quarter of the warm-up, and the huge-page
    collapse after it ran ~10x slower over the heap they left.
    """
    failure: list[BaseException] = []

    def work() -> None:
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        except OSError:
            pass  # refused: warm at the usual priority
        try:
            for module in preload:
                importlib.import_module(module)
            warm_torch()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the server's own thread
            failure.append(exc)

    gc.disable()
    try:
        thread = threading.Thread(target=work, name="fedsup-warm-up")
        thread.start()
        thread.join()
        if failure:
            raise failure[0]
        find_threadpools()
        prepare_to_fork()
    finally:
        gc.enable()


def server_main(sock: socket.socket, preload: list[str], supervisor_pid: int, warm: bool = True) -> None:
    """A fork server's loop: fork children on request, reap them, report their exits.

    A warm server first pays torch's first-use costs and says "ready"; a cold one serves at once. Told to
    retire, a server forks nothing more and returns once its last child has been reaped.
    """
    die_with_parent(supervisor_pid)
    os.setpgid(0, 0)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    if warm:
        warm_up(preload)
        sock.send(pickle.dumps(("ready",)))
    else:
        for module in preload:
            importlib.import_module(module)
        gc.freeze()  # cheap (no collection): a child's collections then leave the inherited heap alone
    me = os.getpid()
    children = 0
    retiring = False
    while not (retiring and children == 0):
        ready, _, _ = select.select([sock.fileno(), wake_r], [], [])
        if wake_r in ready:
            os.read(wake_r, 4096)
            children -= _reap(sock)
        if sock.fileno() not in ready:
            continue
        data, fds, _, _ = socket.recv_fds(sock, 1 << 16, 4)
        if not data:
            return  # the supervisor is gone
        request = pickle.loads(data)
        if request[0] == "stop":
            return
        if request[0] == "retire":
            retiring = True
            continue
        _, request_id, spec = request
        pid = os.fork()
        if pid == 0:
            _become_child(sock, wake_r, wake_w, fds[0], spec, me)
        children += 1
        os.close(fds[0])
        try:
            os.setpgid(pid, pid)  # also done by the child: whichever runs first wins the race
        except OSError:
            pass
        sock.send(pickle.dumps(("started", request_id, pid)))


def _reap(sock: socket.socket) -> int:
    reaped = 0
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return reaped
        if pid == 0:
            return reaped
        reaped += 1
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


def make_launcher(start_method: str, cpus_wanted: int, reuse: bool = False) -> SpawnLauncher | ForkServerLauncher:
    if start_method == "spawn":
        return SpawnLauncher()
    if start_method == "forkserver":
        return ForkServerLauncher(cpus_wanted, reuse)
    raise ValueError(f"start_method: expected 'forkserver' or 'spawn', got {start_method!r}")
