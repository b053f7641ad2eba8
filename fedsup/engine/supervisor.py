"""``Supervisor``: the public face of the engine. Builds the inventory, the launcher and the run directory,
installs the signal handlers, and hands the loop to the scheduler."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any, Literal

import psutil

from fedsup.engine import backends
from fedsup.engine.devices import DEFAULT_CONTEXT_MEMORY, DEFAULT_MARGIN, Inventory, cpu_cores
from fedsup.engine.errors import ConfigError, RunInterrupted
from fedsup.engine.faults import FaultPlan
from fedsup.engine.launch import make_launcher
from fedsup.engine.records import TaskRecord
from fedsup.engine.rundir import RunDir
from fedsup.engine.runtime import ProcessRuntime
from fedsup.engine.scheduler import Job, Policy, Scheduler
from fedsup.engine.spawning import refuse_reentry
from fedsup.engine.task import Task
from fedsup.engine.units import parse_bytes

log = logging.getLogger(__name__)


# tasks_per_process="auto": a process that finished a task in under a second loads the next one, at most this
# many in all. A fresh process costs ~20-50 ms (a fork of the warm server, its copy-on-write faults, an exit):
# under 5 % of a task that runs a second or more, but more than the whole of a task that runs a few tens of ms.
AUTO_REUSE_BELOW = 1.0
AUTO_TASKS_PER_PROCESS = 100


def process_reuse(tasks_per_process: int | Literal["auto"]) -> dict[str, Any]:
    """The scheduler's reuse policy for a ``tasks_per_process`` option."""
    if tasks_per_process == "auto":
        return {"tasks_per_process": AUTO_TASKS_PER_PROCESS, "reuse_below": AUTO_REUSE_BELOW}
    return {"tasks_per_process": tasks_per_process, "reuse_below": None}


