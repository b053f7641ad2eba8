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

import ctypes
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
import time
import types
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection
from typing import Any, Protocol

import torch

from fedsup.engine import tensorfile
from fedsup.engine.containment import (
    Cgroups,
    become_subreaper,
    child_pids,
    end_descendants,
    kill_quietly,
    remove_cgroups,
)
from fedsup.engine.devices import cpu_cores
from fedsup.engine.errors import FedsupError
from fedsup.engine.forking import prepare_to_fork
from fedsup.engine.spawning import REENTERED, SPAWNING, reentry_error, started
from fedsup.engine.worker import ChildSpec, child_main, die_with_parent, find_threadpools

log = logging.getLogger(__name__)

CGROUPS = True  # put task processes in cgroups where the machine allows it (tests turn it off to see the rest)

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
    # the process was lost with the infrastructure that held it (a fork server): the how-manyth such death
    # of the run, which spends the infrastructure's budget, not the task's
    infrastructure: int | None = None

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
    cgroup: str | None  # its cgroup v2 folder, where containment has one

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


# A process forked after the CUDA driver was initialised cannot use CUDA ("CUDA error: initialization error",
# or torch's "Cannot re-initialize CUDA in forked subprocess"). Much initialises it besides CUDA work:
# torch.cuda.is_available() asks the CUDA runtime, and so does an optimiser's step (its graph-capture check)
# and autograd's first backward pass (it starts a thread per device), even on CPU tensors. With this variable
# set torch asks NVML instead; a fork server keeps it set for its whole life (user modules often call
# is_available() at import), and its children get the user's value back before they run anything of the task's.
NVML_CUDA_CHECK = "PYTORCH_NVML_BASED_CUDA_CHECK"
_user_nvml_check: str | None = None
_CUDA_SUCCESS = 0
_USER_NVML_CHECK = "FEDSUP_USER_NVML_CHECK"  # the user's setting, carried to a server started with spawn


def cuda_initialised_here() -> bool:
    """Whether this process has initialised the CUDA driver, asked without initialising it: before cuInit,
    cuCtxGetCurrent answers CUDA_ERROR_NOT_INITIALIZED. False where torch has no CUDA or there is no driver."""
    if not torch.backends.cuda.is_built():
        return False
    try:
        driver = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    context = ctypes.c_void_p()
    # CUDA_SUCCESS only once cuInit has run; a stub driver (a CUDA build without a GPU) answers 34 to every call
    return int(driver.cuCtxGetCurrent(ctypes.byref(context))) == _CUDA_SUCCESS


def cuda_problem() -> str | None:
    """What a fork server tells the supervisor when its imports or warm-up initialised CUDA: its children
    could not use it."""
    if cuda_initialised_here():
        return "the CUDA driver was initialised in the fork server, so the processes it forks cannot use CUDA"
    return None


@contextmanager
def environment(**values: str) -> Iterator[None]:
    """These variables set for a while, then each as it was (or unset)."""
    before = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def devices_hidden() -> AbstractContextManager[None]:
    """No GPU visible for a while: torch's CUDA checks (through NVML) find none and touch no driver."""
    return environment(CUDA_VISIBLE_DEVICES="")


def guard_cuda_for_forking() -> None:
    """In a fork server, before its imports and warm-up: keep CUDA checks off the CUDA runtime (see above). A
    server started with spawn had the variable set for its start (its parent's main module is imported
    before this runs) and the user's own value carried beside it."""
    global _user_nvml_check
    if _USER_NVML_CHECK in os.environ:
        _user_nvml_check = os.environ.pop(_USER_NVML_CHECK) or None
    else:
        _user_nvml_check = os.environ.get(NVML_CUDA_CHECK)
    os.environ[NVML_CUDA_CHECK] = "1"


def _spawn_guarded() -> AbstractContextManager[None]:
    """While a server is spawned: the variable set for it, the user's value carried in another."""
    return environment(**{_USER_NVML_CHECK: os.environ.get(NVML_CUDA_CHECK) or "", NVML_CUDA_CHECK: "1"})


