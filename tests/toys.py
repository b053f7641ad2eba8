"""Toy tasks for the real-process tests: each one fails (or behaves) in one precise way.

They live in an importable module, not in a test file, because the supervisor pickles a task by reference
to its class: the fork server (forked from the test process) and ``spawn`` children (which re-import it
from ``sys.path``) must both find ``toys.<Class>``.

Every attempt of a task is a new process, so a toy that must behave differently on its first attempt
decides through a marker file created atomically (``O_CREAT | O_EXCL``) in a directory the test gives it.
A toy that lets the test act at a known moment writes one line, ``"<task_id> <pid>"``, into a FIFO the
test (or a helper process of the test) reads: the test never sleeps to guess when a task is training.
"""

from __future__ import annotations

import ctypes
import faulthandler
import os
import signal
import sys
import threading
import time
from typing import Any

import fedsup

# ---------------------------------------------------------------- helpers run in the task's process


def first_time(marker_dir: str, name: str) -> bool:
    """True exactly once per (directory, name), however many processes ask: the first attempt."""
    try:
        fd = os.open(os.path.join(marker_dir, name), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    os.close(fd)
    return True


def announce(fifo: str, task_id: str) -> None:
    """Tell the reader of ``fifo`` that this task's process is where it should be, and its pid.

    One short write is atomic on a FIFO, so lines of several tasks never interleave. Opening for writing
    blocks until a reader holds the FIFO open: the task cannot run ahead of the test.
    """
    fd = os.open(fifo, os.O_WRONLY)
    try:
        os.write(fd, f"{task_id} {os.getpid()}\n".encode())
    finally:
        os.close(fd)


def block_forever() -> None:
    """Never return: only a signal (a timeout's SIGKILL, a shutdown's SIGTERM) ends this process."""
    threading.Event().wait()


def _base(task: fedsup.Task, device: str) -> dict[str, Any]:
    return {"task_id": task.task_id, "pid": os.getpid(), "ppid": os.getppid(), "device": device}


# ---------------------------------------------------------------- tasks that succeed


class Ok(fedsup.Task):
    """Succeeds at once; the result names the process it ran in and the device it was given."""

    def load(self) -> None:
        self.loaded_in = os.getpid()

    def train(self, device: str) -> dict[str, Any]:
        return {**_base(self, device), "loaded_in": self.loaded_in, "cwd": os.getcwd(),
                "nice": os.getpriority(os.PRIO_PROCESS, 0), "threads": len(os.listdir("/proc/self/task"))}


class Environ(fedsup.Task):
    """Reports one environment variable as its process sees it when it trains."""

    def __init__(self, task_id: str, name: str) -> None:
        super().__init__(task_id)
        self.name = name

    def load(self) -> None:
        pass

    def train(self, device: str) -> dict[str, Any]:
        return {**_base(self, device), "value": os.environ.get(self.name)}


class Spanned(fedsup.Task):
    """Measures its work in nested spans: one that allocates ``mib`` MiB and a sibling that does not, a span
    whose exception the task catches, and with ``escape`` one whose exception ends the phase."""

    def __init__(self, task_id: str, mib: int = 200, escape: bool = False) -> None:
        super().__init__(task_id)
        self.mib = mib
        self.escape = escape

    def load(self) -> None:
        with fedsup.span("read", files=2):
            pass

    def train(self, device: str) -> dict[str, Any]:
        seen: dict[str, Any] = {"outside": fedsup.current_span()}
        with fedsup.span("epoch", epoch=3):
            with fedsup.span("alloc"):
                block = bytearray(self.mib * 1024 * 1024)
                block[::4096] = b"x" * len(block[::4096])  # touch every page: resident, not only mapped
                seen["inner"] = fedsup.current_span().name
                del block
            with fedsup.span("idle"):
                pass
            try:
                with fedsup.span("bad"):
                    raise ValueError("caught by the task")
            except ValueError:
                pass
            seen["outer"] = fedsup.current_span().data
            if self.escape:
                with fedsup.span("fatal"):
                    raise RuntimeError("ends the phase")
        seen["after"] = fedsup.current_span()
        return seen


class Straggler(fedsup.Task):
    """Trains for ``first`` seconds on its first attempt and ``later`` seconds on any other (its workload):
    a straggler whose speculative copy, a second attempt, is fast, or (``later`` > ``first``) slow."""

    def __init__(self, task_id: str, marker_dir: str, first: float, later: float = 0.0, **kwargs: Any) -> None:
        super().__init__(task_id, **kwargs)
        self.marker_dir, self.first, self.later = marker_dir, first, later

    def load(self) -> None:
        pass

    def train(self, device: str) -> dict[str, Any]:
        time.sleep(self.first if first_time(self.marker_dir, self.task_id) else self.later)
        return {**_base(self, device), "value": len(self.task_id)}


class Timed(fedsup.Task):
    """Trains for ``seconds`` (its workload, not a synchronisation) and reports when it started and ended."""

    def __init__(self, task_id: str, seconds: float, **kwargs: Any) -> None:
        super().__init__(task_id, **kwargs)
        self.seconds = seconds

    def load(self) -> None:
        pass

    def train(self, device: str) -> dict[str, Any]:
        start = time.time()
        time.sleep(self.seconds)  # stands for work; the test reads overlaps, it does not wait on this
        return {**_base(self, device), "start": start, "end": time.time()}


class Noisy(fedsup.Task):
    """Prints to stdout and stderr in both phases; with ``fail`` it raises after printing ``lines`` lines.

    It counts its attempts in ``attempts.txt`` in its working directory, which is the run directory's
    ``tasks/<task_id>/``, so each stderr line names the attempt that wrote it.
    """

    def __init__(self, task_id: str, fail: bool = False, lines: int = 3, allocate: int = 0) -> None:
        super().__init__(task_id)
        self.fail = fail
        self.lines = lines
        self.allocate = allocate

    def load(self) -> None:
        with open("attempts.txt", "a") as f:
            f.write("x")
        with open("attempts.txt") as f:
            self.attempt = len(f.read())
        print(f"{self.task_id}: stdout from load, attempt {self.attempt}", flush=True)
        print(f"{self.task_id}: stderr from load, attempt {self.attempt}", file=sys.stderr, flush=True)
        if self.allocate:
            block = b"\x01" * self.allocate  # touched pages: they count in the load phase's peak RSS
            del block

    def train(self, device: str) -> dict[str, Any]:
        print(f"{self.task_id}: stdout from train, attempt {self.attempt}", flush=True)
        for i in range(self.lines):
            print(f"{self.task_id}: err {self.attempt} {i}", file=sys.stderr, flush=True)
        if self.fail:
            raise RuntimeError(f"{self.task_id} fails after printing on attempt {self.attempt}")
        return {**_base(self, device), "attempt": self.attempt}


# ---------------------------------------------------------------- tasks that fail, one way each


class RaiseInLoad(fedsup.Task):
    def load(self) -> None:
        raise ValueError(f"{self.task_id}: boom in load")

    def train(self, device: str) -> dict[str, Any]:
        raise AssertionError("train() must not run after load() raised")


class RaiseInTrain(fedsup.Task):
    """Raises in train() on every attempt: the always-failing task."""

    def load(self) -> None:
        pass

    def train(self, device: str) -> dict[str, Any]:
        raise RuntimeError(f"{self.task_id}: boom in train")


AlwaysFail = RaiseInTrain


class SysExit(fedsup.Task):
    def load(self) -> None:
        pass

    def train(self, device: str) -> None:
        sys.exit(2)


class OsExit(fedsup.Task):
    def load(self) -> None:
        pass

    def train(self, device: str) -> None:
        os._exit(3)


class Segfault(fedsup.Task):
    def load(self) -> None:
        pass

    def train(self, device: str) -> None:
        # pytest's faulthandler is inherited through the fork server; keep the test log free of its dump.
        # The process still dies of a plain SIGSEGV either way.
        faulthandler.disable()
        ctypes.string_at(0)


class SelfKill(fedsup.Task):
    def load(self) -> None:
        pass

    def train(self, device: str) -> None:
        os.kill(os.getpid(), signal.SIGKILL)


class Unpicklable(fedsup.Task):
    """train() succeeds, but its result cannot travel back to the supervisor."""

    def load(self) -> None:
        pass

    def train(self, device: str) -> dict[str, Any]:
        return {"lock": threading.Lock(), "fn": lambda: None}


class CudaOomOnce(fedsup.Task):
    """Raises torch.cuda.OutOfMemoryError on its first attempt only; never touches CUDA for real."""

    def __init__(self, task_id: str, marker_dir: str, **kwargs: Any) -> None:
        super().__init__(task_id, **kwargs)
        self.marker_dir = marker_dir

    def load(self) -> None:
        pass

    def train(self, device: str) -> dict[str, Any]:
        if first_time(self.marker_dir, f"{self.task_id}.oom"):
            import torch

            raise torch.cuda.OutOfMemoryError(
                "CUDA out of memory. Tried to allocate 1.50 GiB (GPU 0; 16.00 GiB total capacity)")
        return _base(self, device)


class CudaOomAlways(fedsup.Task):
    """Raises torch.cuda.OutOfMemoryError on every attempt."""

    def load(self) -> None:
        pass

    def train(self, device: str) -> None:
        import torch

        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")


class Hang(fedsup.Task):
    """Blocks forever in ``phase``; with ``marker_dir``, only on its first attempt (then it succeeds)."""

    def __init__(self, task_id: str, phase: str = "train", marker_dir: str | None = None) -> None:
        super().__init__(task_id)
        self.phase = phase
        self.marker_dir = marker_dir

    def _maybe_hang(self, phase: str) -> None:
        if phase != self.phase:
            return
        if self.marker_dir is None or first_time(self.marker_dir, f"{self.task_id}.hang"):
            block_forever()

    def load(self) -> None:
        self._maybe_hang("load")

    def train(self, device: str) -> dict[str, Any]:
        self._maybe_hang("train")
        return _base(self, device)


class KilledOnce(fedsup.Task):
    """On its first attempt, announces itself on ``fifo`` while training and blocks until someone kills it;
    on its retry it succeeds. The test (through a helper process) sends that SIGKILL."""

    def __init__(self, task_id: str, fifo: str, marker_dir: str) -> None:
        super().__init__(task_id)
        self.fifo = fifo
        self.marker_dir = marker_dir

    def load(self) -> None:
        pass

    def train(self, device: str) -> dict[str, Any]:
        if first_time(self.marker_dir, f"{self.task_id}.killed"):
            announce(self.fifo, self.task_id)
            block_forever()
        return _base(self, device)


class Blocker(fedsup.Task):
    """Announces itself on ``fifo`` once training, then blocks until the run shuts it down."""

    def __init__(self, task_id: str, fifo: str, **kwargs: Any) -> None:
        super().__init__(task_id, **kwargs)
        self.fifo = fifo

    def load(self) -> None:
        pass

    def train(self, device: str) -> None:
        announce(self.fifo, self.task_id)
        block_forever()


class WithHelper(fedsup.Task):
    """Starts a helper process of its own in train() (as a data loader might), announces the helper's pid
    on ``fifo``, then ``then``: "hang" (until a timeout kills it), "exit" (os._exit(3), a crash) or
    "return" (succeeds, leaving the helper running)."""

    def __init__(self, task_id: str, fifo: str, then: str) -> None:
        super().__init__(task_id)
        self.fifo = fifo
        self.then = then

    def load(self) -> None:
        pass

    def train(self, device: str) -> dict[str, Any]:
        import subprocess

        helper = subprocess.Popen([sys.executable, "-c", "import threading; threading.Event().wait()"])
        fd = os.open(self.fifo, os.O_WRONLY)
        try:
            os.write(fd, f"{self.task_id} {helper.pid}\n".encode())
        finally:
            os.close(fd)
        if self.then == "hang":
            block_forever()
        if self.then == "exit":
            os._exit(3)
        return {**_base(self, device), "helper": helper.pid}


class Descendants(fedsup.Task):
    """Reports the processes its own process has started and that are still alive."""

    def load(self) -> None:
        pass

    def train(self, device: str) -> dict[str, Any]:
        import psutil

        alive = [p.pid for p in psutil.Process().children(recursive=True) if p.status() != psutil.STATUS_ZOMBIE]
        return {**_base(self, device), "descendants": alive}


class Limits(fedsup.Task):
    """Reports its process's address-space limit (RLIMIT_AS)."""

    def load(self) -> None:
        pass

    def train(self, device: str) -> dict[str, Any]:
        import resource

        return {**_base(self, device), "as_limit": resource.getrlimit(resource.RLIMIT_AS)}


class UnpicklableTask(Ok):
    """Breaks the Task contract: it holds unpicklable state before load(), so it cannot reach its process."""

    def __init__(self, task_id: str) -> None:
        super().__init__(task_id)
        self.lock = threading.Lock()


class Threads(fedsup.Task):
    """Reports the size of torch's pool and of every native thread pool its process has loaded."""

    def load(self) -> None:
        pass

    def train(self, device: str) -> dict[str, Any]:
        import torch
        from threadpoolctl import threadpool_info

        pools = {info["internal_api"]: info["num_threads"] for info in threadpool_info()}
        return {**_base(self, device), "torch": torch.get_num_threads(), "pools": pools}


# ---------------------------------------------------------------- containment and the fork server


def alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie is not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def start_daemon() -> int:
    """Double-fork a ``sleep 300`` into a session of its own, as a daemon does; return its pid."""
    r, w = os.pipe()
    middle = os.fork()
    if middle == 0:
        try:
            os.close(r)
            os.setsid()
            daemon = os.fork()
            if daemon == 0:
                os.close(w)
                os.execvp("sleep", ["sleep", "300"])
            os.write(w, f"{daemon}\n".encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        daemon = int(f.read())
    os.waitpid(middle, 0)  # the middle process is gone: the daemon is an orphan now
    return daemon


class Daemons(fedsup.Task):
    """Starts a helper (``subprocess.Popen``, left running) and a setsid() daemon that double-forked away, then
    writes ``"<helper> <daemon>"`` into ``<folder>/<task_id>.pids`` and, with ``fifo``, announces
    ``"<task_id> <pid> <helper> <daemon>"`` there. ``then``: "return", "block" (until the run ends it), or
    "kill_server" (its first attempt SIGKILLs its fork server, and so itself; the retry returns)."""

    def __init__(self, task_id: str, folder: str, then: str = "return", fifo: str | None = None) -> None:
        super().__init__(task_id)
        self.folder, self.then, self.fifo = folder, then, fifo

    def load(self) -> None:
        pass

    def train(self, device: str) -> dict[str, Any]:
        import subprocess

        if self.then == "kill_server" and not first_time(self.folder, f"{self.task_id}.killed"):
            return _base(self, device)
        helper = subprocess.Popen(["sleep", "300"])
        daemon = start_daemon()
        with open(os.path.join(self.folder, f"{self.task_id}.pids"), "w") as f:
            f.write(f"{helper.pid} {daemon}\n")
        if self.fifo is not None:
            fd = os.open(self.fifo, os.O_WRONLY)
            try:
                os.write(fd, f"{self.task_id} {os.getpid()} {helper.pid} {daemon}\n".encode())
            finally:
                os.close(fd)
        if self.then == "block":
            block_forever()
        if self.then == "kill_server":
            os.kill(os.getppid(), signal.SIGKILL)
            block_forever()  # PR_SET_PDEATHSIG ends us with it
        return {**_base(self, device), "helper": helper.pid, "daemon": daemon}


class StillAlive(fedsup.Task):
    """Reports which of the pids another task wrote into ``<folder>/<other>.pids`` are still alive."""

    def __init__(self, task_id: str, folder: str, other: str) -> None:
        super().__init__(task_id)
        self.folder, self.other = folder, other

    def load(self) -> None:
        pass

    def train(self, device: str) -> dict[str, Any]:
        with open(os.path.join(self.folder, f"{self.other}.pids")) as f:
            pids = [int(p) for p in f.read().split()]
        return {**_base(self, device), "alive": [p for p in pids if alive(p)]}


class StopsServer(fedsup.Task):
    """On its first attempt, SIGSTOPs its fork server (its parent) and returns: the run must notice."""

    def __init__(self, task_id: str, marker_dir: str) -> None:
        super().__init__(task_id)
        self.marker_dir = marker_dir

    def load(self) -> None:
        pass

    def train(self, device: str) -> dict[str, Any]:
        server = os.getppid()
        if first_time(self.marker_dir, f"{self.task_id}.stopped"):
            os.kill(server, signal.SIGSTOP)
            return {**_base(self, device), "stopped": server}
        return _base(self, device)


class KillsServer(fedsup.Task):
    """Its first ``times`` attempts SIGKILL their fork server (and so themselves, through PR_SET_PDEATHSIG);
    the next one returns. It counts its attempts in ``<marker_dir>/<task_id>.attempts``."""

    def __init__(self, task_id: str, marker_dir: str, times: int) -> None:
        super().__init__(task_id)
        self.marker_dir, self.times = marker_dir, times

    def load(self) -> None:
        pass

    def train(self, device: str) -> dict[str, Any]:
        path = os.path.join(self.marker_dir, f"{self.task_id}.attempts")
        with open(path, "a") as f:
            f.write("x")
        with open(path) as f:
            attempt = len(f.read())
        if attempt <= self.times:
            os.kill(os.getppid(), signal.SIGKILL)
            block_forever()
        return {**_base(self, device), "attempt": attempt}


class DaemonClient(fedsup.Task):
    """A federated client whose every train() leaves a helper and a setsid() daemon running, their pids in
    ``<folder>/client-<id>.round-<r>.pids``."""

    def __init__(self, client_id: int, folder: str) -> None:
        super().__init__()
        self.client_id, self.folder = client_id, folder

    def load(self) -> None:
        pass

    def initial_state(self) -> dict[str, Any]:
        import torch

        return {"w": torch.zeros(2)}

    def train(self, device: str) -> dict[str, Any]:
        import subprocess

        import torch

        helper = subprocess.Popen(["sleep", "300"])
        daemon = start_daemon()
        with open(os.path.join(self.folder, f"client-{self.client_id}.round-{self.round}.pids"), "w") as f:
            f.write(f"{helper.pid} {daemon}\n")
        return {"state": {"w": torch.full((2,), float(self.client_id))}, "num_examples": 1}


class SignalsSupervisor(fedsup.Task):
    """Sends ``sig`` to the supervisor (``supervisor_pid``) from train(), then returns, or with ``block``
    blocks until the run ends it."""

    def __init__(self, task_id: str, supervisor_pid: int, sig: int, block: bool = False) -> None:
        super().__init__(task_id)
        self.supervisor_pid, self.sig, self.block = supervisor_pid, sig, block

    def load(self) -> None:
        pass

    def train(self, device: str) -> dict[str, Any]:
        os.kill(self.supervisor_pid, self.sig)
        if self.block:
            block_forever()
        return _base(self, device)


class StopsItself(fedsup.Task):
    """On its first attempt, SIGSTOPs itself in train(): only the train deadline can end it."""

    def __init__(self, task_id: str, marker_dir: str) -> None:
        super().__init__(task_id)
        self.marker_dir = marker_dir

    def load(self) -> None:
        pass

    def train(self, device: str) -> dict[str, Any]:
        if first_time(self.marker_dir, f"{self.task_id}.stopped"):
            os.kill(os.getpid(), signal.SIGSTOP)
        return _base(self, device)


class OutgrowsCgroup(fedsup.Task):
    """On its first attempt, joins the memory cgroup whose ``cgroup.procs`` is given and allocates past its
    limit: the kernel's OOM killer ends it with a SIGKILL fedsup did not send."""

    def __init__(self, task_id: str, marker_dir: str, procs: str, size: int) -> None:
        super().__init__(task_id)
        self.marker_dir, self.procs, self.size = marker_dir, procs, size

    def load(self) -> None:
        pass

    def train(self, device: str) -> dict[str, Any]:
        if first_time(self.marker_dir, f"{self.task_id}.oom"):
            with open(self.procs, "w") as f:
                f.write(str(os.getpid()))
            hog = bytearray(self.size)
            for i in range(0, self.size, 4096):  # touch every page: charged to the cgroup
                hog[i] = 1
        return _base(self, device)


class Warmed(fedsup.Task):
    """Reports whether its process found the optimiser machinery imported already (by a fork server's
    warm-up) when it loaded, and the fork server it came from."""

    def load(self) -> None:
        self.warmed = "torch._dynamo" in sys.modules

    def train(self, device: str) -> dict[str, Any]:
        return {**_base(self, device), "warmed": self.warmed}
