"""The driver side of the Ray backend: the ``fedsup run`` process, which keeps the one queue of jobs across
the cluster's nodes and stays the one writer of the run directory.

``RayBackend.session`` connects to the cluster (``ray_address``; ``"auto"``: the running one, else a local
Ray started for the run), starts one ``NodeAgent`` per node (pinned there, holding the node's CPUs and
GPUs), and yields a ``RaySession`` with the local session's interface: ``run(jobs) -> records``, in input
order, and ``run_dir``. Jobs go to nodes by the job slots each agent reports; a client stays on the node
that holds its loaded process and moves only when that node is gone or full. Inputs (the round's global
model, a client's kept state) go to each node once through Ray's object store; outputs (updates, client
state, logs, records, events) come back with each job's outcome and are written here.

A node lost mid-run (its agent killed, its raylet gone, the node removed) costs only the jobs that were on
it: each gets an attempt that ended CRASHED with the error kind ``node_lost``, and is queued again on the
other nodes, on a budget of its own (``NODE_RETRIES``), never the task's ``max_retries``. The event log
says which node went, when, and which jobs it held.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import FrameType
from typing import Any

import psutil

from fedsup.cluster.agent import NodeAgent, Outcome, Shipped
from fedsup.engine.errors import ConfigError, RunFailed, RunInterrupted
from fedsup.engine.launch import signal_name
from fedsup.engine.messages import StateRef
from fedsup.engine.records import AttemptRecord, ErrorInfo, TaskRecord
from fedsup.engine.rundir import RunDir, write_atomic
from fedsup.engine.scheduler import Job
from fedsup.engine.states import TaskStatus
from fedsup.engine.task import Task

log = logging.getLogger(__name__)
S = TaskStatus
NODE_RETRIES = 3          # times a job may lose its node before it fails: a budget apart from max_retries
AGENT_START_TIMEOUT = 300.0  # seconds for an agent to start its engine: a deadlock detector
CLOSE_TIMEOUT = 60.0      # beyond the grace period, for the agents to let their processes go
CONNECT_TIMEOUT = 3.0     # seconds to reach a cluster's address before it is called unreachable
NODE_SCAN_INTERVAL = 2.0  # seconds between looks for nodes that joined (a look costs the GCS ~0.2 ms)


# ---------------------------------------------------------------- connecting


# ``key``: what the person set the address with, named in the error (a config key for ``fedsup run``, a flag
# for ``fedsup devices --cluster``), so that the line says what to change
RAY_ADDRESS_KEY = "supervisor.ray_address"


def _host_port(address: str, key: str = RAY_ADDRESS_KEY) -> tuple[str, int]:
    bare = address.split("://", 1)[-1]
    host, sep, port = bare.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ConfigError(f"{key}: expected 'auto' or HOST:PORT (such as 10.0.0.1:6379), "
                          f"got {address!r}")
    return host.strip("[]"), int(port)


def check_reachable(address: str, key: str = RAY_ADDRESS_KEY) -> None:
    """Fail in seconds, with the key and the address, where nothing answers: Ray itself would retry for a
    minute or more."""
    host, port = _host_port(address, key)
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT):
            pass
    except OSError as exc:
        why = exc.strerror or type(exc).__name__
        raise ConfigError(f"{key}: no Ray cluster answers at {address!r} ({why}); start one "
                          "with `ray start --head`, or set the address of the running one") from None


def connect(address: str, key: str = RAY_ADDRESS_KEY) -> bool:
    """Connect this process to the cluster; True where it did (and so disconnects at the end)."""
    import ray

    if ray.is_initialized():
        return False
    quiet: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": False}
    if address == "auto":
        try:
            ray.init(address="auto", **quiet)
        except ConnectionError:
            log.info("no Ray cluster is running: starting a local one for this run")
            ray.init(include_dashboard=False, **quiet)
        return True
    check_reachable(address, key)
    try:
        ray.init(address=address, **quiet)
    except Exception as exc:  # noqa: BLE001 - Ray raises many types for the same problem
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(f"{key}: cannot join the Ray cluster at {address!r}: {first}") from None
    return True


def node_name(node: dict[str, Any]) -> str:
    """How records and events name a node: its host name and the start of its Ray node id."""
    return f"{node.get('NodeManagerHostname') or node.get('NodeManagerAddress')}:{node['NodeID'][:6]}"


def _describe_node(name: str) -> dict[str, Any]:
    """On a node: what ``fedsup devices`` shows of it (cores, GPUs with total and free memory)."""
    from fedsup.engine.devices import cpu_cores, describe_gpus

    return {"node": name, "host": socket.gethostname(), "cores": cpu_cores(), "gpus": describe_gpus()}


def describe_nodes(address: str = "auto", timeout: float = 60.0, key: str = RAY_ADDRESS_KEY) -> list[dict[str, Any]]:
    """Every live node of the cluster at ``address``, as it sees itself: its name (as records give it), Ray's
    CPU and GPU counts, and its cores and GPUs with total and free memory (NVML, read on the node). For
    ``fedsup devices`` on a cluster; a node that does not answer in ``timeout`` has ``"error"`` instead.
    ``key`` names where the address came from in the ConfigError of an address nothing answers at."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if address == "auto" and not ray.is_initialized():
        try:
            ray.init(address="auto", logging_level=logging.WARNING, log_to_driver=False)
        except ConnectionError:
            raise ConfigError(f"{key}: no Ray cluster is running here (address 'auto'); start "
                              "one with `ray start --head`, or give its address") from None
        joined = True
    else:
        joined = connect(address, key)
    try:
        probe: Any = ray.remote(num_cpus=0)(_describe_node)
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        refs = [probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                .remote(node_name(n)) for n in nodes]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout)
        out = []
        for node, ref in zip(nodes, refs, strict=True):
            seen = {"node": node_name(node), "address": node.get("NodeManagerAddress"),
                    "ray_cpus": node["Resources"].get("CPU", 0), "ray_gpus": node["Resources"].get("GPU", 0)}
            try:
                seen.update(ray.get(ref) if ref in ready else {"error": f"no answer in {timeout:g} s"})
            except ray.exceptions.RayError as exc:
                seen["error"] = _first_line(exc)
            out.append(seen)
        return out
    finally:
        if joined:
            ray.shutdown()


