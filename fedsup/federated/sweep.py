"""Sweeps: the runs of a paper's table (configs x seeds) on one supervisor and its devices.

    fedsup sweep sweep.yaml             # every run; all runs' jobs through one supervisor
    fedsup sweep sweep.yaml --dry-run   # the runs it expands to
    fedsup sweep sweep.yaml --resume    # continue a killed sweep; finished runs are left as they are

A sweep file names a base run config and what varies::

    name: lr-sweep
    base: synthetic.yaml                 # a run config, relative to this file
    grid: {task.args.lr: [0.01, 0.1]}    # every combination of these values...
    runs:                                # ...for each of these override sets (optional; --set syntax)
      - {name: fedavg, set: [federation.strategy=fedavg]}
      - {name: fedprox, set: [federation.strategy=fedavg, federation.proximal_mu=0.01]}
    seeds: [0, 1, 2]                     # ...for each seed
    metric: eval_accuracy                # what the sweep report sorts by
    output: runs/lr-sweep                # default: runs/<name>

Each run is an ordinary run directory (``<output>/<config>.seed-<seed>``) with every guarantee a run has
alone: its own lock, records, checkpoints, resume and report; its model is bit for bit the one ``fedsup run``
gives for the same config and seed. What the runs share is the supervisor: one set of fork servers, one
device ledger and one queue, so a core or a GPU that one run's round leaves free takes another run's jobs,
and no run waits for another to end. Each run drives its rounds on a thread of its own and hands its jobs in;
the main thread runs the scheduler's loop over all of them. Runs take turns in the order their rounds' jobs
came in, so none starves. A run that fails does not stop the others.
"""

from __future__ import annotations

import itertools
import json
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fedsup.engine.errors import ConfigError, RunInterrupted
from fedsup.engine.records import TaskRecord
from fedsup.engine.rundir import RunDir, write_atomic
from fedsup.engine.scheduler import Job, Scheduler
from fedsup.engine.spawning import refuse_reentry
from fedsup.engine.states import OUTCOMES
from fedsup.engine.supervisor import Supervisor
from fedsup.engine.task import Task
from fedsup.federated.config import ConfigProblems, RunConfig, load_config
from fedsup.federated.problems import parse_yaml
from fedsup.federated.rounds import Federation
from fedsup.federated.runner import build_spec

log = logging.getLogger(__name__)

SWEEP_FILE = "sweep.json"        # the expanded runs: what --resume and the report read
SUMMARY_FILE = "sweep-summary.json"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


# ---------------------------------------------------------------- the sweep file


class Variant(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str | None = None
    set: list[str] = Field(default_factory=list)


class SweepConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    base: str
    grid: dict[str, list[Any]] = Field(default_factory=dict)
    runs: list[Variant] = Field(default_factory=list)
    seeds: list[int] = Field(default_factory=lambda: [0])
    metric: str | None = None
    output: str | None = None


@dataclass
class SweepRun:
    config: str                 # the config's name: what its seeds are averaged under
    seed: int
    overrides: list[str]        # --set strings, the seed's and the output's included
    path: Path
    checked: RunConfig | None = field(default=None, repr=False)  # its config, loaded once when the sweep is read

    @property
    def name(self) -> str:
        return f"{self.config}.seed-{self.seed}"

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "config": self.config, "seed": self.seed, "overrides": self.overrides,
                "path": str(self.path)}


@dataclass
class Sweep:
    name: str
    source: Path                # the sweep file
    base: Path                  # the base run config
    output: Path
    metric: str | None
    runs: list[SweepRun]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "source": str(self.source), "base": str(self.base), "metric": self.metric,
                "runs": [r.to_json() for r in self.runs]}


