"""The child side: set the process up, then obey LOAD / TRAIN / EXIT and report each phase, measured.

Everything here runs in the task's own process. A phase's record is measured here, not in the parent:
peak host memory is VmHWM after resetting it through /proc/self/clear_refs (``ru_maxrss`` would start at
the parent's size in a forked child), CPU time is a getrusage delta, GPU peak is torch's own counter.
"""

from __future__ import annotations

import contextlib
import gc
import io
import os
import resource
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.reduction import ForkingPickler
from typing import Any

from fedsup.engine import spans
from fedsup.engine.containment import (
    become_subreaper,
    child_pids,
    end_descendants,
    join_cgroup,
    set_parent_death_signal,
)
from fedsup.engine.contract import UPDATE_CONTRACT, check_update
from fedsup.engine.messages import Began, Bye, Exit, Fault, Load, PhaseDone, PhaseFailed, StateRef, Train
from fedsup.engine.records import ErrorInfo, ErrorKind, Phase, PhaseRecord
from fedsup.engine.spawning import started

_HOST_OOM_MARKERS = ("DefaultCPUAllocator: can't allocate memory", "std::bad_alloc")
_CUDA_OOM_MARKERS = (
    "CUDA out of memory",
    "CUBLAS_STATUS_ALLOC_FAILED",
    "cudaErrorMemoryAllocation",
    "CUDA error: out of memory",
    "HIP out of memory",
)


@dataclass(frozen=True)
class ChildSpec:
    """How to set a task's process up before it reads its first command."""

    task_id: str
    cpus: int = 1
    workdir: str | None = None
    stdout: str | None = None
    stderr: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    parent_pid: int | None = None
    memory_limit: int | None = None   # bytes the process may grow by (address space), or None
    one_off: bool = False             # a short job without training (see scheduler.Job.one_off)
    cgroup: str | None = None         # the cgroup v2 folder the process moves into (containment.Cgroups)


def die_with_parent(parent_pid: int | None, sig: int = signal.SIGKILL) -> None:
    """Ask the kernel for ``sig`` when our parent dies, and cover the race where it already has."""
    set_parent_death_signal(sig)
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(1)


def _redirect(path: str, fd: int) -> None:
    target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(target, fd)
    os.close(target)


def setup_child(spec: ChildSpec) -> None:
    """Process-wide settings, in the order that matters: identity, containment, signals, files, threads."""
    die_with_parent(spec.parent_pid)
    join_cgroup(spec.cgroup)
    become_subreaper()  # orphans below us (double forks, setsid daemons) stay ours, to end with the task
    try:
        os.setpgid(0, 0)  # our own group: the terminal's Ctrl-C goes to the supervisor, which shuts us down
    except OSError:
        pass
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_DFL)
    os.environ.update(spec.env)
    threads = str(spec.cpus)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = threads
    os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    place(spec)
    limit_threads(spec.cpus)


_threadpools: Any = None  # a threadpoolctl.ThreadpoolController: the native pools loaded before the fork


def find_threadpools() -> None:
    """Find the native thread pools loaded so far (BLAS, OpenMP): once, in the warm fork server (~10 ms)."""
    global _threadpools
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:
        return
    _threadpools = ThreadpoolController()


def limit_threads(cpus: int) -> None:
    """Hold torch's pool and every native pool loaded before the fork to the task's CPUs: numpy's OpenBLAS
    sized itself from the supervisor's cores when it was loaded and reads OPENBLAS_NUM_THREADS no more."""
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(cpus)
    if _threadpools is None and "numpy" in sys.modules:
        find_threadpools()  # a child of the cold server: the warm one has them already
    if _threadpools is not None:
        _threadpools.limit(limits=cpus)


def place(spec: ChildSpec) -> None:
    """The task's folder, output files and memory limit: at start, and again when a process takes a new task."""
    if spec.workdir:
        os.makedirs(spec.workdir, exist_ok=True)
        os.chdir(spec.workdir)
    if spec.stdout:
        sys.stdout.flush()
        _redirect(spec.stdout, 1)
        # the parent's sys.stdout may be a stand-in (pytest's capture, a notebook's stream): use the file
        sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), line_buffering=True)
    if spec.stderr:
        sys.stderr.flush()
        _redirect(spec.stderr, 2)
        sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), line_buffering=True,
                                      errors="backslashreplace")
    if spec.memory_limit:
        limit_memory(spec.memory_limit)
    else:
        restore_memory_limit()  # a reused process may still hold the last task's limit