# ---------------------------------------------------------------- the driver's view of jobs and nodes


@dataclass(eq=False)
class _Job:
    job: Job
    index: int
    task_id: str
    key: str                                   # the client: the home of its loaded process
    node: str | None = None
    status: str = "INIT"
    pid: int | None = None
    device: str | None = None
    started: float | None = None
    lost: list[AttemptRecord] = field(default_factory=list)  # attempts that ended with their node


@dataclass(eq=False)
class _Starting:
    node: dict[str, Any]
    name: str
    actor: Any
    deadline: float  # time.monotonic() by which it must have reported ready


@dataclass(eq=False)
class _Agent:
    name: str
    node_id: str
    actor: Any
    info: dict[str, Any]
    inflight: dict[str, _Job] = field(default_factory=dict)
    poll: Any = None
    capacity: dict[str, Any] = field(default_factory=dict)

    @property
    def slots(self) -> int:
        return max(1, int(self.info.get("slots") or 1))

    def free(self) -> int:
        return self.slots - len(self.inflight)


class RayBackend:
    """``Supervisor(backend="ray")``: sessions that run on every node of a Ray cluster."""

    def __init__(self, supervisor: Any, address: str) -> None:
        if not isinstance(address, str) or not address:
            raise ConfigError(f"supervisor.ray_address: expected 'auto' or HOST:PORT, got {address!r}")
        if address != "auto":
            _host_port(address)
        self.supervisor = supervisor
        self.address = address
        self.driver: Driver | None = None

    @contextmanager
    def session(self, tasks: list[Any]) -> Iterator[RaySession]:
        import ray

        joined = connect(self.address)
        run_dir = RunDir(self.supervisor.run_dir) if self.supervisor.run_dir is not None else None
        driver = Driver(self.supervisor, run_dir, tasks)
        self.driver = driver
        restore = _install_signals(driver)
        try:
            driver.start()
            yield RaySession(driver)
            driver.close()
        except BaseException:
            driver.kill()
            raise
        finally:
            restore()
            if run_dir is not None:
                run_dir.close()
            if joined:
                ray.shutdown()