def _marked_spawning() -> AbstractContextManager[None]:
    """While a process is started with spawn: the mark a run started in it at import finds (see
    fedsup.engine.spawning). It sets ``os.environ`` in a process that may run other threads (one reason to
    spawn at all), as ``_spawn_guarded`` does: a C library reading the environment at that instant is the
    known, rare hazard of setenv; a process another thread starts in the window inherits the mark too, which
    matters only to a run started in there at import, the case it is for."""
    return environment(**{SPAWNING: "1"})


_RAY_WORKER_MAIN = os.path.join("ray", "_private", "workers", "default_worker.py")


@contextmanager
def _main_left_out() -> Iterator[None]:
    """While a fork server is spawned from a Ray worker (a node agent): a bare ``__main__``. Spawn runs the
    parent's main script again in the new process, for the classes pickled from it; Ray's worker script
    defines no task, and running it costs the server a third of a second of Ray's imports."""
    main = sys.modules.get("__main__")
    if not str(getattr(main, "__file__", "")).endswith(_RAY_WORKER_MAIN):
        yield
        return
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = main  # type: ignore[assignment]


def restore_cuda_check() -> None:
    """In a task process just forked: the user's own setting of the variable, or none."""
    if _user_nvml_check is None:
        os.environ.pop(NVML_CUDA_CHECK, None)
    else:
        os.environ[NVML_CUDA_CHECK] = _user_nvml_check


def warm_torch() -> None:
    """Pay torch's first-use costs once, in the server, so that no task process pays them again.

    On one thread, so that no OpenMP pool exists for a child to inherit. Each step is a cost measured in a
    fresh child: the first optimiser imports ``torch._dynamo`` (~2 s); the first ``torch.manual_seed`` reads
    source files for the stack trace CUDA's lazy seeding keeps (~5 ms); the first ``torch.load`` of a
    memory-mapped state and the first ``torch.save`` set up their machinery (~4 ms and ~2 ms), as fedsup's tensor
    files do theirs; numpy's first
    generator ~4 ms.
    """
    import tempfile

    import torch.nn.functional as F  # noqa: N812
    import torch.utils.data  # noqa: F401

    torch.set_num_threads(1)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
    # With CUDA in torch, no backward pass: autograd's first one initialises the driver (see NVML_CUDA_CHECK),
    # so the gradients are set by hand; the steps run with no GPU visible, for the optimisers' own checks.
    cuda_build = torch.backends.cuda.is_built()
    with devices_hidden():
        for opt in (torch.optim.SGD(model.parameters(), lr=0.1), torch.optim.Adam(model.parameters())):
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            if cuda_build:
                for p in model.parameters():
                    p.grad = torch.ones_like(p)
            else:
                loss.backward()
            opt.step()
    torch.manual_seed(0)
    folder = "/dev/shm" if os.path.isdir("/dev/shm") else None
    with tempfile.NamedTemporaryFile(dir=folder, prefix="fedsup-warm-", suffix=".pt") as f:
        torch.save(model.state_dict(), f)  # a task's own checkpoints, and the states kept between rounds
        f.flush()
        torch.load(f.name, mmap=True, weights_only=True)
        f.seek(0)
        tensorfile.write(model.state_dict(), f)  # the global model and the updates
        f.truncate()
        f.flush()
        tensorfile.read(f.name)
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        numpy.random.default_rng(0).standard_normal(8).astype(numpy.float32)


# ---------------------------------------------------------------- spawn


class SpawnChild:
    def __init__(self, process: Any, conn: Connection, launcher: SpawnLauncher) -> None:
        self.process = process
        self.launcher = launcher
        self.conn = conn
        self.pid: int | None = process.pid
        self.exit: ExitInfo | None = None
        self.warm = False
        self.cgroup: str | None = None

    def sentinel(self) -> Any:
        return self.process.sentinel

    def poll_exit(self) -> ExitInfo | None:
        if self.exit is None:
            self.process.join(0)
            if self.process.exitcode is not None:
                self.exit = ExitInfo.from_exitcode(self.process.exitcode)
                self.process.close()
                if self.exit.code == REENTERED:
                    self.launcher.error = reentry_error("a task process (supervisor start_method: spawn)")
        return self.exit

    def kill(self, sig: int) -> None:
        if self.exit is None and self.pid is not None:
            kill_group(self.pid, sig)