def _positive(name: str, value: Any, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ValueError(f"{name}: expected a number > 0{' or None' if allow_none else ''}, got {value!r}")


class Supervisor:
    """Runs tasks, one process each, on this machine's GPUs and CPUs.

    ``devices``: ``"auto"`` (NVIDIA GPUs through NVML if any, else the CPU), ``"cpu"``, a list of GPU
    indices, or described devices such as ``[{"name": "cuda:0", "memory": "16GiB"}]`` for tests and dry runs.
    ``max_loaded`` bounds the live task processes (loading, loaded or training); ``max_training`` the ones
    training at once (on the CPU, the tasks' ``cpus`` never add up to more cores than the machine has).
    ``max_infra_failures``: how many times the infrastructure (a fork server) may die in a run; the tasks it
    takes with it are queued again without spending their ``max_retries``, and past the budget they fail.
    ``server_timeout``: seconds a fork server has to answer (a child's pid, a dying child's exit status);
    ``server_start_timeout``: to be serving after its start (its warm-up). A server that misses either
    (stopped, hung) is killed and replaced.
    """

    def __init__(
        self,
        devices: Any = "auto",
        *,
        max_retries: int = 3,
        max_interrupts: int = 5,
        run_dir: str | os.PathLike[str] | None = None,
        max_loaded: int | None = None,
        max_training: int | None = None,
        load_timeout: float | None = None,
        train_timeout: float | None = None,
        start_method: str = "forkserver",
        faults: FaultPlan | None = None,
        grace_period: float = 5.0,
        retry_backoff: float = 0.5,
        memory_margin: int | str = DEFAULT_MARGIN,
        cuda_context_memory: int | str = DEFAULT_CONTEXT_MEMORY,
        cpus: int | None = None,
        keep_loaded: bool = False,
        enforce_memory: bool = False,
        tasks_per_process: int | Literal["auto"] = "auto",
        max_infra_failures: int = 10,
        server_timeout: float = 10.0,
        server_start_timeout: float = 120.0,
        backend: str = "local",
        ray_address: str = "auto",
        limits: dict[str, int] | None = None,
        speculative: dict[str, float] | None = None,
    ) -> None:
        # every option but the backend's, for a backend that runs a local supervisor on each of its nodes
        self.options = {k: v for k, v in locals().items() if k not in ("self", "backend", "ray_address")}
        for name, count in (("max_retries", max_retries), ("max_interrupts", max_interrupts),
                            ("max_infra_failures", max_infra_failures)):
            if isinstance(count, bool) or not isinstance(count, int) or count < 0:
                raise ValueError(f"{name}: expected a whole number >= 0, got {count!r}")
        optional: tuple[tuple[str, int | None], ...] = (
            ("max_loaded", max_loaded), ("max_training", max_training), ("cpus", cpus),
            ("tasks_per_process", None if tasks_per_process == "auto" else tasks_per_process))
        for name, value in optional:
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name}: expected a whole number >= 1 or None, got {value!r}")
        self.limits = _limits(limits)
        after = _speculative_after(speculative)
        _positive("load_timeout", load_timeout)
        _positive("train_timeout", train_timeout)
        _positive("grace_period", grace_period, allow_none=False)
        _positive("server_timeout", server_timeout, allow_none=False)
        _positive("server_start_timeout", server_start_timeout, allow_none=False)
        if start_method not in ("forkserver", "spawn"):
            raise ValueError(f"start_method: expected 'forkserver' or 'spawn', got {start_method!r}")
        if isinstance(retry_backoff, bool) or not isinstance(retry_backoff, (int, float)) or retry_backoff < 0:
            raise ValueError(f"retry_backoff: expected a number of seconds >= 0, got {retry_backoff!r}")
        self.inventory = Inventory.from_spec(
            devices, cores=cpus or cpu_cores(),
            margin=parse_bytes(memory_margin, "memory_margin"),
            context_memory=parse_bytes(cuda_context_memory, "cuda_context_memory"),
        )
        self.policy = Policy(
            max_loaded=max_loaded or 2 * self.inventory.cpu.cores,
            max_training=max_training,
            max_retries=max_retries,
            max_interrupts=max_interrupts,
            max_infra_failures=max_infra_failures,
            backoff=float(retry_backoff),
            load_timeout=load_timeout,
            train_timeout=train_timeout,
            grace_period=grace_period,
            faults=faults,
            keep_loaded=keep_loaded,
            enforce_memory=enforce_memory,
            limits=self.limits,
            speculative_after=after,
            **process_reuse(tasks_per_process),
        )
        self.run_dir = run_dir
        self.start_method = start_method
        self.server_timeouts = (float(server_timeout), float(server_start_timeout))
        self.scheduler: Scheduler | None = None
        # "local": the sessions below; another (``fedsup.engine.backends``) runs them, e.g. on a Ray cluster
        self.backend = backends.make(backend, self, {"ray_address": ray_address})

    def run(self, tasks: Iterable[Task]) -> list[TaskRecord]:
        """Run every task to an outcome and return one record per task, in input order.

        A task that fails keeps failing alone: its record says FAILED with the root cause, and the others go
        on. On SIGINT, SIGTERM or SIGHUP the run stops in order and ``RunInterrupted`` (a KeyboardInterrupt) is
        raised with the records as they were left.
        """
        tasks = list(tasks)
        with self.session(tasks) as session:
            return session.run(tasks)

    @contextmanager
    def session(self, tasks: Iterable[Task] = ()) -> Iterator[Session]:
        """Start the machinery once for several batches of work (the rounds of a federated run).

        ``tasks`` are the ones that will run, so that the fork server can import their modules.
        """
        refuse_reentry()
        tasks = list(tasks)
        check_labels(self.limits, tasks)
        if self.backend is not None:
            with self.backend.session(tasks) as remote:
                yield remote
            return
        run_dir = RunDir(self.run_dir) if self.run_dir is not None else None
        launcher = make_launcher(self.start_method, max((t.cpus for t in tasks), default=1),
                                 reuse=self.policy.tasks_per_process > 1, timeouts=self.server_timeouts)
        runtime = ProcessRuntime(launcher)
        scheduler = Scheduler(self.policy, self.inventory, runtime, run_dir,
                              host_memory=psutil.virtual_memory().available)
        self.scheduler = scheduler
        restore = self._install_signals(runtime)
        try:
            sys.stdout.flush()  # a forked server must not inherit unwritten output and print it twice
            sys.stderr.flush()
            launcher.start(sorted({type(t).__module__ for t in tasks} - {"__main__"}))
            yield Session(scheduler, run_dir)
            scheduler.close()
        except BaseException:
            self._kill_everything(scheduler)
            raise
        finally:
            runtime.close()
            restore()
            if run_dir is not None:
                run_dir.close()

    @staticmethod
    def _kill_everything(scheduler: Scheduler) -> None:
        """After an error or a stop: no task process may outlive the supervisor, and each is reaped."""
        scheduler.forget_parked()  # they end here too: fedsup's doing, so their SIGKILL is not news
        if scheduler.procs and scheduler.stop_signal is None:
            scheduler.stop_signal = signal.SIGKILL  # admit nothing more
            scheduler.stop_stage = 2
            scheduler._escalate()  # SIGKILL now
        try:
            while scheduler.procs:
                scheduler.step()
        except BaseException:  # noqa: BLE001 - the loop itself is broken: kill without waiting
            for child in list(scheduler.procs):
                child.kill(signal.SIGKILL)

    @staticmethod
    def _install_signals(runtime: ProcessRuntime) -> Any:
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        def handler(signum: int, frame: FrameType | None) -> None:
            runtime.wake(signum)
        # SIGHUP (the terminal or the ssh session went away) stops in order too, as SIGTERM does; unless it is
        # ignored (nohup): then the run goes on, as the user asked
        stops = [signal.SIGINT, signal.SIGTERM]
        if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:
            stops.append(signal.SIGHUP)
        previous = {sig: signal.signal(sig, handler) for sig in stops}
        def restore() -> None:
            for sig, old in previous.items():
                signal.signal(sig, old)
        return restore


