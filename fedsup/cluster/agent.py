"""The node agent: one per Ray node, an actor pinned there, running the local engine for the driver.

The agent holds a local ``Supervisor`` session (fork servers, the memory ledger over the node's GPUs through
NVML, crash classification, measurement, process reuse, memory limits) on one thread of its own, the engine
thread, which alone touches the scheduler. The driver calls three methods, each on a thread of the actor's
pool: ``submit`` (jobs to run: their shipped inputs are mapped into this node's shared memory first, and the
engine thread is nudged awake), ``poll`` (blocks until there is news: the jobs' state changes, and the
outcome of each job that ended, with its record, its update and client state, and what it wrote to stdout
and stderr), and ``stop``/``close``.

The agent writes only a scratch run directory of its own on the node (the task processes' working folders
and logs, its local records); everything the run keeps is sent back to the driver, the one writer of the
real run directory. Task processes die with the agent (``PR_SET_PDEATHSIG`` through the fork server), and
the agent with its driver: Ray ends a job's actors when its driver goes, and where the driver runs on this
node the agent also watches its pid and exits at once.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import select
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import psutil

from fedsup.engine.devices import Inventory
from fedsup.engine.handle import TaskHandle
from fedsup.engine.messages import StateRef
from fedsup.engine.records import ErrorInfo, TaskRecord
from fedsup.engine.rundir import RunDir, safe_name, write_atomic
from fedsup.engine.runtime import Event, Signalled
from fedsup.engine.scheduler import Job, Scheduler
from fedsup.engine.states import OUTCOMES, TaskStatus
from fedsup.engine.supervisor import Supervisor

log = logging.getLogger(__name__)
NUDGE = 0  # a byte on the runtime's wake-up pipe that is not a signal: "new work in the inbox"
_OUTCOME_NAMES = {s.value for s in OUTCOMES}
_ROUND_SUFFIX = re.compile(r"-\d+\.pt$")
SCRATCH_PREFIX = "fedsup-agent-"
EVENT_DELAY = 0.1  # seconds a state change may wait for the driver: the live view redraws at ~10 Hz


@dataclass(frozen=True)
class Shipped:
    """A file of the driver's (a broadcast model, a client's kept state) put in Ray's object store once:
    ``key`` names it (its path on the driver, ``@`` and its version), ``ref`` holds its bytes."""

    key: str
    ref: Any


@dataclass
class Outcome:
    """A job that ended on this node: its record, and what it produced, for the driver to write."""

    task_id: str
    record: TaskRecord
    files: dict[str, bytes | None] = field(default_factory=dict)  # "state", "client_state"; None: no file
    logs: dict[str, bytes] = field(default_factory=dict)           # "stdout.log", "stderr.log": what it wrote
    final_event: dict[str, Any] | None = None                      # the event of its outcome, after the record


@dataclass
class _Pending:
    job: Job
    outputs: dict[str, str] = field(default_factory=dict)   # "state"/"client_state" -> local path
    inputs: list[Path] = field(default_factory=list)        # the shipped files it reads here
    offsets: dict[str, int] = field(default_factory=dict)   # log file -> its size at submit
    handle: TaskHandle | None = None


class _Nudgeable:
    """The scheduler's runtime, waking up for new work: a NUDGE byte on the wake-up pipe ends a wait and is
    not passed on as a signal."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def wait(self, children: Any, timeout: float | None) -> list[Event]:
        events = self._inner.wait(children, timeout)
        return [e for e in events if not (isinstance(e, Signalled) and e.signum == NUDGE)]

    def nudge(self) -> None:
        self._inner.wake(NUDGE)


class _ForwardingRunDir:
    """The agent's scratch run directory, whose every event is also queued for the driver."""

    def __init__(self, inner: RunDir, agent: NodeAgent) -> None:
        self._inner = inner
        self._agent = agent

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def event(self, **fields: Any) -> None:
        self._inner.event(**fields)
        self._agent._forward({"time": round(time.time(), 6), **fields})