class SpawnLauncher:
    """One fresh interpreter per task: slow (each imports torch) but shares nothing with the parent."""

    name = "spawn"

    def __init__(self) -> None:
        self._ctx = mp.get_context("spawn")
        self._cgroups: Cgroups | None = None
        # an error that ends the run, raised by the scheduler once it has handled this wait's exits
        self.error: FedsupError | None = None

    def start(self, preload: list[str]) -> None:
        self._cgroups = make_cgroups()

    def spawn(self, spec: ChildSpec) -> SpawnChild:
        spec = replace(spec, cgroup=self._cgroups.folder() if self._cgroups else None)
        parent_conn, child_conn = mp.Pipe(duplex=True)
        process = self._ctx.Process(target=child_main, args=(child_conn, spec), name=f"fedsup:{spec.task_id}")
        with _marked_spawning():
            process.start()
        child_conn.close()
        child = SpawnChild(process, parent_conn, self)
        child.cgroup = spec.cgroup
        return child

    def can_spawn(self, one_off: bool) -> bool:
        return True

    def waitables(self) -> list[Any]:
        return []

    def pending_exits(self) -> list[tuple[SpawnChild, ExitInfo]]:
        return []

    def on_ready(self, obj: Any) -> list[tuple[SpawnChild, ExitInfo]]:
        return []

    def expect_exit(self, child: Any) -> None:
        pass

    def next_deadline(self) -> float | None:
        return None

    def check_deadlines(self, now: float) -> list[tuple[SpawnChild, ExitInfo]]:
        return []

    def release(self, child: Any) -> None:
        if self._cgroups is not None:
            self._cgroups.release(child.cgroup)

    def alive(self) -> bool:
        return True

    def close(self) -> None:
        if self._cgroups is not None:
            self._cgroups.close()


# ---------------------------------------------------------------- fork server