class Session:
    """Runs batches of work on one set of processes; see ``Supervisor.session``."""

    def __init__(self, scheduler: Scheduler, run_dir: RunDir | None) -> None:
        self.scheduler = scheduler
        self.run_dir = run_dir

    def run(self, jobs: Iterable[Task | Job]) -> list[TaskRecord]:
        handles = self.scheduler.submit(jobs)
        self.scheduler.run_until_done()
        records = [h.to_record() for h in handles]
        if self.scheduler.stop_signal is not None:
            raise RunInterrupted(self.scheduler.stop_signal, records)
        return records


def _limits(limits: dict[str, int] | None) -> dict[str, int]:
    if limits is None:
        return {}
    if not isinstance(limits, dict):
        raise ValueError(f"limits: expected a mapping of label to count such as {{'download': 2}}, got {limits!r}")
    for label, count in limits.items():
        if not isinstance(label, str) or not label:
            raise ValueError(f"limits: expected label names, got {label!r}")
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"limits[{label!r}]: expected a whole number >= 1, got {count!r}")
    return dict(limits)


def check_labels(limits: dict[str, int], tasks: list[Task]) -> None:
    """A limit on a label that no task holds is a typo, not a no-op: said before anything starts."""
    held = {label for t in tasks for label in t.labels}
    unknown = sorted(set(limits) - held)
    if tasks and unknown:
        raise ConfigError(f"limits: {', '.join(map(repr, unknown))} is held by no task (the tasks' labels: "
                          f"{', '.join(sorted(held)) or 'none'})")


def _speculative_after(speculative: dict[str, float] | None) -> float | None:
    if speculative is None:
        return None
    if not isinstance(speculative, dict) or set(speculative) != {"after"}:
        raise ValueError(f"speculative: expected {{'after': 2.0}} (a copy of a task training longer than that many "
                         f"times the median train time), got {speculative!r}")
    after = speculative["after"]
    if isinstance(after, bool) or not isinstance(after, (int, float)) or after <= 0:
        raise ValueError(f"speculative.after: expected a number > 0, got {after!r}")
    return float(after)

