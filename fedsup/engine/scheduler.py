"""The scheduler: a pending queue, placement on the device ledger, driving each task's process, retries.

Policy lives here; mechanism (processes, pipes, the one wait) lives in the runtime, which tests replace
with a fake to drive this class without a single process.

One pass of the loop: start processes for queued tasks while fewer than ``max_loaded`` are alive (they
LOAD at once, overlapping the training of others); send TRAIN to loaded tasks that fit on a device while
training slots remain; then wait for the next event: a status message, an exit, a signal, or a deadline.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import re
import signal
import statistics
from collections import Counter, OrderedDict, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from fedsup.engine.devices import Device, Inventory
from fedsup.engine.faults import FaultPlan
from fedsup.engine.handle import TaskHandle
from fedsup.engine.launch import Child, ExitInfo, signal_name
from fedsup.engine.messages import Began, Bye, Exit, Load, PhaseDone, PhaseFailed, Train
from fedsup.engine.records import ErrorInfo, ErrorKind, TaskRecord
from fedsup.engine.rundir import RunDir, tail_lines
from fedsup.engine.runtime import CommandNotPicklable, Exited, Message, Runtime, Signalled
from fedsup.engine.states import OUTCOMES, TaskStatus
from fedsup.engine.task import Task
from fedsup.engine.units import format_bytes, parse_bytes
from fedsup.engine.worker import ChildSpec

log = logging.getLogger(__name__)
S = TaskStatus
_KILL_WAIT = 2.0  # seconds between SIGTERM and SIGKILL once the grace period is over
_STARTUP_ALLOWANCE = 60.0  # added to load_timeout until the child reports it has begun loading


_REQUEST = re.compile(r"(?:Unable to allocate|tried to allocate) ([\d.]+) ?(bytes|[KMGT]i?B)", re.IGNORECASE)


def requested_bytes(message: str) -> int:
    """The size a failed allocation asked for, where numpy or torch says it; else 0."""
    match = _REQUEST.search(message)
    if match is None:
        return 0
    unit = match.group(2)
    return parse_bytes(f"{match.group(1).rstrip('.')}{'' if unit == 'bytes' else unit}")


@dataclass(frozen=True)
class Policy:
    max_loaded: int
    max_training: int | None = None
    max_retries: int = 3          # failures: exceptions, crashes, timeouts, sys.exit
    max_interrupts: int = 5       # out of memory, GPU or host: a resource problem, not the task's bug
    max_infra_failures: int = 10  # deaths of the infrastructure (a fork server) in a run: not the tasks' fault
    backoff: float = 0.5          # seconds before retrying after host-memory pressure; doubles each time
    backoff_max: float = 30.0
    oom_growth: float = 1.5       # a CUDA OOM raises the task's estimate by this factor (capped)
    load_timeout: float | None = None
    train_timeout: float | None = None
    grace_period: float = 5.0     # after a stop signal: time for EXIT before SIGTERM, then SIGKILL
    faults: FaultPlan | None = None
    keep_loaded: bool = False     # park a finished task's process, loaded, for the same client's next task
    enforce_memory: bool = False  # hold each task to its estimates: host (RLIMIT_AS), GPU (allocator cap)
    tasks_per_process: int = 1    # >1: a process that finished a task may load another (no fork; less isolation)
    reuse_below: float | None = None  # only after a task that took less (s): where a fresh process costs most
    # label -> at most this many tasks holding it loaded or training at once (Task.labels)
    limits: dict[str, int] = field(default_factory=dict)
    # a copy of an idempotent task training longer than this many times the median train time of its batch
    speculative_after: float | None = None


@dataclass
class Job:
    """A task's ``train`` or ``evaluate`` as one unit of work (federated runs make one per client and round)."""

    task: Task
    task_id: str | None = None     # default: the task's own id
    method: str = "train"
    context: dict[str, Any] = field(default_factory=dict)
    state_path: str | None = None
    seed: int | None = None
    federated: bool = False
    # A short job that builds no model to train (a federated run's initial model): its process is not kept
    # for the task's next job, and the cold fork server may start it beyond its budget.
    one_off: bool = False
    client_state_path: str | None = None  # federated train: where the task's client_state is saved after it
    # several runs on one scheduler (a sweep): the run's own directory, and a name that keeps its task ids and
    # parked processes apart from the other runs'
    run_dir: RunDir | None = None
    namespace: str = ""