class ServerChild:
    def __init__(self, conn: Connection, server: _Server, cgroup: str | None) -> None:
        self.conn = conn
        self.pid: int | None = None
        self.exit: ExitInfo | None = None
        self.warm = server.warm
        self.server = server
        self.cgroup = cgroup
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
    spawn_reason: str | None = None  # why it was started with spawn
    ready: bool = False           # warm and forking (a cold server is ready from the start)
    broken: bool = False          # its start initialised CUDA: its children cannot use it
    retiring: bool = False        # told to exit once its last child has
    asked: int = 0                # children requested from it, ever (one-off jobs aside)
    starting: dict[int, ServerChild] = field(default_factory=dict)
    by_pid: dict[int, ServerChild] = field(default_factory=dict)
    # what it owes us, and by when (monotonic): "serving" (its start-up), a child's "started", a child's
    # "exited" once the child is known to be dying (its pipe closed, or fedsup sent SIGKILL)
    due: dict[Any, float] = field(default_factory=dict)

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

    Deadlines: a server must be serving within ``start_timeout`` of its start, and must answer within
    ``reply_timeout`` what it owes: a child's pid once asked for it, a child's exit status once that child is
    known to be dying (its pipe closed, or fedsup sent SIGKILL). A server that misses one (stopped, hung) is
    killed; its task processes die with it and are reported lost, and the next spawn starts a new server.
    """

    name = "forkserver"

    def __init__(self, cpus_wanted: int = 1, reuse: bool = False, reply_timeout: float = 10.0,
                 start_timeout: float = 120.0) -> None:
        self._cpus_wanted = cpus_wanted
        # Where processes are reused, the first ones serve many tasks, so one per core starts cold, as a
        # pool's workers do, and the warm-up takes what CPU they leave; otherwise one core is left to it.
        self._cold_limit = cpu_cores() if reuse else max(1, cpu_cores() - 1)
        self.reply_timeout = reply_timeout
        self.start_timeout = start_timeout
        self._warm: _Server | None = None
        self._cold: _Server | None = None
        self._next_id = 0
        self._preload: list[str] = []
        self.restarts = 0
        self.deaths = 0   # servers lost (died, or killed for missing a deadline): infrastructure deaths
        self._lost: list[tuple[ServerChild, ExitInfo]] = []   # exits learnt outside on_ready
        self.no_warm = False  # a warm-up initialised CUDA once: servers started later stay cold
        self._cgroups: Cgroups | None = None
        self.forked = False
        # an error that ends the run, raised by the scheduler once it has handled this wait's exits
        self.error: FedsupError | None = None

    # -- starting and stopping the servers

    def fork_is_safe(self) -> str | None:
        """Why forking this process would be unsafe, or None when it is safe."""
        if threading.active_count() > 1:
            return f"{threading.active_count() - 1} other Python thread(s) are running"
        if torch.cuda.is_initialized():
            return "CUDA is initialised in this process"
        if cuda_initialised_here():
            return ("the CUDA driver is initialised in this process (by torch.cuda.is_available(), a backward "
                    "pass or any CUDA call), so no process forked from it could use CUDA")
        if self._cpus_wanted > 1 and thread_count() > _BASELINE_THREADS:
            return "native threads (an OpenMP pool, most likely) were started since torch was imported"
        return None

    def start(self, preload: list[str]) -> None:
        self._preload = preload
        self._cgroups = make_cgroups()
        reason = self.fork_is_safe()
        if reason is not None:
            log.info("starting the fork server with spawn: %s", reason)
        # A forked cold server costs nothing and serves at once. Started with spawn, it would import torch a
        # second time, and each of its children would pay the optimiser's first import that the warm-up pays
        # once (1-2 s of a core each): on a node of one or two cores, a Ray agent's, the first steps came
        # seconds later than they do with the warm server alone.
        self._cold = self._start_server(warm=False, spawn_reason=reason) if reason is None else None
        self._warm = self._start_server(warm=True, spawn_reason=reason)

    def _start_server(self, warm: bool, spawn_reason: str | None) -> _Server:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        parent = os.getpid()
        root = None if self._cgroups is None or self._cgroups.root is None else str(self._cgroups.root)
        process = None
        if spawn_reason is None:
            pid = os.fork()
            if pid == 0:
                ours.close()
                code = 1
                try:
                    server_main(theirs, [], parent, warm, root)
                    code = 0
                finally:
                    os._exit(code)
            self.forked = True
        else:
            process = mp.get_context("spawn").Process(
                target=server_main, args=(theirs, ["torch", *self._preload], parent, warm, root),
                name="fedsup-forkserver")
            with _spawn_guarded(), _marked_spawning(), _main_left_out():
                process.start()
            assert process.pid is not None
            pid = process.pid
        theirs.close()
        server = _Server(ours, pid, warm, process, spawn_reason=spawn_reason, ready=not warm)
        server.due["serving"] = time.monotonic() + self.start_timeout
        return server

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
        if self._cgroups is not None:
            self._cgroups.close()

    def _reap_server(self, server: _Server) -> None:
        """Close our end of the server's socket and wait for the server to be gone: a server that does not go
        within ``reply_timeout`` (stopped, hung) is killed."""
        server.sock.close()
        if server.process is not None:
            server.process.join(self.reply_timeout)
            if server.process.exitcode is None:
                server.process.kill()
                server.process.join(self.reply_timeout)
            if server.process.exitcode is not None:
                server.process.close()
        elif not wait_exit(server.pid, self.reply_timeout):
            kill_quietly(server.pid)
            wait_exit(server.pid, self.reply_timeout)

    def _servers(self) -> list[_Server]:
        return [s for s in (self._cold, self._warm) if s is not None]

    # -- children

    def spawn(self, spec: ChildSpec) -> ServerChild:
        if self._warm is None:  # it died (killed from outside): start another, the tasks go on
            self.restarts += 1
            log.warning("restarting the fork server (restart %d)", self.restarts)
            self._warm = self._start_server(warm=not self.no_warm, spawn_reason=self.fork_is_safe())
        server = self._cold if self._cold_serves(spec.one_off) else self._warm
        assert server is not None
        spec = replace(spec, cgroup=self._cgroups.folder() if self._cgroups else None)
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
        child = ServerChild(parent_conn, server, spec.cgroup)
        server.starting[self._next_id] = child
        server.asked += 0 if spec.one_off else 1
        # a server still starting answers once it serves
        server.due[child] = max(time.monotonic(), server.due.get("serving", 0.0)) + self.reply_timeout
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

    def release(self, child: Any) -> None:
        """The child's exit has been handled: what it left in its cgroup goes."""
        if self._cgroups is not None:
            self._cgroups.release(child.cgroup)

    # -- deadlines

    def expect_exit(self, child: Any) -> None:
        """The child is dying (its pipe closed, or it was sent SIGKILL): its server owes us its exit status."""
        if not isinstance(child, ServerChild) or child.exit is not None:
            return
        server = child.server
        if server in self._servers():
            server.due[child] = min(server.due.get(child, float("inf")), time.monotonic() + self.reply_timeout)

    def next_deadline(self) -> float | None:
        return min((t for s in self._servers() for t in s.due.values()), default=None)

    def check_deadlines(self, now: float) -> list[tuple[ServerChild, ExitInfo]]:
        """Kill every server that owes an answer past its deadline; return the children lost with them."""
        exited: list[tuple[ServerChild, ExitInfo]] = []
        for server in self._servers():
            if not server.due or min(server.due.values()) > now:
                continue
            what = "start" if "serving" in server.due and server.due["serving"] <= now else "answer"
            limit = self.start_timeout if what == "start" else self.reply_timeout
            state = process_state(server.pid)
            log.warning("a fork server (pid %d, %s) did not %s within %g s: killed, and its task processes with "
                        "it; a new one takes its place", server.pid, state, what, limit)
            kill_quietly(server.pid)
            cause = (f"the fork server ({state}) did not {what} within {limit:g} s and was killed, and its task "
                     f"processes with it")
            exited.extend(self._server_lost(server, [], cause))
        return exited

    # -- reports

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
            if server not in self._servers():  # forgone (see _forgo): stopped and reaped already
                return exited

    def _on_report(self, server: _Server, message: tuple[Any, ...],
                   exited: list[tuple[ServerChild, ExitInfo]]) -> None:
        if message[0] in ("ready", "serving"):
            server.due.pop("serving", None)
            if message[1] is not None and self._forgo(server, message[0], message[1]):
                return
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
            server.due.pop(child, None)
            child.pid = message[2]
            server.by_pid[child.pid] = child
            if child.pending_signal is not None:
                kill_group(child.pid, child.pending_signal)
        elif message[0] == "exited":
            found = server.by_pid.pop(message[1], None)
            if found is None:
                return
            server.due.pop(found, None)
            found.exit = ExitInfo.from_wait_status(message[2])
            exited.append((found, found.exit))

    def _forgo(self, server: _Server, state: str, problem: str) -> bool:
        """A server whose start initialised CUDA. A warm one has forked nothing yet: it is stopped and a cold
        one serves in its place, for the rest of the run (True): the cold server already running, or, where
        the servers are spawned (and so none runs), a new one. Otherwise there is nothing better to fork
        from: it serves, and the log says why CUDA tasks fail (False)."""
        cold = self._cold
        usable = cold is not None and not cold.retiring and not cold.broken
        if (state == "ready" and server is self._warm and server.holds() == 0
                and (usable or (cold is None and server.spawn_reason is not None))):
            log.warning("%s: task processes come from a cold fork server instead (torch not warmed)", problem)
            try:
                server.sock.send(pickle.dumps(("stop",)))
            except OSError:
                pass  # it died meanwhile: reaped all the same
            self._reap_server(server)
            if cold is None:
                cold = self._start_server(warm=False, spawn_reason=server.spawn_reason)
            cold.ready = True
            self._warm, self._cold = cold, None
            self.no_warm = True  # a server started later (after a death) is a cold one too
            return True
        server.broken = True
        log.warning("%s: tasks that use CUDA will fail (look for CUDA calls at import in the task's modules)",
                    problem)
        return False

    def _server_gone(self, server: _Server,
                     exited: list[tuple[ServerChild, ExitInfo]]) -> list[tuple[ServerChild, ExitInfo]]:
        if server.retiring and server.holds() == 0:  # a cold server, done: it exited as asked
            self._forget(server)
            self._reap_server(server)
            return exited
        return self._server_lost(server, exited)

    def _server_lost(self, server: _Server, exited: list[tuple[ServerChild, ExitInfo]],
                     cause: str | None = None) -> list[tuple[ServerChild, ExitInfo]]:
        """A server died: its children died with it (PDEATHSIG). Report them all as lost with it."""
        reentered = cause is None and self._reentered(server)
        children = [*server.starting.values(), *server.by_pid.values()]
        if not reentered:  # not an infrastructure death: the run ends (see below)
            self.deaths += 1
            log.warning("a fork server (pid %d) was lost, with %d task process(es): infrastructure death %d of the "
                        "run", server.pid, len(children), self.deaths)
        lost = ExitInfo(None, signal.SIGKILL, infrastructure=self.deaths,
                        cause=cause or "the fork server died, and its task processes with it")
        for child in children:
            child.exit = lost
            exited.append((child, lost))
        server.starting.clear()
        server.by_pid.clear()
        server.due.clear()
        self._forget(server)
        self._reap_server(server)
        if reentered:  # the run ends: the scheduler raises it once it has handled these exits
            self.error = reentry_error("fedsup's fork server", server.spawn_reason)
        return exited

    def _reentered(self, server: _Server) -> bool:
        """Whether a server started with spawn left with ``REENTERED``: it never served, because the script
        that started the run starts it again at import (see fedsup.engine.spawning)."""
        if server.process is None:
            return False
        server.process.join(self.reply_timeout)
        return bool(server.process.exitcode == REENTERED)

    def _forget(self, server: _Server) -> None:
        if server is self._cold:
            self._cold = None
        if server is self._warm:
            self._warm = None