class RaySession:
    """Runs batches of work on the cluster's agents; the local ``Session``'s interface."""

    def __init__(self, driver: Driver) -> None:
        self.driver = driver
        self.run_dir = driver.run_dir

    def run(self, jobs: Iterable[Task | Job]) -> list[TaskRecord]:
        return self.driver.run(jobs)


def _install_signals(driver: Driver) -> Any:
    """SIGTERM stops a run as Ctrl-C does: the driver notes the signal and stops the agents in order."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handler(signum: int, frame: FrameType | None) -> None:
        driver.signal = driver.signal or signum
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}

    def restore() -> None:
        for sig, old in previous.items():
            signal.signal(sig, old)

    return restore


class Driver:
    """The one queue of jobs across the cluster's nodes; see the module docstring."""

    def __init__(self, supervisor: Any, run_dir: RunDir | None, tasks: list[Any]) -> None:
        self.supervisor = supervisor
        self.run_dir = run_dir
        options = dict(supervisor.options)
        options.pop("run_dir", None)
        self.options = options
        self.preload = _representatives(tasks)
        self.agents: dict[str, _Agent] = {}
        self.gone: set[str] = set()           # node ids whose agent was lost: never given work again
        self.starting: dict[Any, _Starting] = {}  # agents not ready yet, by the ref of their info()
        self.next_scan = 0.0                  # time.monotonic() at which to look for nodes that joined
        self.home: dict[str, str] = {}        # client -> the node holding its loaded process
        self.queue: deque[_Job] = deque()
        self.shipped: dict[tuple[str, int, int], Shipped] = {}
        self.signal: int | None = None
        self.stopped = False
        # the batch under way and its records so far, for ``jobs()`` (the live view reads them from its thread)
        self.batch: list[_Job] = []
        self.records: list[TaskRecord | None] = []
        me = psutil.Process()
        self.me = {"pid": me.pid, "create_time": me.create_time()}

    # ------------------------------------------------------------ agents

    def start(self) -> None:
        self.join_nodes()
        self._await_agents(AGENT_START_TIMEOUT)
        if not self.agents:
            raise RunFailed("the Ray cluster has no node with a CPU to run tasks on")

    def join_nodes(self) -> None:
        """Start an agent on every live node that has none. Each is given work once it reports ready (its
        fork server can start a job), which the loop learns beside the jobs' news: a node that joins mid-run
        never holds up the others' outcomes."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        starting = {s.node["NodeID"] for s in self.starting.values()}
        self.next_scan = time.monotonic() + NODE_SCAN_INTERVAL
        known = {a.node_id for a in self.agents.values()} | self.gone | starting
        fresh = [n for n in ray.nodes() if n.get("Alive") and n["NodeID"] not in known
                 and n.get("Resources", {}).get("CPU", 0) >= 1]
        remote: Any = ray.remote(NodeAgent)
        for node in fresh:
            resources = node["Resources"]
            cpus, gpus = int(resources.get("CPU", 1)), int(resources.get("GPU", 0))
            name = node_name(node)
            actor: Any = remote.options(
                num_cpus=cpus, num_gpus=gpus, max_concurrency=8, max_restarts=0,
                scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False),
            ).remote(name, self.options, cpus, self.preload, self.me)
            self.starting[actor.info.remote()] = _Starting(node, name, actor, time.monotonic() + AGENT_START_TIMEOUT)

    def _await_agents(self, timeout: float) -> None:
        """Wait up to ``timeout`` for every agent starting to report ready (or fail)."""
        import ray

        if self.starting:
            ray.wait(list(self.starting), num_returns=len(self.starting), timeout=timeout)
        self._check_starting()

    def _check_starting(self) -> None:
        """Register the agents that reported ready, give up on those past their deadline."""
        import ray

        if not self.starting:
            return
        done, _ = ray.wait(list(self.starting), num_returns=len(self.starting), timeout=0)
        now = time.monotonic()
        for ref in [*done, *(r for r, s in self.starting.items() if s.deadline <= now and r not in done)]:
            starting = self.starting.pop(ref)
            try:
                info = ray.get(ref) if ref in done else None
            except ray.exceptions.RayError as exc:
                info = {"failure": _first_line(exc)}
            self._joined(starting, info)

    def _joined(self, starting: _Starting, info: dict[str, Any] | None) -> None:
        import ray

        node, name, actor = starting.node, starting.name, starting.actor
        if info is None or info.get("failure"):
            why = info["failure"] if info else f"it did not start in {AGENT_START_TIMEOUT:g} s"
            log.warning("node %s is not used: its agent failed (%s)", name, why)
            self.gone.add(node["NodeID"])
            ray.kill(actor)
            return
        agent = _Agent(name, node["NodeID"], actor, info)
        agent.poll = actor.poll.remote()
        self.agents[name] = agent
        self._event(event="node_joined", node=name, address=node.get("NodeManagerAddress"),
                    cores=info.get("cores"), gpus=info.get("gpus"), slots=agent.slots, agent_pid=info.get("pid"))
        log.info("node %s: %s cores, %s GPU(s), %s job slots", name, info.get("cores"),
                 len(info.get("gpus") or []), agent.slots)

    def close(self) -> None:
        """Every agent lets its processes go, parked ones too, and ends; then the actors are released."""
        import ray

        refs = [a.actor.close.remote() for a in self.agents.values()]
        if refs:
            ray.wait(refs, num_returns=len(refs), timeout=self.options.get("grace_period", 5.0) + CLOSE_TIMEOUT)
        self.kill()

    def kill(self) -> None:
        """End every agent now; their task processes die with them (PR_SET_PDEATHSIG)."""
        import ray

        for actor in [*(a.actor for a in self.agents.values()), *(s.actor for s in self.starting.values())]:
            try:
                ray.kill(actor)
            except Exception:  # noqa: BLE001 - already gone
                pass
        self.agents.clear()
        self.starting.clear()

    def nodes(self) -> list[dict[str, Any]]:
        """What the live view shows of each node now: its jobs under way and slots, its free cores and GPUs
        (as its agent last reported them). ``gone`` holds the ids of the nodes lost so far."""
        view = [{"node": a.name, "jobs": len(a.inflight), "slots": a.slots, "free_cores": a.capacity.get("free_cores"),
                 "processes": a.capacity.get("processes"), "gpus": a.capacity.get("gpus") or a.info.get("gpus")}
                for a in list(self.agents.values())]
        return sorted(view, key=lambda n: n["node"])

    def jobs(self) -> list[tuple[str, str]]:
        """What the live view counts: every job of the batch under way, with its state now (its outcome once
        it has a record; else the last state its node reported, INIT while queued)."""
        records = list(self.records)
        return [(job.task_id, record.status.value if record is not None else job.status)
                for job, record in zip(list(self.batch), records, strict=False)]

    # ------------------------------------------------------------ a batch of jobs

    def run(self, jobs: Iterable[Task | Job]) -> list[TaskRecord]:
        batch = [j if isinstance(j, Job) else Job(j) for j in jobs]
        records: list[TaskRecord | None] = [None] * len(batch)
        if self.stopped:
            raise RunInterrupted(self.signal or signal.SIGINT, [])
        self.join_nodes()
        self.shipped = {}  # the inputs of this batch only: what earlier ones shipped may be freed
        made = []
        for i, job in enumerate(batch):
            if not isinstance(job.task, Task):
                raise TypeError(f"tasks: expected fedsup.Task instances, got {type(job.task).__name__}")
            made.append(_Job(job, i, job.task_id or job.task.task_id, job.task.task_id))
        self.queue.extend(made)
        self.batch, self.records = made, records
        ids = [j.task_id for j in self.queue]
        if len(set(ids)) != len(ids):
            raise ValueError("task_id: task ids must be unique")
        try:
            self._loop(records)
        except KeyboardInterrupt:
            self._interrupt(records)
            raise RunInterrupted(self.signal or signal.SIGINT, self._filled(batch, records)) from None
        return self._filled(batch, records)

    def _filled(self, batch: list[Job], records: list[TaskRecord | None]) -> list[TaskRecord]:
        out = []
        for job, record in zip(batch, records, strict=True):
            if record is None:
                reason = f"the run was stopped by {signal_name(self.signal or signal.SIGINT)}"
                record = TaskRecord(task_id=job.task_id or job.task.task_id, status=S.CANCELLED, reason=reason)
            out.append(record)
        return out

    def _loop(self, records: list[TaskRecord | None]) -> None:
        import ray

        while any(r is None for r in records):
            self._assign()
            polls = {a.poll: a for a in self.agents.values()}
            if not polls and not self.starting:
                raise RunFailed("every node of the Ray cluster is gone; the run stops (--resume continues it)")
            deadline = min([self.next_scan, *(s.deadline for s in self.starting.values())])
            ready, _ = ray.wait([*polls, *self.starting], num_returns=1,
                                timeout=max(0.0, deadline - time.monotonic()))
            for ref in ready:
                if ref in polls:
                    self._news(polls[ref], ref, records)
            self._check_starting()
            if time.monotonic() >= self.next_scan:
                self.join_nodes()

    def _news(self, agent: _Agent, ref: Any, records: list[TaskRecord | None]) -> None:
        import ray

        try:
            news = ray.get(ref)
        except ray.exceptions.RayError as exc:
            self._lose(agent, _first_line(exc), records)
            return
        for event in news["events"]:
            self._note(agent, event)
        for outcome in news["outcomes"]:
            self._finish(agent, outcome, records)
        agent.capacity = news["capacity"]
        if news["finished"]:
            self._lose(agent, f"its engine ended: {news['failure'] or 'no reason given'}", records)
            return
        agent.poll = agent.actor.poll.remote()

    # ------------------------------------------------------------ placement

    def _fits(self, job: _Job, agent: _Agent) -> bool:
        largest = agent.info.get("largest_gpu_capacity") or 0
        return not largest or job.job.task.estimate_cuda_memory <= largest

    def _pick(self, job: _Job) -> _Agent | None:
        """The node with the most free job slots that can hold the job."""
        room = [a for a in self.agents.values() if a.free() > 0 and self._fits(job, a)]
        if not room and not any(self._fits(job, a) for a in self.agents.values()):
            room = [a for a in self.agents.values() if a.free() > 0]  # fits nowhere: an agent says why
        return max(room, key=lambda a: (a.free(), -len(a.inflight), a.name), default=None)

    def _assign(self) -> None:
        """Give queued jobs to nodes: to the client's home while it has a free slot; elsewhere only where the
        home is gone, or full while another node has room."""
        if not self.queue:
            return
        given: dict[str, list[Job]] = {}
        left: deque[_Job] = deque()
        for job in self.queue:
            home = self.agents.get(self.home.get(job.key, ""))
            target = home if (home is not None and home.free() > 0) else self._pick(job)
            if target is None:
                left.append(job)
                continue
            target.inflight[job.task_id] = job
            self.home[job.key] = target.name
            job.node, job.status, job.started = target.name, "INIT", None
            given.setdefault(target.name, []).append(self._wire(job.job))
        self.queue = left
        for name, wire in given.items():
            self.agents[name].actor.submit.remote(wire)

    def _wire(self, job: Job) -> Job:
        """The job as it travels: every StateRef in its context becomes the file's bytes in the object store,
        put there once per batch (every node that needs it fetches it once)."""
        context = {k: self._ship(v) if isinstance(v, StateRef) else v for k, v in job.context.items()}
        return replace(job, context=context)

    def _ship(self, ref: StateRef) -> Shipped:
        import ray

        st = os.stat(ref.path)
        key = (ref.path, st.st_mtime_ns, st.st_size)
        shipped = self.shipped.get(key)
        if shipped is None:
            shipped = Shipped(f"{ref.path}@{st.st_mtime_ns}", ray.put(Path(ref.path).read_bytes()))
            self.shipped[key] = shipped
        return shipped

    # ------------------------------------------------------------ what comes back

    def _note(self, agent: _Agent, event: dict[str, Any]) -> None:
        """A state change on a node: written to the event log with the node's name."""
        job = agent.inflight.get(event.get("task") or "")
        if job is not None and event.get("status"):
            job.status = event["status"]
            job.pid = event.get("pid") or job.pid
            job.device = event.get("device") or job.device
            if job.started is None and event["status"] != "INIT":
                job.started = event.get("time")
        self._event(**{**event, "node": agent.name})

    def _finish(self, agent: _Agent, outcome: Outcome, records: list[TaskRecord | None]) -> None:
        """A job ended on a node: its files first, then its record, then the event of its outcome, so that an
        event that says FINISHED always has its record and the record its update (docs/reliability.md)."""
        job = agent.inflight.pop(outcome.task_id, None)
        if job is None:
            return
        for name, target in (("state", job.job.state_path), ("client_state", job.job.client_state_path)):
            if target is None or name not in outcome.files:
                continue
            data = outcome.files[name]
            if data is None:
                Path(target).unlink(missing_ok=True)
            else:
                write_atomic(Path(target), data, durable=False)
        record = self._stamp(outcome.record, agent.name, job.lost)
        if self.run_dir is not None:
            folder = self.run_dir.task_dir(job.key)
            for stream, data in outcome.logs.items():
                if data:  # as on one machine, tasks/ holds the folders of tasks that printed something
                    folder.mkdir(parents=True, exist_ok=True)
                    with open(folder / stream, "ab") as f:
                        f.write(data)
            self.run_dir.write_record(record)
        if outcome.final_event is not None:
            self._event(**{**outcome.final_event, "attempt": record.attempts, "node": agent.name})
        records[job.index] = record

    @staticmethod
    def _stamp(record: TaskRecord, node: str, lost: list[AttemptRecord]) -> TaskRecord:
        """The node's record, with the node's name on it and the attempts lost with other nodes before it."""
        history = [*lost, *(a.model_copy(update={"node": a.node or node}) for a in record.history)]
        history = [a.model_copy(update={"attempt": i}) for i, a in enumerate(history, 1)]
        return record.model_copy(update={"node": node, "history": history, "attempts": len(history)})

    def _lose(self, agent: _Agent, reason: str, records: list[TaskRecord | None]) -> None:
        """A node is gone: its jobs go back in the queue, on their own budget, for the other nodes."""
        import ray

        self.agents.pop(agent.name, None)
        self.gone.add(agent.node_id)
        try:
            ray.kill(agent.actor)  # where it is only unreachable, it must not go on with jobs run elsewhere
        except Exception:  # noqa: BLE001 - already gone
            pass
        when = time.time()
        jobs = list(agent.inflight.values())
        agent.inflight.clear()
        self.home = {k: v for k, v in self.home.items() if v != agent.name}
        log.warning("node %s was lost (%s); %d job(s) go to the other nodes", agent.name, reason, len(jobs))
        self._event(event="node_lost", node=agent.name, reason=reason, jobs=[j.task_id for j in jobs])
        stamp = time.strftime("%H:%M:%S", time.localtime(when))
        for job in jobs:
            message = f"node {agent.name} was lost at {stamp} while the job was {job.status.lower()} there ({reason})"
            error = ErrorInfo(kind="node_lost", type="NodeLost", message=message, device=job.device)
            job.lost.append(AttemptRecord(attempt=len(job.lost) + 1, pid=job.pid, device=job.device, node=agent.name,
                                          status=S.CRASHED, started=job.started or when, ended=when, error=error))
            self._event(task=job.task_id, attempt=len(job.lost), status=S.CRASHED.value, previous=job.status,
                        node=agent.name, kind="node_lost", error=error.summary())
            if self.stopped:
                self._cancel(job, records)
            elif len(job.lost) > NODE_RETRIES:
                self._fail(job, f"lost its node {len(job.lost)} times (at most {NODE_RETRIES} are retried)", error,
                           records)
            else:
                self._event(task=job.task_id, attempt=len(job.lost), status=S.INIT.value,
                            previous=S.CRASHED.value, retry=len(job.lost) + 1, requeued="node_lost")
                job.status, job.pid, job.device = "INIT", None, None
                self.queue.appendleft(job)
        self.join_nodes()

    def _fail(self, job: _Job, reason: str, error: ErrorInfo, records: list[TaskRecord | None]) -> None:
        record = TaskRecord(task_id=job.task_id, status=S.FAILED, error=error, reason=reason,
                            attempts=len(job.lost), history=job.lost, node=job.node)
        if self.run_dir is not None:
            self.run_dir.write_record(record)
        self._event(task=job.task_id, attempt=len(job.lost), status=S.FAILED.value, previous=S.CRASHED.value,
                    reason=reason)
        records[job.index] = record

    # ------------------------------------------------------------ stopping

    def _interrupt(self, records: list[TaskRecord | None]) -> None:
        """Ctrl-C or SIGTERM: every agent stops in order (EXIT, grace period, SIGTERM, SIGKILL) and reports
        its jobs CANCELLED; queued jobs are cancelled here. A second signal kills the agents at once."""
        import ray

        self.stopped = True
        signum = self.signal or signal.SIGINT
        log.warning("%s received: stopping the cluster's jobs", signal_name(signum))
        for job in self.queue:
            self._cancel(job, records)
        self.queue.clear()
        for agent in self.agents.values():
            agent.actor.stop.remote(signum)
        deadline = time.monotonic() + self.options.get("grace_period", 5.0) + CLOSE_TIMEOUT
        try:
            while any(a.inflight for a in self.agents.values()) and time.monotonic() < deadline:
                polls = {a.poll: a for a in self.agents.values() if a.inflight}
                ready, _ = ray.wait(list(polls), num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
                for ref in ready:
                    self._news(polls[ref], ref, records)
        except KeyboardInterrupt:
            log.warning("second signal: ending every agent now")
        self.kill()

    def _cancel(self, job: _Job, records: list[TaskRecord | None]) -> None:
        reason = f"the run was stopped by {signal_name(self.signal or signal.SIGINT)}"
        record = TaskRecord(task_id=job.task_id, status=S.CANCELLED, reason=reason, history=job.lost,
                            attempts=len(job.lost))
        if self.run_dir is not None:
            self.run_dir.write_record(record)
        self._event(task=job.task_id, status=S.CANCELLED.value, previous=job.status, reason=reason)
        records[job.index] = record

    def _event(self, **fields: Any) -> None:
        if self.run_dir is not None:
            self.run_dir.event(**fields)


def _representatives(tasks: list[Any]) -> list[Any]:
    """One task per class (the one wanting the most cores), for the agents' fork servers to import."""
    chosen: dict[type, Any] = {}
    for task in tasks:
        best = chosen.get(type(task))
        if best is None or task.cpus > best.cpus:
            chosen[type(task)] = task
    return list(chosen.values())


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")