class Scheduler:
    def __init__(self, policy: Policy, inventory: Inventory, runtime: Runtime, run_dir: RunDir | None = None,
                 host_memory: int | None = None) -> None:
        self.policy = policy
        self.inventory = inventory
        self.runtime = runtime
        self.run_dir = run_dir
        self.host_memory = host_memory
        self.handles: list[TaskHandle] = []
        self.ready: deque[TaskHandle] = deque()                 # queued, may start now
        self.delayed: list[tuple[float, int, TaskHandle]] = []  # queued behind a back-off
        self.waiting: list[TaskHandle] = []                     # loaded, waiting for a device
        self.procs: dict[Child, TaskHandle | None] = {}         # every live process; None once detached
        self.proc_memory: dict[Child, int] = {}                 # host memory reserved per live process
        self.idle: OrderedDict[str, Child] = OrderedDict()      # loaded, parked processes by client key
        self.idle_resident: dict[Child, str | None] = {}
        self.served: dict[Child, int] = {}                      # tasks each live process has loaded
        self.no_reuse: set[Child] = set()                       # ran a long task: never takes another one
        self.exit_deadlines: dict[Child, tuple[float, int]] = {}  # told to exit: (when to escalate, stage)
        self.outstanding = 0                                    # submitted handles without an outcome
        self.peak_procs = 0                                     # the most processes alive at once
        self.host_reserved = 0
        self.training = 0
        self.stop_signal: int | None = None
        self.stop_stage = 0           # 0 running, 1 EXIT sent, 2 SIGTERM sent, 3 SIGKILL sent
        self.stop_deadline: float | None = None
        self._seq = itertools.count()
        self.main_pid = os.getpid()
        self._batches = itertools.count(1)
        self.train_times: dict[int, list[float]] = {}           # per batch: finished train phases (s)
        self._medians: dict[int, tuple[int, float]] = {}

    # ------------------------------------------------------------ submitting

    def submit(self, tasks: Iterable[Task | Job]) -> list[TaskHandle]:
        jobs = [t if isinstance(t, Job) else Job(t) for t in tasks]
        # Earlier batches' handles that reached their outcome are done with: kept, a session of many batches
        # (a federated run's rounds) would hold every job it ever ran and check each new id against them all.
        self.handles = [h for h in self.handles if h.status not in OUTCOMES]
        batch = next(self._batches)
        live = {h.batch for h in self.handles} | {batch}
        self.train_times = {b: t for b, t in self.train_times.items() if b in live}
        self._medians = {b: m for b, m in self._medians.items() if b in live}
        seen = {(h.namespace, h.task_id) for h in self.handles}
        for job in jobs:
            if not isinstance(job.task, Task):
                raise TypeError(f"tasks: expected fedsup.Task instances, got {type(job.task).__name__}")
            task_id = job.task_id or job.task.task_id
            if (job.namespace, task_id) in seen:
                raise ValueError(f"task_id: {task_id!r} appears more than once; task ids must be unique")
            seen.add((job.namespace, task_id))
            self.inventory.candidates(job.task.device)  # an unknown pin is an error now, not mid-run
        handles = []
        for job in jobs:
            handle = TaskHandle(job.task, len(self.handles), self._on_transition, task_id=job.task_id,
                                method=job.method, context=job.context, state_path=job.state_path, seed=job.seed,
                                federated=job.federated, one_off=job.one_off,
                                client_state_path=job.client_state_path, run_dir=job.run_dir,
                                namespace=job.namespace)
            handle.batch = batch
            self.handles.append(handle)
            handles.append(handle)
            self.outstanding += 1
            reason = self._never_fits(handle)
            if reason is not None:
                handle.error = ErrorInfo(kind="placement", type="PlacementError", message=reason,
                                         estimate_cuda_memory=handle.estimate_cuda)
                handle.reason = reason
                handle.transition(S.FAILED, reason=reason)
            else:
                self.ready.append(handle)
        return handles

    def _never_fits(self, handle: TaskHandle) -> str | None:
        task = handle.task
        if self.host_memory is not None and handle.estimate_host > self.host_memory:
            return (f"estimate_memory {format_bytes(handle.estimate_host)} is more than this machine can give a "
                    f"task ({format_bytes(self.host_memory)})")
        gpus = [d for d in self.inventory.candidates(task.device) if d.is_gpu]
        if not gpus:
            return None
        largest = max(self.inventory.capacity(d) for d in gpus)
        if handle.estimate_cuda > largest:
            best = max(gpus, key=self.inventory.capacity)
            return (f"estimate_cuda_memory {format_bytes(handle.estimate_cuda)} does not fit on any device: the "
                    f"largest, {best.name} ({format_bytes(best.total)}), can give a task at most "
                    f"{format_bytes(largest)} after the margin and a CUDA context")
        return None

    # ------------------------------------------------------------ the loop

    def run(self, tasks: Iterable[Task | Job]) -> list[TaskRecord]:
        """Run every task to an outcome, then let every process go; one record per task, in order."""
        handles = self.submit(tasks)
        self.run_until_done()
        self.close()
        return [h.to_record() for h in handles]

    def run_until_done(self) -> None:
        """Loop until every submitted task has an outcome (after a stop: until every process is gone too)."""
        while self.outstanding or (self.stop_signal is not None and self.procs):
            self.step()

    def step(self) -> None:
        self.admit()
        self.dispatch()
        self._speculate()
        events = self.runtime.wait(list(self.procs), self.next_timeout())
        for event in events:
            self.handle_event(event)
        self.check_deadlines()
        error = self.runtime.take_error()
        if error is not None:  # after the exits above are handled, so that every process is accounted for
            raise error

    def close(self) -> None:
        """Let parked processes go and wait for every process to exit; kill what outlives the grace period."""
        for child in list(self.idle.values()):
            self._tell_exit(child)
        self.forget_parked()
        while self.procs:
            self.step()

    def forget_parked(self) -> None:
        """No parked process is one to adopt any more: each is being ended, and its exit is not news."""
        self.idle.clear()
        self.idle_resident.clear()

    def done(self) -> bool:
        return not self.procs and self.outstanding == 0

    def records(self) -> list[TaskRecord]:
        return [h.to_record() for h in self.handles]

    def next_timeout(self) -> float | None:
        now = self.runtime.now()
        times = [h.deadline for h in self.procs.values() if h is not None and h.deadline is not None]
        if self.delayed and self.stop_signal is None:
            times.append(self.delayed[0][0])
        if self.stop_deadline is not None:
            times.append(self.stop_deadline)
        times.extend(when for when, _ in self.exit_deadlines.values())
        times.extend(t for t in self._speculation_times() if t > now)
        return max(0.0, min(times) - now) if times else None

    # ------------------------------------------------------------ starting and placing

    def admit(self) -> None:
        if self.stop_signal is not None:
            return
        now = self.runtime.now()
        while self.delayed and self.delayed[0][0] <= now:
            self.ready.append(heapq.heappop(self.delayed)[2])
        held = self._labels_held()
        while self.ready:
            handle = self._next_ready(held)
            if handle is None:
                return  # every ready task holds a label at its limit
            parked = self.idle.pop(handle.key, None)
            if parked is not None:
                self._take(handle, held)
                self.adopt(handle, parked)
                continue
            full = len(self.procs) >= self.policy.max_loaded
            # a process that would only queue behind the warm server's warm-up is not asked for: a parked one
            # may free up first
            can_start = not full and self.runtime.can_spawn(handle.one_off)
            spare = self._reusable(handle) if (not can_start or not self.policy.keep_loaded) else None
            if spare is not None:
                self._take(handle, held)
                self.reuse(handle, spare)
                continue
            if full:
                self._evict_idle()
                return
            if not can_start:
                return
            need = handle.estimate_host
            if self.host_memory is not None and self.procs and self.host_reserved + need > self.host_memory:
                self._evict_idle()
                return  # wait for memory to come back; first in, first out
            self._take(handle, held)
            self.start(handle)

    def _labels_held(self) -> Counter[str]:
        """How many tasks holding each limited label are loaded or training (a parked process's task is done)."""
        held: Counter[str] = Counter()
        if self.policy.limits:
            for handle in self.procs.values():
                if handle is not None:
                    held.update(x for x in handle.task.labels if x in self.policy.limits)
        return held

    def _next_ready(self, held: Counter[str]) -> TaskHandle | None:
        """The first ready task whose labels are all under their limits: first in, first out, except that a
        task waiting for its label does not hold up the ones behind it."""
        limits = self.policy.limits
        if not limits:
            return self.ready[0]
        return next((h for h in self.ready if all(held[x] < limits.get(x, held[x] + 1) for x in h.task.labels)),
                    None)

    def _take(self, handle: TaskHandle, held: Counter[str]) -> None:
        if self.ready[0] is handle:
            self.ready.popleft()
        else:
            self.ready.remove(handle)
        held.update(x for x in handle.task.labels if x in self.policy.limits)

    def _reusable(self, handle: TaskHandle) -> Child | None:
        """A parked process that may take ``handle`` (tasks_per_process allows it, no queued task wants it,
        and any GPU it holds a context on is one the task may use)."""
        if self.policy.tasks_per_process <= 1 or not self.idle:
            return None
        wanted = {h.key for h in self.ready} if self.policy.keep_loaded else set()
        allowed = {d.name for d in self.inventory.candidates(handle.task.device)}
        for key, child in self.idle.items():
            resident = self.idle_resident.get(child)
            if (key not in wanted and self.served.get(child, 0) < self.policy.tasks_per_process
                    and child not in self.no_reuse and (resident is None or resident in allowed)):
                del self.idle[key]
                return child
        return None

    def adopt(self, handle: TaskHandle, child: Child) -> None:
        """The next task of a client takes over its parked, loaded process: no start, no LOAD."""
        handle.child = child
        handle.kill_reason = None
        handle.timed_out = None
        handle.resident = self.idle_resident.pop(child, None)
        self.procs[child] = handle
        handle.begin_attempt(child.pid)
        handle.transition(S.WAITING, adopted=True)
        self.waiting.append(handle)

    def _evict_idle(self) -> bool:
        """Make room: the parked process least recently used, of a client nobody queued, is told to exit."""
        if not self.idle:
            return False
        wanted = {h.key for h in self.ready}
        key = next((k for k in self.idle if k not in wanted), next(iter(self.idle)))
        child = self.idle.pop(key)
        self.idle_resident.pop(child, None)
        self._tell_exit(child)
        return True

    def let_go(self, namespace: str) -> None:
        """A run of a sweep is over: its parked processes exit (no job of it will adopt them)."""
        for key in [k for k in self.idle if k.startswith(f"{namespace}/")]:
            child = self.idle.pop(key)
            self.idle_resident.pop(child, None)
            self._tell_exit(child)

    def _tell_exit(self, child: Child) -> None:
        """EXIT, with a deadline: a process that does not leave in the grace period is terminated, then killed."""
        self.runtime.send(child, Exit())
        self.exit_deadlines[child] = (self.runtime.now() + self.policy.grace_period, 0)

    def _spec(self, handle: TaskHandle) -> ChildSpec:
        """Where the task's process works and writes, and its limits."""
        task = handle.task
        workdir = stdout = stderr = None
        run_dir = self._dir(handle)
        if run_dir is not None:
            directory = run_dir.task_dir(handle.folder)
            directory.mkdir(parents=True, exist_ok=True)
            workdir, stdout, stderr = str(directory), str(directory / "stdout.log"), str(directory / "stderr.log")
            handle.stderr_offset = (directory / "stderr.log").stat().st_size if os.path.exists(stderr) else 0
        limit = handle.estimate_host if (self.policy.enforce_memory and handle.estimate_host) else None
        return ChildSpec(task.task_id, task.cpus, workdir, stdout, stderr, parent_pid=self.main_pid,
                         memory_limit=limit, one_off=handle.one_off)

    def _attach(self, handle: TaskHandle, child: Child) -> None:
        handle.child = child
        handle.kill_reason = None
        handle.timed_out = None
        self.procs[child] = handle
        self.peak_procs = max(self.peak_procs, len(self.procs))
        self.host_reserved += handle.estimate_host - self.proc_memory.get(child, 0)
        self.proc_memory[child] = handle.estimate_host

    def start(self, handle: TaskHandle) -> None:
        spec = self._spec(handle)
        child = self.runtime.spawn(spec)
        self._attach(handle, child)
        handle.resident = None
        handle.begin_attempt()
        handle.transition(S.AVAILABLE)
        self._load(handle, child)

    def reuse(self, handle: TaskHandle, child: Child) -> None:
        """A process that finished another task loads this one (tasks_per_process > 1): no fork."""
        self._attach(handle, child)
        handle.resident = self.idle_resident.pop(child, None)
        handle.begin_attempt(child.pid)
        handle.transition(S.AVAILABLE, reused=True)
        self._load(handle, child, self._spec(handle))

    def _load(self, handle: TaskHandle, child: Child, setup: ChildSpec | None = None) -> None:
        task = handle.task
        self.served[child] = self.served.get(child, 0) + 1
        fault = self._fault(handle, "load")
        # until the child says it has begun: the process may wait for a fork server still warming up
        timeout = self.policy.load_timeout
        self._set_deadline(handle, "load", None if timeout is None else timeout + _STARTUP_ALLOWANCE)
        handle.transition(S.LOADING, fault=fault)
        try:
            self.runtime.send(child, Load(task, fault, setup))
        except CommandNotPicklable as exc:
            error = ErrorInfo(kind="unpicklable", type=type(exc.cause).__name__, phase="load",
                              message=f"the task object cannot be pickled to its process: {exc.cause}")
            self._release(handle)
            self._fail_attempt(handle, S.EXCEPTION, error)

    def dispatch(self) -> None:
        if self.stop_signal is not None:
            return
        for handle in list(self.waiting):
            if self.policy.max_training is not None and self.training >= self.policy.max_training:
                return
            device = self.inventory.place(handle.slot, handle.estimate_cuda, handle.task.cpus,
                                          self._candidates(handle), handle.resident)
            if device is None:
                continue
            self.waiting.remove(handle)
            self.train(handle, device)
        if self.waiting and self.training == 0 and any(r for r in self.idle_resident.values()):
            self._evict_idle()  # parked processes hold GPU memory that a waiting task needs

    def _candidates(self, handle: TaskHandle) -> list[Device]:
        """Where the task may train: its own choices, narrowed to the GPU its process already has a context on
        (CUDA_VISIBLE_DEVICES cannot change once CUDA is initialised)."""
        candidates = self.inventory.candidates(handle.task.device)
        if handle.resident is not None:
            candidates = [d for d in candidates if d.name == handle.resident]
        return candidates

    def train(self, handle: TaskHandle, device: Device) -> None:
        assert handle.child is not None
        handle.device = device
        if handle.attempt is not None:
            handle.attempt.device = device.name
        self.training += 1
        if device.is_gpu and handle.child.pid is not None:
            device.pids[handle.slot] = handle.child.pid
        handle.train_began = self.runtime.now()
        fault = self._fault(handle, handle.method)
        self._set_deadline(handle, handle.method, self.policy.train_timeout)
        visible = str(device.index) if device.is_gpu else None
        local = "cuda:0" if device.is_gpu else "cpu"
        enforced = self.policy.enforce_memory and device.is_gpu and handle.estimate_cuda > 0
        command = Train(device.name, local, visible, fault, handle.method, handle.context,  # type: ignore[arg-type]
                        handle.federated, handle.state_path, handle.seed, handle.estimate_cuda if enforced else None,
                        handle.client_state_path)
        self.runtime.send(handle.child, command)
        handle.transition(S.TRAINING, device=device.name, fault=fault)

    def _fault(self, handle: TaskHandle, phase: str) -> Any:
        if self.policy.faults is None or handle.primary is not None:
            return None  # a speculative copy races its original as the task is: no injected fault
        fault = self.policy.faults.pick(handle.task_id, len(handle.history), phase,  # type: ignore[arg-type]
                                        handle.faults_injected)
        if fault is not None:
            handle.faults_injected += 1
        return fault

    def _set_deadline(self, handle: TaskHandle, phase: str, timeout: float | None) -> None:
        handle.phase = phase  # type: ignore[assignment]
        handle.deadline = None if timeout is None else self.runtime.now() + timeout

    def _release(self, handle: TaskHandle) -> None:
        if handle.device is not None:
            if handle.device.is_gpu:
                handle.resident = handle.device.name
            self.inventory.release(handle.slot, handle.device, handle.task.cpus)
            handle.device = None
            self.training -= 1
        handle.deadline = None
        handle.phase = None

    def _park(self, handle: TaskHandle) -> None:
        """Keep a finished task's process loaded for its client's next task, unless the run is stopping."""
        child = handle.child
        if child is None or handle.one_off or self.stop_signal is not None:
            self._detach(handle)
            return
        may_reuse = self.served.get(child, 0) < self.policy.tasks_per_process
        if may_reuse and not self._short(handle, child):
            self.no_reuse.add(child)  # the same client may still adopt it (keep_loaded), no other task
            may_reuse = False
        if not (self.policy.keep_loaded or may_reuse):
            self._detach(handle)
            return
        self.procs[child] = None
        self.idle[handle.key] = child
        self.idle_resident[child] = handle.resident
        handle.child = None

    def _short(self, handle: TaskHandle, child: Child) -> bool:
        """Whether the task just finished ran for less than ``reuse_below``: a fresh process for the next task
        would then cost a large share of what the task itself cost. The first task of a process that started
        cold paid torch's first-use costs (~1-2 s) that its next task will not: it is not judged."""
        limit, attempt = self.policy.reuse_below, handle.attempt
        if limit is None or attempt is None or (not child.warm and self.served.get(child, 0) == 1):
            return True
        phases = (attempt.load, attempt.train, attempt.evaluate, attempt.initial_state)
        return sum(p.duration for p in phases if p is not None) < limit

    def _detach(self, handle: TaskHandle) -> None:
        """Tell the process to exit and stop tying it to the task; its exit is still awaited and reaped."""
        child = handle.child
        if child is not None:
            self._tell_exit(child)
            self.procs[child] = None
            handle.child = None
        if handle in self.waiting:
            self.waiting.remove(handle)

    # ------------------------------------------------------------ events

    def handle_event(self, event: Any) -> None:
        if isinstance(event, Signalled):
            self.request_stop(event.signum)
        elif isinstance(event, Message):
            handle = self.procs.get(event.child)
            # a phase that ends while its timeout kill is on the way still counts as timed out
            if handle is not None and handle.child is event.child and handle.kill_reason != "timeout":
                self.on_message(handle, event.message)
        elif isinstance(event, Exited):
            self.on_exit(event.child, event.exit)

    def on_message(self, handle: TaskHandle, message: Any) -> None:
        if isinstance(message, PhaseDone):
            handle.note_phase(message.record)
            if message.phase == "load":
                handle.deadline = handle.phase = None
                handle.transition(S.WAITING)
                if self.stop_signal is None:
                    self.waiting.append(handle)
            else:
                self._release(handle)
                if message.phase == "train":
                    self.train_times.setdefault(handle.batch, []).append(message.record.duration)
                if handle.primary is not None:
                    self._copy_won(handle, message)
                    return
                handle.result = message.result
                handle.error = None
                handle.end_attempt(S.FINISHED)
                if handle.rival is not None:
                    self._end_copy(handle.rival, "its original finished first")
                handle.transition(S.FINISHED, device=message.record.device)
                self._park(handle)
        elif isinstance(message, PhaseFailed):
            handle.note_phase(message.record)
            self._release(handle)
            error = message.error
            error.stderr_tail = self._stderr_tail(handle) or None
            error.estimate_cuda_memory = handle.estimate_cuda
            status = S.INTERRUPT if error.kind in ("cuda_oom", "host_oom") else S.EXCEPTION
            self._fail_attempt(handle, status, error)
        elif isinstance(message, Began):
            if handle.attempt is not None:
                handle.attempt.pid = message.pid
            if handle.status is S.LOADING and self.policy.load_timeout is not None:
                handle.deadline = self.runtime.now() + self.policy.load_timeout
        elif isinstance(message, Bye):
            pass
        elif isinstance(message, Exception):
            log.warning("task %s sent an unreadable message: %s", handle.task_id, message)

    def on_exit(self, child: Child, info: ExitInfo) -> None:
        if child not in self.procs:
            return
        handle = self.procs.pop(child)
        self.exit_deadlines.pop(child, None)
        self.served.pop(child, None)
        self.no_reuse.discard(child)
        self.host_reserved -= self.proc_memory.pop(child, 0)
        if child in self.idle_resident:  # a parked process died between rounds: its client loads afresh
            self.idle_resident.pop(child)
            self.idle = OrderedDict((k, c) for k, c in self.idle.items() if c is not child)
            log.warning("a parked process (pid %s) exited: %s", child.pid, info.describe())
        if handle is None or handle.child is not child:
            return  # a detached process that exited as told
        self._release(handle)
        handle.child = None
        if handle.attempt is not None and handle.attempt.pid is None:
            handle.attempt.pid = child.pid
        if self.stop_signal is not None and handle.kill_reason != "timeout":
            self._cancel(handle, f"the run was stopped by {signal_name(self.stop_signal)}")
            return
        status, error = self._diagnose(handle, info)
        infrastructure = info.infrastructure if handle.kill_reason != "timeout" else None
        self._fail_attempt(handle, status, error, infrastructure)

    def _diagnose(self, handle: TaskHandle, info: ExitInfo) -> tuple[TaskStatus, ErrorInfo]:
        """Name what killed the process and the likely cause, with the facts to check it."""
        phase = handle.timed_out or {S.TRAINING: handle.method, S.LOADING: "load"}.get(handle.status)
        where = f" during {phase}()" if phase else f" while {handle.status.value.lower()}"
        kind: ErrorKind = "crash"
        status = S.CRASHED
        if handle.kill_reason == "timeout":
            limit = self.policy.load_timeout if phase == "load" else self.policy.train_timeout
            kind, status = "timeout", S.TIMEOUT
            message = f"{phase}() ran past its {limit or 0:g} s timeout and was killed (SIGKILL)"
        elif info.cause is not None:
            message = f"{info.cause}{where}"
            if info.infrastructure is not None:
                message += (f": infrastructure death {info.infrastructure} of the run "
                            f"(max_infra_failures={self.policy.max_infra_failures}), not charged to the task")
        elif info.signal == signal.SIGKILL:
            kind = "host_oom"
            message = (f"the process was killed by SIGKILL{where}, which fedsup did not send: most likely the "
                       f"kernel's out-of-memory killer (see `dmesg`), or another process")
        elif info.signal == signal.SIGSEGV:
            message = f"the process crashed with a segmentation fault (SIGSEGV){where}: a bug in native code"
        elif info.signal is not None:
            message = f"the process was {info.describe()}{where}"
        elif info.code == 0:
            message = f"the process exited with code 0{where} without being told to (a library called exit?)"
        else:
            message = (f"the process exited with code {info.code}{where} without being told to "
                       f"(os._exit, or a library that calls exit())")
        device = handle.attempt.device if handle.attempt else None
        kind_name = {"timeout": "Timeout"}.get(kind, "ProcessCrashed")
        if info.infrastructure is not None and kind != "timeout":
            kind_name = "InfrastructureDeath"
        error = ErrorInfo(kind=kind, type=kind_name, message=message,
                          phase=phase, exit_code=info.code,  # type: ignore[arg-type]
                          signal=signal_name(info.signal) if info.signal else None, device=device,
                          estimate_cuda_memory=handle.estimate_cuda, stderr_tail=self._stderr_tail(handle) or None)
        return status, error

    def _stderr_tail(self, handle: TaskHandle) -> list[str]:
        run_dir = self._dir(handle)
        if run_dir is None:
            return []
        return tail_lines(run_dir.task_dir(handle.folder) / "stderr.log", handle.stderr_offset)

    # ------------------------------------------------------------ retries

    def _fail_attempt(self, handle: TaskHandle, status: TaskStatus, error: ErrorInfo,
                      infrastructure: int | None = None) -> None:
        """``infrastructure``: the attempt was lost with its fork server (the how-manyth such death of the
        run): the run's infrastructure budget is spent, not the task's."""
        if handle.primary is not None:
            self._copy_failed(handle, status, error)
            return
        if handle.rival is not None:
            self._end_copy(handle.rival, "its original failed")
        handle.error = error
        handle.end_attempt(status, error)
        handle.transition(status, kind=error.kind, error=error.summary(), infrastructure=infrastructure)
        self._detach(handle)
        if infrastructure is not None:
            verdict = self._infrastructure_verdict(infrastructure)
        else:
            verdict = self._retry_verdict(handle, error)
        if self.stop_signal is not None:
            self._cancel(handle, "the run was stopped")
        elif verdict is not None:
            handle.reason = verdict
            handle.transition(S.FAILED, reason=verdict)
        else:
            handle.transition(S.INIT, retry=handle.numbered + 1, estimate_cuda_memory=handle.estimate_cuda,
                              infrastructure=infrastructure)
            if handle.not_before > self.runtime.now():
                heapq.heappush(self.delayed, (handle.not_before, next(self._seq), handle))
            else:
                self.ready.append(handle)

    def _infrastructure_verdict(self, death: int) -> str | None:
        """Requeue a task lost with its fork server, unless the run's infrastructure has died too often."""
        budget = self.policy.max_infra_failures
        if death > budget:
            return (f"its fork server died, infrastructure death {death} of the run, past its budget "
                    f"(max_infra_failures={budget}): the machine or something on it keeps killing fedsup's processes")
        return None

    def _retry_verdict(self, handle: TaskHandle, error: ErrorInfo) -> str | None:
        """Spend the right budget; return why the task fails for good, or None to retry."""
        policy = self.policy
        if error.kind == "contract":
            return "its result breaks the federated contract; retrying would not change it"
        if error.kind == "unpicklable" and error.phase == "load":
            return "the task object cannot be pickled; retrying would not change it"
        if error.kind == "cuda_oom":
            cap = max((self.inventory.capacity(d) for d in self.inventory.candidates(handle.task.device)
                       if d.is_gpu), default=0)
            if cap and handle.estimate_cuda >= cap:
                return ("out of GPU memory with its estimate already at the largest device's capacity "
                        f"({format_bytes(cap)})")
            handle.interrupts += 1
            if handle.interrupts > policy.max_interrupts:
                return f"out of memory {handle.interrupts} times (max_interrupts={policy.max_interrupts})"
            grown = max(int(handle.estimate_cuda * policy.oom_growth), handle.estimate_cuda + 256 * 1024**2)
            handle.estimate_cuda = min(grown, cap) if cap else grown
            return None
        if error.kind == "host_oom":
            if policy.enforce_memory and handle.estimate_host:
                cap = self.host_memory or handle.estimate_host
                if handle.estimate_host >= cap:
                    return (f"needs more host memory than this machine can give a task ({format_bytes(cap)}): it ran "
                            f"out at an estimate of {format_bytes(handle.estimate_host)}")
                grown = max(int(handle.estimate_host * policy.oom_growth),
                            handle.estimate_host + requested_bytes(error.message))
                handle.estimate_host = min(grown, cap)
            handle.interrupts += 1
            if handle.interrupts > policy.max_interrupts:
                return f"out of host memory {handle.interrupts} times (max_interrupts={policy.max_interrupts})"
            delay = min(policy.backoff * 2 ** (handle.interrupts - 1), policy.backoff_max)
            handle.not_before = self.runtime.now() + delay
            return None
        handle.failures += 1
        if handle.failures > policy.max_retries:
            return f"failed {handle.failures} times (max_retries={policy.max_retries})"
        return None

    def _cancel(self, handle: TaskHandle, reason: str) -> None:
        if handle.status in OUTCOMES:
            return
        if handle.rival is not None:  # before the record is written: the copy's attempt belongs in it
            self._end_copy(handle.rival, reason)
        handle.end_attempt(S.CANCELLED, handle.error)
        handle.reason = reason
        handle.transition(S.CANCELLED, reason=reason)
        primary = handle.primary
        if primary is not None and primary.rival is handle and handle.attempt is not None:
            primary.rival = None
            primary.take_attempt(handle.attempt)

    def _on_transition(self, handle: TaskHandle, old: TaskStatus, new: TaskStatus, info: dict[str, Any]) -> None:
        self.outstanding += (old in OUTCOMES) - (new in OUTCOMES)
        run_dir = self._dir(handle)
        if run_dir is not None:
            if new in OUTCOMES:
                # the record first: an event that says FINISHED always has its record, so a run killed
                # between the two never runs that task again on --resume
                run_dir.write_record(handle.to_record())
            self._event(handle, new.value, old.value, **info)

    def _dir(self, handle: TaskHandle) -> RunDir | None:
        return handle.run_dir if handle.run_dir is not None else self.run_dir

    def _event(self, handle: TaskHandle, status: str, previous: str, **info: Any) -> None:
        run_dir = self._dir(handle)
        if run_dir is None:
            return
        child = handle.child
        attempt = handle.attempt.attempt if handle.attempt is not None else 0
        run_dir.event(task=handle.task_id, attempt=attempt, status=status, previous=previous,
                           pid=child.pid if child is not None else None,
                           **{k: v for k, v in info.items() if v is not None})

    def _on_copy_transition(self, handle: TaskHandle, old: TaskStatus, new: TaskStatus,
                            info: dict[str, Any]) -> None:
        """A speculative copy's steps go to the event log under its own attempt number; the task's outcome and
        record stay its original's."""
        self._event(handle, new.value, old.value, speculative=True, **info)

    # ------------------------------------------------------------ speculative copies of stragglers

    def _median_train(self, batch: int) -> float | None:
        times = self.train_times.get(batch)
        if not times:
            return None
        cached = self._medians.get(batch)
        if cached is None or cached[0] != len(times):
            cached = self._medians[batch] = (len(times), statistics.median(times))
        return cached[1]

    def _straggler_due(self, handle: TaskHandle | None) -> float | None:
        """When this task, training, becomes a straggler worth a copy; None if it never may."""
        after = self.policy.speculative_after
        if (after is None or handle is None or handle.primary is not None or handle.speculated
                or not handle.idempotent or handle.status is not S.TRAINING or handle.method != "train"
                or handle.train_began is None):
            return None
        median = self._median_train(handle.batch)
        return None if median is None else handle.train_began + after * median

    def _may_speculate(self) -> bool:
        """Copies only in a run that asks for them, is not stopping, and has nothing queued or waiting."""
        return (self.policy.speculative_after is not None and self.stop_signal is None
                and not self.ready and not self.waiting)

    def _speculation_times(self) -> list[float]:
        if not self._may_speculate():
            return []
        due = (self._straggler_due(h) for h in self.procs.values())
        return [t for t in due if t is not None]

    def _speculate(self) -> None:
        """Start a copy of each straggler, on a slot nothing queued wants (none is taken from real work)."""
        if not self._may_speculate():
            return
        now = self.runtime.now()
        for handle in list(self.procs.values()):
            due = self._straggler_due(handle)
            if handle is None or due is None or due > now:
                continue
            if not self._room_for_copy(handle):
                return
            copy = handle.spawn_copy(self._on_copy_transition)
            log.info("task %s has trained %.1f s, past %g x its batch's median: a speculative copy starts",
                     handle.task_id, now - (handle.train_began or now), self.policy.speculative_after)
            self.start(copy)

    def _room_for_copy(self, handle: TaskHandle) -> bool:
        cpu, policy = self.inventory.cpu, self.policy
        held = self._labels_held()  # a copy holds its original's labels too
        if any(held[x] >= policy.limits[x] for x in handle.task.labels if x in policy.limits):
            return False
        return (len(self.procs) < policy.max_loaded and self.runtime.can_spawn(False)
                and cpu.used_cores + handle.task.cpus <= cpu.cores
                and (policy.max_training is None or self.training < policy.max_training)
                and (self.host_memory is None or self.host_reserved + handle.estimate_host <= self.host_memory))

    def _stop_process(self, handle: TaskHandle) -> None:
        """End a racer's process at once: its work is not needed. Its exit is still awaited and reaped."""
        self._release(handle)
        if handle in self.waiting:
            self.waiting.remove(handle)
        child = handle.child
        if child is not None:
            self.procs[child] = None
            handle.child = None
            self.runtime.kill(child, signal.SIGKILL)

    def _end_copy(self, copy: TaskHandle, why: str) -> None:
        """The copy lost (or its original failed): ended, its attempt kept in the task's history."""
        primary = copy.primary
        assert primary is not None
        self._stop_process(copy)
        error = ErrorInfo(kind="superseded", type="Superseded", message=f"speculative copy ended: {why}")
        copy.end_attempt(S.CANCELLED, error)
        copy.transition(S.CANCELLED, reason=why)
        primary.rival = None
        if copy.attempt is not None:
            primary.take_attempt(copy.attempt)

    def _copy_won(self, copy: TaskHandle, message: PhaseDone) -> None:
        """The copy finished first: its result is the task's, its process the task's from now on (parked for
        the client's next round), and the original is ended."""
        primary = copy.primary
        assert primary is not None and copy.attempt is not None
        copy.end_attempt(S.FINISHED)
        copy.transition(S.FINISHED, device=message.record.device)
        self._stop_process(primary)
        why = "its speculative copy finished first"
        primary.end_attempt(S.CANCELLED, ErrorInfo(kind="superseded", type="Superseded", message=why))
        self._event(primary, S.CANCELLED.value, S.TRAINING.value, reason=why, superseded=True)
        primary.rival = None
        primary.take_attempt(copy.attempt, current=True)
        primary.result, primary.error = message.result, None
        primary.resident = copy.resident
        child, copy.child = copy.child, None
        if child is not None:
            primary.child = child
            self.procs[child] = primary
        primary.transition(S.FINISHED, device=message.record.device, speculative=True)
        # not parked: the copy's process works and logs in the copy's folder, where the client's later jobs
        # do not look; the client loads afresh next time
        self._detach(primary)

    def _copy_failed(self, copy: TaskHandle, status: TaskStatus, error: ErrorInfo) -> None:
        """A copy that failed costs its original nothing: the original goes on, the attempt is kept."""
        primary = copy.primary
        assert primary is not None
        copy.error = error
        copy.end_attempt(status, error)
        copy.transition(status, kind=error.kind, error=error.summary())
        self._detach(copy)
        if primary.rival is copy and copy.attempt is not None:
            primary.rival = None
            primary.take_attempt(copy.attempt)

    # ------------------------------------------------------------ deadlines and shutdown

    def check_deadlines(self) -> None:
        now = self.runtime.now()
        for child, handle in list(self.procs.items()):
            if handle is not None and handle.deadline is not None and handle.deadline <= now:
                handle.deadline = None
                handle.kill_reason = "timeout"
                handle.timed_out = handle.phase
                self.runtime.kill(child, signal.SIGKILL)
        for child, (when, stage) in list(self.exit_deadlines.items()):
            if when <= now:
                sent = "SIGKILL" if stage else "SIGTERM"
                log.warning("process %s did not exit when told; sending %s", child.pid, sent)
                self.runtime.kill(child, signal.SIGKILL if stage else signal.SIGTERM)
                if stage:
                    del self.exit_deadlines[child]
                else:
                    self.exit_deadlines[child] = (now + _KILL_WAIT, 1)
        if self.stop_deadline is not None and self.stop_deadline <= now:
            self._escalate()

    def request_stop(self, signum: int) -> None:
        """Stop admitting; EXIT everything; after the grace period SIGTERM, then SIGKILL. Again: kill now."""
        if self.stop_signal is not None:
            log.warning("second %s: killing every task process now", signal_name(signum))
            self.stop_stage = 2
            self._escalate()
            return
        log.warning("%s received: stopping (EXIT now, SIGTERM in %g s)", signal_name(signum), self.policy.grace_period)
        self.stop_signal = signum
        while self.ready:
            self._cancel(self.ready.popleft(), f"the run was stopped by {signal_name(signum)}")
        for _, _, handle in self.delayed:
            self._cancel(handle, f"the run was stopped by {signal_name(signum)}")
        self.delayed.clear()
        self.waiting.clear()
        self.forget_parked()
        for child in self.procs:
            self.runtime.send(child, Exit())
        self.stop_stage = 1
        self.stop_deadline = self.runtime.now() + self.policy.grace_period

    def _escalate(self) -> None:
        sig = signal.SIGTERM if self.stop_stage == 1 else signal.SIGKILL
        for child, handle in self.procs.items():
            if handle is not None:
                handle.kill_reason = handle.kill_reason or "shutdown"
            self.runtime.kill(child, sig)
        self.stop_stage += 1
        self.stop_deadline = self.runtime.now() + _KILL_WAIT if self.stop_stage < 3 else None