def make_cgroups() -> Cgroups | None:
    """A cgroup folder for this run's task processes, where this machine lets us make one."""
    if not CGROUPS:
        return None
    cgroups = Cgroups()
    if cgroups.root is None:
        log.debug("no cgroup for task processes (%s): process groups and subreapers contain them", cgroups.reason)
        return None
    return cgroups


def wait_exit(pid: int, timeout: float) -> bool:
    """Reap our child ``pid``, waiting at most ``timeout`` (a pidfd: a wait, not a poll); False if it lives on."""
    try:
        fd = os.pidfd_open(pid)
    except OSError:  # gone and reaped already, or no pidfds on this kernel: wait as before
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass
        return True
    try:
        ready, _, _ = select.select([fd], [], [], timeout)
        if not ready:
            return False
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass
        return True
    finally:
        os.close(fd)


def process_state(pid: int) -> str:
    """How /proc names the process's state: "stopped (T)", "sleeping (S)", ..."""
    names = {"R": "running", "S": "sleeping", "D": "in uninterruptible sleep", "T": "stopped", "t": "traced",
             "Z": "a zombie"}
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "gone"
    return f"{names.get(state, 'state')} ({state})"


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


def server_main(sock: socket.socket, preload: list[str], supervisor_pid: int, warm: bool = True,
                cgroup_root: str | None = None) -> None:
    """A fork server's loop: fork children on request, reap them, report their exits.

    A warm server first pays torch's first-use costs and says "ready"; a cold one serves at once. Told to
    retire, a server forks nothing more and returns once its last child has been reaped. Whichever way it
    leaves (told to stop, the supervisor gone, SIGTERM, an error), it kills its whole tree first.
    """
    started()
    die_with_parent(supervisor_pid)  # SIGKILL while warming up: it has no child yet, nothing to clean up
    guard_cuda_for_forking()
    os.setpgid(0, 0)
    become_subreaper()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    if warm:
        warm_up(preload)
        sock.send(pickle.dumps(("ready", cuda_problem())))
    else:
        for module in preload:
            importlib.import_module(module)
        gc.freeze()  # cheap (no collection): a child's collections then leave the inherited heap alone
        sock.send(pickle.dumps(("serving", cuda_problem())))
    # From here on it has children: the supervisor's death must wake the loop to clean up, not kill it.
    signal.signal(signal.SIGTERM, lambda *_: None)
    die_with_parent(supervisor_pid, signal.SIGTERM)
    tasks: dict[int, str | None] = {}  # our task processes' pids, and their cgroup folders
    try:
        _serve(sock, wake_r, wake_w, supervisor_pid, tasks)
    finally:
        # the run's cgroup folder is the supervisor's to remove, unless the supervisor is gone
        _end_tree(tasks, cgroup_root if os.getppid() != supervisor_pid else None)