def load_sweep(path: str | Path, overrides: list[str] | None = None) -> Sweep:
    """Read and expand a sweep file; every run's config is checked before anything runs."""
    source = Path(path)
    try:
        data = parse_yaml(source.read_text(encoding="utf-8"), str(source))
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read the sweep file: {exc.strerror or exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping with name, base, grid, runs, seeds")
    try:
        config = SweepConfig.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or '(top)'}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"{source}: {problems}") from None
    if not _NAME.match(config.name):
        raise ConfigError(f"{source}: name: expected letters, digits, '.', '_' and '-', got {config.name!r}")
    if not config.seeds:
        raise ConfigError(f"{source}: seeds: expected at least one seed")
    base = (source.parent / config.base).resolve()
    if not base.is_file():
        raise ConfigError(f"{source}: base: {base} is not a file")
    output = Path(config.output) if config.output else Path("runs") / config.name
    runs = [SweepRun(name, seed, [*sets, f"seed={seed}"], output / f"{name}.seed-{seed}")
            for name, sets in _configs(source, config) for seed in config.seeds]
    sweep = Sweep(config.name, source, base, output, config.metric, runs)
    _check_runs(sweep, list(overrides or []))
    return sweep


def _configs(source: Path, config: SweepConfig) -> list[tuple[str, list[str]]]:
    """Every (config name, overrides) the sweep's variants and grid expand to."""
    keys = list(config.grid)
    for key, values in config.grid.items():
        if not values:
            raise ConfigError(f"{source}: grid.{key}: expected at least one value")
    combos = list(itertools.product(*config.grid.values())) if keys else [()]
    variants = config.runs or [Variant()]
    out: list[tuple[str, list[str]]] = []
    for index, variant in enumerate(variants):
        for combo in combos:
            values = [_yaml_value(v) for v in combo]
            sets = [*variant.set, *(f"{k}={v}" for k, v in zip(keys, values, strict=True))]
            parts = ([variant.name] if variant.name else ([] if len(variants) == 1 else [f"run{index}"]))
            parts += [f"{k.rsplit('.', 1)[-1]}-{v}" for k, v in zip(keys, values, strict=True)]
            out.append((_safe("_".join(parts) or "base"), sets))
    names = [name for name, _ in out]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f"{source}: runs: configs {', '.join(twice)} would share a name; give each run a name")
    return out


def _yaml_value(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=1 << 20).strip().removesuffix("...").strip()


def _safe(name: str) -> str:
    return _UNSAFE.sub("-", name).strip("-") or "base"


def _check_runs(sweep: Sweep, extra: list[str]) -> None:
    """Each run's config loads, and all agree on the supervisor they share."""
    shared: tuple[str, Any] | None = None
    for run in sweep.runs:
        run.overrides = [*extra, *run.overrides]
        try:
            run.checked = load_config(sweep.base, [*run.overrides, f"output={run.path}"])
        except ConfigProblems as exc:
            raise ConfigError(f"{sweep.source}: run {run.name}: {exc}") from None
        supervisor = run.checked.supervisor.model_dump(mode="json")
        if shared is None:
            shared = (run.name, supervisor)
        elif supervisor != shared[1]:
            changed = sorted(k for k in supervisor if supervisor[k] != shared[1].get(k))
            raise ConfigError(f"{sweep.source}: runs {shared[0]} and {run.name} differ in supervisor."
                              f"{', supervisor.'.join(changed)}: a sweep's runs share one supervisor, so set "
                              "supervisor options in the base config or for every run alike")


# ---------------------------------------------------------------- one supervisor, many runs


@dataclass
class _Batch:
    jobs: list[Job]
    handles: list[Any] = field(default_factory=list)
    records: list[TaskRecord] | None = None
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)