def end_helpers() -> None:
    """Kill what the last task started and left running (a data loader's workers, a helper, a daemon that
    double-forked into a session of its own: as a subreaper this process is the parent of every orphan
    below it): a task's processes end with the task, whether or not its process goes on to the next one.
    Cheap when there is nothing to kill: one read of /proc/self/task/*/children."""
    if child_pids():
        end_descendants(timeout=5.0)  # well within the fork server's reply deadline for our own exit


_unlimited_as: tuple[int, int] | None = None  # RLIMIT_AS before fedsup first limited it in this process


def limit_memory(extra: int) -> None:
    """Let the address space grow by ``extra`` bytes from here: beyond, allocations fail with MemoryError
    (numpy, Python) or torch's "can't allocate memory", which the supervisor treats as memory pressure."""
    global _unlimited_as
    with open("/proc/self/status") as f:
        size = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    current = resource.getrlimit(resource.RLIMIT_AS)
    if _unlimited_as is None:
        _unlimited_as = current
    hard = current[1]
    soft = size + extra
    resource.setrlimit(resource.RLIMIT_AS, (soft if hard == resource.RLIM_INFINITY else min(soft, hard), hard))


def restore_memory_limit() -> None:
    """Give back the address-space limit the process had before ``limit_memory``, if it was called."""
    if _unlimited_as is not None:  # limit_memory kept the hard limit, so the old soft one is allowed again
        resource.setrlimit(resource.RLIMIT_AS, _unlimited_as)


def lift_host_limit() -> None:
    """Drop an address-space limit (enforce_memory) before CUDA starts: its driver maps tens of GiB of
    virtual memory at initialisation, which no limit sized to a task's host memory allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_AS, (hard, hard))


def limit_cuda_memory(limit: int) -> None:
    """Cap what torch's allocator may hold on this process's GPU at ``limit`` bytes (enforce_memory): past
    it, allocations raise torch.cuda.OutOfMemoryError, which the supervisor answers with a larger estimate."""
    import torch

    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, limit / total), 0)


# ---------------------------------------------------------------- measurement


def _reset_peak_rss() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _peak_rss() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _cuda() -> Any | None:
    """torch.cuda if this process has initialised CUDA, else None (never initialises it)."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_initialized():
        return None
    return torch.cuda


class Meter:
    """Measures one phase: wall time, CPU time, peak RSS, peak GPU memory."""

    def __init__(self, phase: Phase, device: str | None) -> None:
        self.phase = phase
        self.device = device
        _reset_peak_rss()
        cuda = _cuda()
        if cuda is not None:
            cuda.reset_peak_memory_stats()
        spans.begin_phase()
        self.started = time.time()
        self._t0 = time.perf_counter()
        self._cpu0 = _cpu_seconds()

    def record(self) -> PhaseRecord:
        duration = time.perf_counter() - self._t0
        cpu_time = _cpu_seconds() - self._cpu0
        finished, host_seen, reserved_seen = spans.end_phase()  # what the spans' resets cleared counts too
        cuda = _cuda()
        peak = _peak_rss()
        return PhaseRecord(
            phase=self.phase,
            device=self.device,
            started=self.started,
            duration=duration,
            cpu_time=cpu_time,
            peak_memory=None if peak is None else max(peak, host_seen),
            peak_gpu_memory=max(int(cuda.max_memory_reserved()), reserved_seen) if cuda is not None else None,
            spans=finished,
        )


# ---------------------------------------------------------------- federated rounds


def load_state(ref: StateRef) -> dict[str, Any]:
    """The global model (or a client's kept state), memory-mapped: every client of a round shares the one copy."""
    from fedsup.engine import tensorfile

    return tensorfile.read_state(ref.path)


def save_state(state: dict[str, Any], path: str, pickled: bool = True) -> None:
    """Atomically: a reader (or a resumed run) sees the whole file or none of it. Not fsync'd here: the
    supervisor makes the round's files durable with one filesystem sync before it commits the round.
    ``pickled``: a ``torch.save`` file (what people load themselves), else fedsup's tensor file."""
    from fedsup.engine import tensorfile

    tensorfile.save_atomic(state, path, pickled=pickled)