def sweep_scratch(base: Path) -> None:
    """Remove the scratch folders of agents that were killed (their pid is gone)."""
    for folder in base.glob(f"{SCRATCH_PREFIX}*-*"):
        pid = folder.name[len(SCRATCH_PREFIX):].split("-")[0]
        if pid.isdigit() and not psutil.pid_exists(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def _shm_base() -> Path:
    return Path("/dev/shm") if os.access("/dev/shm", os.W_OK) else Path(tempfile.gettempdir())


class NodeAgent:
    """Runs the driver's jobs on this node with the local engine; see the module docstring.

    ``options``: the driver's ``Supervisor`` options (every one but ``run_dir`` and the backend's); ``cpus``:
    the cores Ray gave this actor (the node's), unless the options set them. ``preload``: one task of each
    class the run will use, so that the fork server imports their modules. ``driver``: the driver's node IP,
    pid and start time, to watch it where it runs on this node.
    """

    def __init__(self, name: str, options: dict[str, Any], cpus: int, preload: list[Any],
                 driver: dict[str, Any]) -> None:
        self.name = name
        for base in (Path(tempfile.gettempdir()), _shm_base()):
            sweep_scratch(base)
        self.scratch = Path(tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-"))
        self.shm = Path(tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-", dir=_shm_base()))
        self.outputs = self.scratch / "out"
        self.outputs.mkdir()
        kwargs = {**options, "run_dir": self.scratch / "run", "cpus": options.get("cpus") or cpus}
        self.supervisor = Supervisor(**kwargs)
        self._lock = threading.Condition()
        self._inbox: list[_Pending] = []
        self._events: list[dict[str, Any]] = []
        self._events_since = 0.0  # time.monotonic() of the oldest event not polled yet
        self._outcomes: list[Outcome] = []
        self._final: dict[str, dict[str, Any]] = {}  # task -> its outcome event, held for the outcome itself
        self._stop: int | None = None
        self._closing = False
        self._finished = False
        self._failure: str | None = None
        self._capacity: dict[str, Any] = {}
        self._runtime: _Nudgeable | None = None
        self._ready = threading.Event()
        self._serving = threading.Event()  # the engine can start a process now (or has ended)
        self._files_lock = threading.Lock()
        self._mapped: dict[str, tuple[str, Path]] = {}  # slot -> (key, local file) of shipped inputs
        self._users: dict[Path, int] = {}                # local file -> jobs here that read it
        self._retired: set[Path] = set()                  # replaced by a newer version, still read
        self._engine_thread = threading.Thread(target=self._engine, args=(preload,), name="fedsup-agent",
                                               daemon=True)
        self._engine_thread.start()
        self._watch_driver(driver)

    # ------------------------------------------------------------ what the driver calls

    def info(self, timeout: float = 300.0) -> dict[str, Any]:
        """The node as this agent sees it, once its engine can start a job (its fork server is warm): name,
        pid, cores, GPUs, job slots. A job given earlier would only wait there, while another node might
        have run it."""
        self._serving.wait(timeout)
        inventory = self.supervisor.inventory
        return {"name": self.name, "pid": os.getpid(), "host": os.uname().nodename, "cores": inventory.cpu.cores,
                "slots": self.supervisor.policy.max_loaded, "gpus": _gpus(inventory),
                "largest_gpu_capacity": inventory.largest_capacity(), "failure": self._failure,
                "scratch": str(self.scratch)}

    def submit(self, jobs: list[Job]) -> None:
        """Queue jobs for the engine thread, their shipped inputs mapped into this node's shared memory."""
        self._ready.wait()
        pending = [self._localise(job) for job in jobs]
        with self._lock:
            self._inbox.extend(pending)
        self._nudge()

    def poll(self) -> dict[str, Any]:
        """Block until there is news; return it: events, outcomes, the node's capacity, whether it ended.
        An outcome or the engine's end is returned at once; state changes alone wait up to ``EVENT_DELAY``
        for company, so that a job's four or five changes cost the driver one round trip, not five."""
        with self._lock:
            while not (self._outcomes or self._finished):
                if not self._events:
                    self._lock.wait()
                    continue
                left = self._events_since + EVENT_DELAY - time.monotonic()
                if left <= 0:
                    break
                self._lock.wait(left)
            events, self._events = self._events, []
            outcomes, self._outcomes = self._outcomes, []
            return {"events": events, "outcomes": outcomes, "capacity": dict(self._capacity),
                    "finished": self._finished, "failure": self._failure}

    def stop(self, signum: int) -> None:
        """Stop in order, as the local engine does on a signal: every job not done ends CANCELLED."""
        with self._lock:
            self._stop = signum
        self._nudge()

    def close(self, timeout: float = 120.0) -> None:
        """Let every process go (parked ones too), end the session, remove the scratch folders."""
        with self._lock:
            self._closing = True
        self._nudge()
        self._engine_thread.join(timeout)
        shutil.rmtree(self.shm, ignore_errors=True)
        shutil.rmtree(self.scratch, ignore_errors=True)

    # ------------------------------------------------------------ inputs and outputs

    def _localise(self, job: Job) -> _Pending:
        """The job as it runs here: shipped inputs become files in this node's shared memory, its outputs go
        to the scratch folder (the driver writes them where the run keeps them)."""
        pending = _Pending(job)
        context = {k: self._map(v, pending) if isinstance(v, Shipped) else v for k, v in job.context.items()}
        base = self.outputs / safe_name(job.task_id or job.task.task_id)
        for name, path, local in (("state", job.state_path, f"{base}.pt"),
                                  ("client_state", job.client_state_path, f"{base}.client.pt")):
            if path is not None:
                Path(local).unlink(missing_ok=True)
                pending.outputs[name] = local
        folder = self.supervisor_run_dir().task_dir(job.task.task_id)
        for stream in ("stdout.log", "stderr.log"):
            log_file = folder / stream
            pending.offsets[stream] = log_file.stat().st_size if log_file.exists() else 0
        pending.job = replace(job, context=context, state_path=pending.outputs.get("state"),
                              client_state_path=pending.outputs.get("client_state"))
        return pending

    def supervisor_run_dir(self) -> RunDir:
        scheduler = self.supervisor.scheduler
        assert scheduler is not None and scheduler.run_dir is not None
        return scheduler.run_dir

    def _map(self, shipped: Shipped, pending: _Pending) -> StateRef:
        """The shipped file in this node's shared memory, fetched once per version: one copy for every task
        process here. A newer version of the same broadcast (the next round's) replaces the older file."""
        import ray

        path = shipped.key.rsplit("@", 1)[0]  # the driver's path, then "@" and its version
        slot = _ROUND_SUFFIX.sub("", path)
        with self._files_lock:
            known = self._mapped.get(slot)
            if known is not None and known[0] == shipped.key:
                local = known[1]
            else:
                digest = hashlib.sha256(shipped.key.encode()).hexdigest()[:16]
                local = self.shm / f"{digest}-{Path(path).name}"
                write_atomic(local, ray.get(shipped.ref), durable=False)
                if known is not None and known[1] != local:
                    self._retire(known[1])
                self._mapped[slot] = (shipped.key, local)
            self._users[local] = self._users.get(local, 0) + 1
            pending.inputs.append(local)
            return StateRef(str(local))

    def _retire(self, local: Path) -> None:
        """An older version's file goes once no job here still reads it."""
        if self._users.get(local, 0) == 0:
            self._users.pop(local, None)
            local.unlink(missing_ok=True)
        else:
            self._retired.add(local)

    def _release(self, pending: _Pending) -> None:
        with self._files_lock:
            for local in pending.inputs:
                self._users[local] -= 1
                if self._users[local] == 0 and local in self._retired:
                    self._retired.discard(local)
                    self._retire(local)

    def _outcome(self, pending: _Pending, handle: TaskHandle) -> Outcome:
        self._release(pending)
        record = handle.to_record()
        files: dict[str, bytes | None] = {}
        for name, local in pending.outputs.items():
            path = Path(local)
            files[name] = path.read_bytes() if (record.ok and path.exists()) else None
            path.unlink(missing_ok=True)
        logs = {}
        folder = self.supervisor_run_dir().task_dir(pending.job.task.task_id)
        for stream, offset in pending.offsets.items():
            try:
                with open(folder / stream, "rb") as f:
                    f.seek(offset)
                    logs[stream] = f.read()
            except OSError:
                pass
        return Outcome(record.task_id, record, files, logs, self._final.pop(record.task_id, None))

    # ------------------------------------------------------------ the engine thread

    def _forward(self, fields: dict[str, Any]) -> None:
        if fields.get("status") in _OUTCOME_NAMES and fields.get("task") is not None:
            self._final[fields["task"]] = fields  # written by the driver after the record, as the engine does
            return
        with self._lock:
            if not self._events:
                self._events_since = time.monotonic()
            self._events.append(fields)
            self._lock.notify_all()

    def _nudge(self) -> None:
        if self._runtime is not None:
            self._runtime.nudge()

    def _engine(self, preload: list[Any]) -> None:
        try:
            with self.supervisor.session(preload) as session:
                scheduler = session.scheduler
                runtime = _Nudgeable(scheduler.runtime)
                scheduler.runtime = runtime
                assert scheduler.run_dir is not None
                scheduler.run_dir = _ForwardingRunDir(scheduler.run_dir, self)  # type: ignore[assignment]
                self._runtime = runtime
                self._ready.set()
                self._loop(scheduler)
        except BaseException as exc:  # noqa: BLE001 - reported to the driver, which decides
            log.exception("the node agent's engine failed")
            self._failure = f"{type(exc).__name__}: {exc}"
        finally:
            self._ready.set()
            self._serving.set()
            with self._lock:
                self._finished = True
                self._lock.notify_all()

    def _loop(self, scheduler: Scheduler) -> None:
        tracked: list[_Pending] = []
        while True:
            with self._lock:
                incoming, self._inbox = self._inbox, []
                stop, closing = self._stop, self._closing
            if stop is not None and scheduler.stop_signal is None:
                scheduler.request_stop(stop)
            for pending in incoming:
                tracked.append(pending)
                self._submit(scheduler, pending)
            tracked = self._collect(scheduler, tracked)
            if closing and not scheduler.outstanding:
                return
            if not self._serving.is_set() and scheduler.runtime.can_spawn(False):
                self._serving.set()
            scheduler.step()

    def _submit(self, scheduler: Scheduler, pending: _Pending) -> None:
        try:
            if scheduler.stop_signal is not None:
                raise RuntimeError("the node's agent was stopped")
            pending.handle = scheduler.submit([pending.job])[0]
        except Exception as exc:  # noqa: BLE001 - the job fails alone, with what was wrong
            self._release(pending)
            task_id = pending.job.task_id or pending.job.task.task_id
            error = ErrorInfo(kind="exception", type=type(exc).__name__, message=str(exc))
            record = TaskRecord(task_id=task_id, status=TaskStatus.FAILED, error=error, reason=str(exc))
            with self._lock:
                self._outcomes.append(Outcome(task_id, record))
                self._lock.notify_all()

    def _collect(self, scheduler: Scheduler, tracked: list[_Pending]) -> list[_Pending]:
        """Queue the outcome of every job that has one; return the jobs still under way."""
        done = [p for p in tracked if p.handle is None or p.handle.status in OUTCOMES]
        if not done:
            return tracked
        outcomes = [self._outcome(p, p.handle) for p in done if p.handle is not None]
        capacity = {"free_cores": scheduler.inventory.cpu.cores - scheduler.inventory.cpu.used_cores,
                    "gpus": _gpus(scheduler.inventory), "processes": len(scheduler.procs),
                    "parked": len(scheduler.idle)}
        with self._lock:
            self._outcomes.extend(outcomes)
            self._capacity = capacity
            self._lock.notify_all()
        return [p for p in tracked if p not in done]

    # ------------------------------------------------------------ the driver's end

    def _watch_driver(self, driver: dict[str, Any]) -> None:
        """Where the driver runs on this node: exit the moment it dies (its task processes follow through
        PR_SET_PDEATHSIG), without waiting for Ray to notice the job has ended."""
        pid = driver.get("pid")
        try:
            if pid is None or psutil.Process(pid).create_time() != driver.get("create_time"):
                return  # another node's process, or another pid namespace: Ray ends this actor with the job
            fd = os.pidfd_open(pid)
        except (psutil.Error, OSError, AttributeError):
            return

        def watch() -> None:
            select.select([fd], [], [])
            log.warning("the driver (pid %s) is gone: the node agent exits", pid)
            os._exit(1)

        threading.Thread(target=watch, name="fedsup-driver-watch", daemon=True).start()


def _gpus(inventory: Inventory) -> list[dict[str, Any]]:
    gpus = []
    for gpu in inventory.gpus:
        try:
            free = inventory.room(gpu)
        except Exception:  # noqa: BLE001 - the ledger is read from another thread: a best effort
            free = None
        gpus.append({"name": gpu.name, "memory": gpu.total, "free": free})
    return gpus