class SharedSupervisor:
    """One supervisor session for many runs. A run's thread hands in a batch (a round's jobs) and waits for
    its records; the thread that owns the session runs the scheduler's loop for every batch."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        self.lock = threading.Lock()
        self.inbox: list[_Batch] = []
        self.pending: list[_Batch] = []
        self.ended: list[str] = []       # runs done: their parked processes may go
        self.running = 0                 # run threads not yet done (counted down before their last nudge)
        self.broken: BaseException | None = None   # the loop failed: nothing more is taken in

    @contextmanager
    def session(self, namespace: str, path: Path) -> Iterator[RunShare]:
        run_dir = RunDir(path)
        try:
            yield RunShare(self, namespace, run_dir)
        finally:
            run_dir.close()
            with self.lock:
                self.ended.append(namespace)
            self.scheduler.runtime.nudge()  # type: ignore[attr-defined]

    def hand_in(self, batch: _Batch) -> list[TaskRecord]:
        with self.lock:
            if self.broken is not None:
                raise RuntimeError(f"the sweep's scheduler stopped: {self.broken!r}")
            if self.scheduler.stop_signal is not None:
                raise RunInterrupted(self.scheduler.stop_signal, [])
            self.inbox.append(batch)
        self.scheduler.runtime.nudge()  # type: ignore[attr-defined]
        batch.done.wait()
        if batch.error is not None:
            raise batch.error
        assert batch.records is not None
        if self.scheduler.stop_signal is not None:
            raise RunInterrupted(self.scheduler.stop_signal, batch.records)
        return batch.records

    def run_ended(self) -> None:
        """A run's thread is done: counted down first, then the loop woken, so that it sees the count."""
        with self.lock:
            self.running -= 1
        self.scheduler.runtime.nudge()  # type: ignore[attr-defined]

    def loop(self) -> None:
        """Run the scheduler until every run's thread is done and nothing is handed in or under way."""
        try:
            while True:
                self._take_in()
                with self.lock:
                    busy = self.running > 0 or bool(self.inbox)
                if not (busy or self.pending or self.scheduler.procs):
                    return
                self.scheduler.step()
                self._hand_back()
        except BaseException as exc:
            self._fail_all(exc)
            raise

    def _take_in(self) -> None:
        with self.lock:
            batches, self.inbox = self.inbox, []
            ended, self.ended = self.ended, []
        for namespace in ended:
            self.scheduler.let_go(namespace)
        for batch in batches:
            if self.scheduler.stop_signal is not None:  # nothing new is admitted after a stop: hand it back
                batch.records = []
                batch.done.set()
                continue
            try:
                batch.handles = self.scheduler.submit(batch.jobs)
            except Exception as exc:  # noqa: BLE001 - the run's own mistake: its thread raises it
                batch.error = exc
                batch.done.set()
                continue
            self.pending.append(batch)
        self._hand_back()

    def _hand_back(self) -> None:
        left = []
        for batch in self.pending:
            if all(h.status in OUTCOMES for h in batch.handles):
                batch.records = [h.to_record() for h in batch.handles]
                batch.done.set()
            else:
                left.append(batch)
        self.pending = left

    def _fail_all(self, exc: BaseException) -> None:
        with self.lock:
            self.broken = exc
            batches, self.inbox = self.inbox + self.pending, []
        self.pending = []
        for batch in batches:
            batch.error = RuntimeError(f"the sweep's scheduler stopped: {exc!r}")
            batch.done.set()


class RunShare:
    """What a run's Federation sees as its session: its run directory, and ``run(jobs)`` on the shared loop."""

    def __init__(self, shared: SharedSupervisor, namespace: str, run_dir: RunDir) -> None:
        self.shared = shared
        self.namespace = namespace
        self.run_dir = run_dir

    def run(self, jobs: list[Task | Job]) -> list[TaskRecord]:
        tagged = [self._tag(j if isinstance(j, Job) else Job(j)) for j in jobs]
        return self.shared.hand_in(_Batch(tagged))

    def _tag(self, job: Job) -> Job:
        job.run_dir, job.namespace = self.run_dir, self.namespace
        return job


# ---------------------------------------------------------------- running a sweep


@dataclass
class RunOutcome:
    run: SweepRun
    status: str = "queued"          # queued, running, finished, failed, interrupted, skipped (finished before)
    error: str | None = None
    round: int = 0
    rounds: int = 0
    summary: dict[str, Any] | None = None