def seed_everything(seed: int, cuda: bool) -> None:
    """Seed Python, numpy and torch; torch's CUDA generators only for a task placed on a GPU (seeding them in
    a process without CUDA queues a lazy call that costs a stack trace read from the source files)."""
    import random

    random.seed(seed)
    torch = sys.modules.get("torch")
    if torch is not None:
        if cuda or torch.cuda.is_initialized():
            torch.manual_seed(seed)
        else:
            torch.default_generator.manual_seed(seed)
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        numpy.random.seed(seed % 2**32)


def federated_result(result: Any, method: str, state_path: str | None,
                     contract: dict[str, Any] | None = None) -> dict[str, Any]:
    """Check the result's shape; move the model state out of the pipe into a file."""
    import torch

    returns_state = method in ("train", "initial_state")
    expected = ('{"state": model.state_dict(), "num_examples": n, **metrics}' if returns_state
                else '{"num_examples": n, **metrics}')
    if not isinstance(result, dict):
        raise ResultContractError(f"{method}() must return a dict {expected}, got {type(result).__name__}")
    n = result.get("num_examples")
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise ResultContractError(f"{method}() must return {expected}: num_examples must be a whole number > 0, "
                                  f"got {n!r}")
    if not returns_state:
        return result
    state = result.get("state")
    if not isinstance(state, dict) or not state or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise ResultContractError(f"{method}() must return {expected}: state must be a non-empty dict of "
                                  f"name -> tensor, got {type(state).__name__}")
    problem = check_update(state, contract) if method == "train" else None
    if problem is not None:
        raise ResultContractError(problem)  # a broken contract: never retried, the job fails
    if state_path is not None:
        # an update, read once by the supervisor, is a tensor file; the initial model is the run's first
        # checkpoint, which people load with torch.load
        save_state(state, state_path, pickled=method != "train")
        result = {**result, "state": StateRef(state_path)}
    return result


def save_client_state(state: Any, path: str) -> None:
    """What the client keeps for its next round, beside its update. An empty state leaves no file, and removes
    the one an earlier attempt of this job may have written before it failed."""
    import torch

    if state is None or (isinstance(state, dict) and not state):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise ResultContractError(f"client_state must be a dict of name -> tensor, got {type(state).__name__}"
                                  + (f" with {sorted(map(repr, state))[:5]} keys" if isinstance(state, dict) else ""))
    save_state(state, path)


# ---------------------------------------------------------------- errors


class ResultContractError(Exception):
    """train() or evaluate() broke the federated contract: a bug in the task, so never retried."""


def classify(exc: BaseException) -> ErrorKind:
    """Which retry budget an exception spends. Out-of-memory is a resource problem, not a bug."""
    if isinstance(exc, ResultContractError):
        return "contract"
    runtime_error = str(exc) if isinstance(exc, RuntimeError) else ""
    if isinstance(exc, MemoryError) or any(m in runtime_error for m in _HOST_OOM_MARKERS):
        return "host_oom"
    if isinstance(exc, SystemExit):
        return "exit"
    name = type(exc).__name__
    if name == "OutOfMemoryError" or any(m in runtime_error for m in _CUDA_OOM_MARKERS):
        return "cuda_oom"
    return "exception"


def error_info(exc: BaseException, phase: Phase, device: str | None) -> ErrorInfo:
    kind = classify(exc)
    if isinstance(exc, SystemExit):
        message = f"the task called sys.exit({exc.code!r}) during {phase}(); return or raise instead"
    else:
        message = str(exc)
    return ErrorInfo(
        kind=kind,
        type=f"{type(exc).__module__}.{type(exc).__qualname__}".removeprefix("builtins."),
        message=message,
        traceback="".join(traceback.format_exception(exc)),
        phase=phase,
        device=device,
    )