def _serve(sock: socket.socket, wake_r: int, wake_w: int, supervisor_pid: int, tasks: dict[int, str | None]) -> None:
    me = os.getpid()
    retiring = False
    while not (retiring and not tasks):
        ready, _, _ = select.select([sock.fileno(), wake_r], [], [])
        if wake_r in ready:
            woken = os.read(wake_r, 4096)
            _reap(sock, tasks)
            if signal.SIGTERM in woken or os.getppid() != supervisor_pid:
                return  # the supervisor is gone (PDEATHSIG), or we were told to go
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
        tasks[pid] = spec.cgroup
        os.close(fds[0])
        try:
            os.setpgid(pid, pid)  # also done by the child: whichever runs first wins the race
        except OSError:
            pass
        sock.send(pickle.dumps(("started", request_id, pid)))


def _reap(sock: socket.socket, tasks: dict[int, str | None]) -> None:
    """Report our task processes' exits; kill every other child at once. Each task process is a subreaper,
    so its orphans come to us only once it has died: a child that is not a task process is a dead task's."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            break
        if pid in tasks:
            del tasks[pid]
            sock.send(pickle.dumps(("exited", pid, status)))
    for pid in child_pids():
        if pid not in tasks:
            _kill_leftover(pid)


def _kill_leftover(pid: int) -> None:
    """A dead task's leftover, and its process group if it leads one (a setsid() daemon): the members go at once
    instead of one generation per reap."""
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    kill_quietly(pid)


def _end_tree(tasks: dict[int, str | None], cgroup_root: str | None) -> None:
    """The server is leaving: nothing below it may stay. Bounded by an alarm: a process stuck in the kernel
    must not keep the server from going."""
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    signal.alarm(15)
    for pid in tasks:
        kill_group(pid, signal.SIGKILL)
    end_descendants(timeout=5.0)
    remove_cgroups([f for f in tasks.values() if f is not None], cgroup_root)


def _become_child(sock: socket.socket, wake_r: int, wake_w: int, fd: int, spec: ChildSpec, server: int) -> None:
    code = 1
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the server's is for the server alone
        restore_cuda_check()
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


def make_launcher(start_method: str, cpus_wanted: int, reuse: bool = False,
                  timeouts: tuple[float, float] = (10.0, 120.0)) -> SpawnLauncher | ForkServerLauncher:
    """``timeouts``: a fork server's (reply, start-up) deadlines, in seconds."""
    if start_method == "spawn":
        return SpawnLauncher()
    if start_method == "forkserver":
        return ForkServerLauncher(cpus_wanted, reuse, reply_timeout=timeouts[0], start_timeout=timeouts[1])
    raise ValueError(f"start_method: expected 'forkserver' or 'spawn', got {start_method!r}")