def run_sweep(sweep: Sweep, resume: bool = False,
              on_event: Callable[[RunOutcome, dict[str, Any]], None] | None = None,
              report: Callable[[Path], Path] | None = None) -> list[RunOutcome]:
    """Run every run of the sweep on one supervisor; return how each ended (also in sweep-summary.json).
    ``report`` writes a run's HTML report, for the trackers that keep it (MLflow)."""
    refuse_reentry()  # before anything is written: see fedsup.engine.spawning
    _prepare_output(sweep, resume)
    outcomes = [RunOutcome(run) for run in sweep.runs]
    todo = [o for o in outcomes if not _finished_before(o)]
    if not todo:
        _write_summary(sweep, outcomes)
        return outcomes
    feds = {id(o): _federation(sweep, o, on_event, report) for o in todo}
    first = next(iter(feds.values()))
    supervisor = Supervisor(**{**first.spec.supervisor, "keep_loaded": True})
    threads: list[threading.Thread] = []
    try:
        with supervisor.session([f.first_client for f in feds.values()]) as session:
            shared = SharedSupervisor(session.scheduler)
            shared.running = len(todo)
            for outcome in todo:
                federation = feds[id(outcome)]
                federation.sessions = _shares(shared, outcome.run)
                thread = threading.Thread(target=_drive, args=(federation, outcome, resume, shared),
                                          name=f"fedsup-sweep-{outcome.run.name}", daemon=True)
                threads.append(thread)
                outcome.status = "running"
                thread.start()
            shared.loop()
    finally:
        for thread in threads:
            thread.join()
        _write_summary(sweep, outcomes)
    if any(o.status == "interrupted" for o in outcomes):
        signal = supervisor.scheduler.stop_signal if supervisor.scheduler else None
        raise RunInterrupted(signal or 2, [])
    return outcomes


def _shares(shared: SharedSupervisor, run: SweepRun) -> Callable[[list[Task]], Any]:
    def sessions(tasks: list[Task]) -> Any:
        return shared.session(run.name, run.path)
    return sessions


def _drive(federation: Federation, outcome: RunOutcome, resume: bool, shared: SharedSupervisor) -> None:
    """A run's thread: its rounds, from start to end; whatever happens, the loop is told it is done."""
    try:
        again = resume and (outcome.run.path / "config.yaml").exists()
        outcome.summary = federation.run(resume=again)
        outcome.status = "finished"
    except KeyboardInterrupt:
        outcome.status = "interrupted"
    except Exception as exc:  # noqa: BLE001 - one run's failure is its own: the others go on
        outcome.status, outcome.error = "failed", f"{type(exc).__name__}: {exc}"
        log.warning("sweep run %s failed: %s", outcome.run.name, outcome.error)
    finally:
        shared.run_ended()


def _federation(sweep: Sweep, outcome: RunOutcome, on_event: Callable[[RunOutcome, dict[str, Any]], None] | None,
                report: Callable[[Path], Path] | None) -> Federation:
    config = outcome.run.checked
    assert config is not None, "load_sweep checks every run's config"
    outcome.rounds = config.federation.rounds

    def events(event: dict[str, Any]) -> None:
        if event.get("event") == "round_finished":
            outcome.round = int(event.get("round", outcome.round))
        if on_event is not None:
            on_event(outcome, event)

    return Federation(build_spec(config), on_event=events, report=report)


def _prepare_output(sweep: Sweep, resume: bool) -> None:
    record = sweep.output / SWEEP_FILE
    if record.exists():
        if not resume:
            raise ConfigError(f"{sweep.output} holds a sweep already: fedsup sweep {sweep.source} --resume "
                              "continues it, or choose another output")
        known = json.loads(record.read_text())
        if [r["name"] for r in known.get("runs", [])] != [r.name for r in sweep.runs]:
            raise ConfigError(f"{sweep.output} holds a sweep of other runs than {sweep.source} expands to: "
                              "resume it with the sweep file that started it")
    sweep.output.mkdir(parents=True, exist_ok=True)
    write_atomic(record, (json.dumps(sweep.to_json(), indent=1) + "\n").encode())


def _finished_before(outcome: RunOutcome) -> bool:
    summary = outcome.run.path / "summary.json"
    try:
        data = json.loads(summary.read_text())
    except (OSError, ValueError):
        return False
    if data.get("status") != "finished":
        return False
    outcome.status, outcome.summary = "skipped", data
    outcome.round = outcome.rounds = int(data.get("rounds_completed", 0))
    return True


def _write_summary(sweep: Sweep, outcomes: list[RunOutcome]) -> None:
    rows = [{"name": o.run.name, "config": o.run.config, "seed": o.run.seed, "status": o.status,
             "error": o.error, "path": str(o.run.path)} for o in outcomes]
    data = {"name": sweep.name, "ended": time.time(), "runs": rows,
            "finished": all(o.status in ("finished", "skipped") for o in outcomes)}
    write_atomic(sweep.output / SUMMARY_FILE, (json.dumps(data, indent=1) + "\n").encode())