def stage_fault(fault: Fault | None, phase: Phase) -> None:
    """Make the requested failure happen here, as a real task's would."""
    if fault is None:
        return
    if fault == "exception":
        raise RuntimeError(f"fault injected by fedsup: exception in {phase}")
    if fault == "exit":
        os._exit(3)
    if fault == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    if fault == "hang":
        threading.Event().wait()
    if fault == "cuda_oom":
        import torch

        raise torch.cuda.OutOfMemoryError(
            f"CUDA out of memory. Tried to allocate 2.00 GiB (fault injected by fedsup in {phase})"
        )


# ---------------------------------------------------------------- the command loop


class Worker:
    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.task: Any = None

    def send(self, message: Any) -> None:
        """Pickle first, so an unpicklable result becomes an error message instead of a torn pipe."""
        try:
            data = ForkingPickler.dumps(message)
        except Exception as exc:  # noqa: BLE001 - any pickling failure is the same problem for the user
            if not isinstance(message, PhaseDone):
                raise
            error = ErrorInfo(
                kind="unpicklable",
                type=f"{type(exc).__module__}.{type(exc).__qualname__}".removeprefix("builtins."),
                message=f"the result of {message.phase}() cannot be pickled: {exc}",
                traceback="".join(traceback.format_exception(exc)),
                phase=message.phase,
                device=message.record.device,
            )
            data = ForkingPickler.dumps(PhaseFailed(message.phase, message.record, error))
        self.conn.send_bytes(data)

    def run_phase(self, phase: Phase, device: str | None, fault: Fault | None, call: Callable[[], Any]) -> None:
        meter = Meter(phase, device)
        try:
            stage_fault(fault, phase)
            result = call()
        except BaseException as exc:  # noqa: BLE001 - SystemExit and KeyboardInterrupt are task errors too
            self.send(PhaseFailed(phase, meter.record(), error_info(exc, phase, device)))
            return
        self.send(PhaseDone(phase, meter.record(), result))

    def load(self, command: Load) -> None:
        if command.setup is not None:  # a new task for a process that finished another
            self.task = None
            end_helpers()
            cuda = _cuda()
            if cuda is not None:  # give the last task's cached GPU memory back: the ledger counts it free
                gc.collect()
                cuda.empty_cache()
            place(command.setup)
            limit_threads(command.setup.cpus)
        self.send(Began(os.getpid()))
        self.task = command.task
        self.run_phase("load", None, command.fault, self.task.load)

    def train(self, command: Train) -> None:
        if command.cuda_visible is not None and _cuda() is None:
            os.environ["CUDA_VISIBLE_DEVICES"] = command.cuda_visible
            lift_host_limit()  # CUDA reserves far more address space than any host limit would allow

        def call() -> Any:
            if command.cuda_limit:
                limit_cuda_memory(command.cuda_limit)
            for key, value in command.context.items():
                setattr(self.task, key, load_state(value) if isinstance(value, StateRef) else value)
            if command.seed is not None:
                seed_everything(command.seed, cuda=command.cuda_visible is not None)
            if command.method == "initial_state":
                result = {"state": self.task.initial_state(), "num_examples": 1}
            else:
                result = getattr(self.task, command.method)(command.local_device)
            if command.federated:
                result = federated_result(result, command.method, command.state_path,
                                          command.context.get(UPDATE_CONTRACT))
            if command.client_state_path is not None:
                save_client_state(getattr(self.task, "client_state", None), command.client_state_path)
            return result

        self.run_phase(command.method, command.device, command.fault, call)

    def serve(self) -> None:
        while True:
            try:
                raw = self.conn.recv_bytes()
            except (EOFError, OSError):
                return  # the supervisor is gone: nobody is left to report to
            try:
                command = ForkingPickler.loads(raw)
            except BaseException as exc:  # noqa: BLE001 - e.g. the task's class cannot be imported here
                record = Meter("load", None).record()
                self.send(PhaseFailed("load", record, error_info(exc, "load", None)))
                continue
            if isinstance(command, Exit):
                self.send(Bye())
                return
            if isinstance(command, Load):
                self.load(command)
            elif isinstance(command, Train):
                self.train(command)


def child_main(conn: Connection, spec: ChildSpec) -> None:
    """Entry point of a task's process (spawned directly, or forked by the fork server)."""
    started()
    setup_child(spec)
    Worker(conn).serve()
    end_helpers()
    sys.stdout.flush()
    sys.stderr.flush()
