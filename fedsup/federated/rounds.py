"""Federated runs: rounds of client training on the supervisor, aggregation in the main process,
checkpoints, and resume.

Each round samples ``clients_per_round`` clients from the run seed and makes one job per client
(``round-R.client-I``). A client's process stays loaded between rounds while ``max_loaded`` allows, so a
client LOADs once and TRAINs every round it is picked. The global model travels through shared memory: it
is saved once per round under /dev/shm and every client memory-maps the same file; each client's update
comes back through a file in the run directory, so a finished client's work survives a kill of the main
process. Aggregation sorts updates by client and accumulates in float64: the same seed gives the same final
model whether the run was interrupted or not.

One run at a time uses a run directory: it holds ``fedsup.lock`` (flock'ed, with its pid) from before it
reads or writes anything there until after its last ``summary.json``; a folder that holds files but no
fedsup run is refused, never written over. Every client update is checked against the round's global model
(keys, shapes, dtypes, finite values; ``fedsup.engine.contract``) before it is aggregated or trusted on resume.

```
RUN_DIR/fedsup.lock  config.yaml  events.jsonl  rounds.jsonl  summary.json
        checkpoints/initial.pt  round-N.pt  final.pt      updates/round-N/client-I.pt (until round N is done)
                    round-N.strategy.pt (a strategy's state: server momentum, moments)
                    (round-N: the newest ``checkpoints.keep_last`` rounds and every ``every``-th; retention.py)
        records/initial.jsonl  records/round-N.jsonl (every job's record, a JSON line each)
        client_state/client-I.round-R.pt   tasks/client-I/{stdout,stderr}.log (where a client printed)
```
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import torch
import yaml

from fedsup.engine.contract import UPDATE_CONTRACT, check_update, describe, update_contract
from fedsup.engine.errors import RunDirError, RunFailed, TaskContractError
from fedsup.engine.messages import StateRef
from fedsup.engine.records import ErrorInfo, TaskRecord
from fedsup.engine.rundir import LOCK_FILE, lock_run_dir, read_record_lines, read_records, write_atomic, write_json
from fedsup.engine.scheduler import Job
from fedsup.engine.spawning import refuse_reentry
from fedsup.engine.states import TaskStatus
from fedsup.engine.supervisor import Session, Supervisor
from fedsup.engine.task import Task
from fedsup.engine.tensorfile import TensorFileError, read_state, write_state
from fedsup.engine.units import parse_bytes
from fedsup.federated.client_state import ClientStates
from fedsup.federated.heterogeneity import RoundPlan, plan_round
from fedsup.federated.problems import ConfigProblems, read_file
from fedsup.federated.retention import Retention, prune, sweep
from fedsup.federated.strategies import ClientUpdate, Strategy, weighted_metrics
from fedsup.federated.tracking import Trackers

log = logging.getLogger(__name__)
State = dict[str, torch.Tensor]
# Keys that may change between a run and its resumption: they decide how, not what, is computed.
RESUMABLE_CHANGES = ("supervisor", "output", "checkpoints", "tracking")
# What only fedsup writes at the top of a run directory: one of them there means the folder is a run's.
RUN_MARKS = (LOCK_FILE, "events.jsonl", "rounds.jsonl")
CAUSES_SHOWN = 3  # failing jobs named, with their errors, in the message of a run that fails


@dataclass(frozen=True)
class FederationSpec:
    name: str
    seed: int
    task_class: Callable[..., Task]  # a Task subclass, built as task_class(client_id=i, **task_args)
    task_args: dict[str, Any]
    clients: int
    rounds: int
    clients_per_round: int
    min_clients: int
    strategy: Strategy
    output: Path
    evaluate: bool = True
    proximal_mu: float = 0.0                # FedProx: set on every client as self.proximal_mu
    straggler_fraction: float = 0.0
    straggler_mode: str = "partial"         # or "drop"
    dropout: float = 0.0
    reject_nonfinite: bool = True           # an update holding NaN or Inf breaks the contract
    keep_last: int | None = 3               # checkpoints kept: the newest complete rounds (None: all) ...
    checkpoint_every: int | None = 50       # ... and every k-th round (None: none); see retention.py
    task_options: dict[str, Any] = field(default_factory=dict)  # estimate_memory, estimate_cuda_memory, cpus
    supervisor: dict[str, Any] = field(default_factory=dict)    # Supervisor keyword arguments
    config: dict[str, Any] | None = None                         # the resolved config, written as config.yaml
    tracking: dict[str, Any] | None = None                       # tensorboard / mlflow (tracking.py)


@dataclass
class RoundResult:
    round: int
    started: float
    ended: float = 0.0
    selected: list[str] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    retried: list[str] = field(default_factory=list)
    resumed: list[str] = field(default_factory=list)
    stragglers: dict[str, float] = field(default_factory=dict)  # partial stragglers: task id -> work_fraction
    dropped: list[str] = field(default_factory=list)            # stragglers whose updates were dropped
    dropped_out: list[str] = field(default_factory=list)        # sampled clients that failed to report
    train_metrics: dict[str, float] = field(default_factory=dict)
    eval_metrics: dict[str, float] = field(default_factory=dict)
    num_examples: int = 0
    jobs: dict[str, float] = field(default_factory=dict)  # the round's jobs in totals: tasks, attempts, ...

    def to_json(self) -> dict[str, Any]:
        return {"round": self.round, "started": self.started, "ended": self.ended,
                "duration": round(self.ended - self.started, 6), "selected": self.selected,
                "finished": self.finished, "failed": self.failed, "retried": self.retried,
                "resumed": self.resumed, "stragglers": self.stragglers, "dropped": self.dropped,
                "dropped_out": self.dropped_out, "train_metrics": self.train_metrics,
                "eval_metrics": self.eval_metrics, "num_examples": self.num_examples, "jobs": self.jobs}


def derive_seed(*parts: object) -> int:
    """A 31-bit seed from the run seed and the job's coordinates: stable across runs and machines."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def sample_clients(seed: int, round_: int, clients: int, per_round: int) -> list[int]:
    """The round's clients, sorted. ``random.sample`` of a ``range`` draws ``per_round`` numbers without
    building the population (for any population larger than a few times ``per_round``), so a round of 50
    of 100,000 clients costs what a round of 50 of 100 does."""
    return sorted(random.Random(derive_seed(seed, "sample", round_)).sample(range(clients), per_round))


def save_state(state: State, path: Path) -> None:
    """``torch.save`` atomically."""
    import io

    buffer = io.BytesIO()
    torch.save({k: v.detach().cpu().contiguous() for k, v in state.items()}, buffer)
    write_atomic(path, buffer.getvalue())


def save_broadcast(state: State, path: Path) -> None:
    """A state the round's task processes read (``tensorfile.read_state``), atomically."""
    import io

    buffer = io.BytesIO()
    write_state(state, buffer)
    write_atomic(path, buffer.getvalue(), durable=False)


def save_strategy_state(strategy: Strategy, path: Path) -> None:
    """The strategy's state (server momentum, moments) beside the round's checkpoint; nothing if it keeps none."""
    import io

    state = strategy.state_dict()
    if state:
        buffer = io.BytesIO()
        torch.save(state, buffer)
        write_atomic(path, buffer.getvalue())


def load_strategy_state(strategy: Strategy, path: Path) -> None:
    """Restore what ``save_strategy_state`` wrote for the last complete round, so the next step is the one an
    uninterrupted run would take. A strategy that keeps state needs the file."""
    if not path.exists():
        if strategy.state_dict():
            raise RunDirError(f"{path}: missing; the run's strategy ({strategy!r}) keeps state across rounds, "
                              "and it cannot be resumed without it")
        return
    try:
        strategy.load_state_dict(torch.load(path, weights_only=True))
    except Exception as exc:  # noqa: BLE001 - a truncated or foreign file: say which
        raise RunDirError(f"{path}: cannot be read as the strategy's state ({why_unreadable(exc)})") from exc


def load_state(path: Path) -> State:
    try:
        return torch.load(path, mmap=True, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a truncated or foreign file: say which
        raise RunDirError(f"{path}: cannot be read as a model checkpoint ({why_unreadable(exc)})") from exc


def why_unreadable(exc: Exception) -> str:
    """One line of why torch.load refused a file: for a pickle that holds more than tensors, torch spends its
    first lines on advice, and the cause is the line that names the refused global."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return next((line for line in lines if "GLOBAL" in line), lines[0] if lines else type(exc).__name__)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Lines of a JSON-lines file; a torn last line (a killed writer) is skipped, a torn middle is an error."""
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    out = []
    for number, line in enumerate(lines, 1):
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if number == len(lines):
                log.warning("%s: skipping a torn last line", path)
                break
            raise RunDirError(f"{path}: line {number} is not JSON ({exc.msg}); the file is damaged") from exc
    return out


class SharedMemory:
    """A folder under /dev/shm (or the temp dir) for this process's broadcasts; stale ones are swept."""

    def __init__(self) -> None:
        base = Path("/dev/shm") if os.access("/dev/shm", os.W_OK) else Path(tempfile.gettempdir())
        self.sweep(base)
        self.path = Path(tempfile.mkdtemp(prefix=f"fedsup-{os.getpid()}-", dir=base))

    @staticmethod
    def sweep(base: Path) -> None:
        """Remove folders left by supervisors that were killed (their pid is gone)."""
        for folder in base.glob("fedsup-*-*"):
            pid = folder.name.split("-")[1]
            if pid.isdigit() and not psutil.pid_exists(int(pid)):
                shutil.rmtree(folder, ignore_errors=True)

    def close(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


class Federation:
    """Runs a federated experiment described by a FederationSpec; see the module docstring."""

    def __init__(self, spec: FederationSpec, on_event: Callable[[dict[str, Any]], None] | None = None,
                 sessions: Callable[[list[Task]], AbstractContextManager[Any]] | None = None,
                 report: Callable[[Path], Path] | None = None) -> None:
        """``sessions``: where the run's jobs go, given the tasks whose modules the processes need: by default a
        supervisor of the run's own; a sweep passes a share of the one supervisor all its runs use. ``report``
        writes the run's HTML report (an MLflow artifact, where MLflow tracks the run)."""
        self.spec = spec
        self.report = report
        self.on_event = on_event
        self.round = 0
        self.supervisor = Supervisor(**{**spec.supervisor, "run_dir": spec.output, "keep_loaded": True})
        self.sessions = sessions or self.supervisor.session
        # Client objects are made when a round needs them (one round's worth at a time), never all up front:
        # a federation of 10,000 clients costs the main process nothing per client it does not sample.
        self.first_client = self._make_client(0)  # the class checked now, and its module for the fork server
        self._clients: dict[int, Task] = {}
        self.spec.strategy.setup(clients=spec.clients)
        self.client_states = ClientStates(self.path)
        self.trackers = Trackers(None, self.path, spec.name, None)
        self.retention = Retention(spec.keep_last, spec.checkpoint_every)
        self.last: RoundResult | None = None  # the newest complete round: what summary.json shows of it
        self.completed = 0
        self.started = time.time()
        # summary.json's totals: of the complete rounds (and the initial state), and, per task id, of the
        # jobs of the round under way; nothing here grows with the rounds
        self._base = _totals([])
        self._current: dict[str, tuple[int, bool, float]] = {}

    # ------------------------------------------------------------ set-up

    def _client(self, client_id: int) -> Task:
        """Client ``client_id``'s object for this round's jobs (its train and evaluate share one)."""
        client = self._clients.get(client_id)
        if client is None:
            client = self._clients[client_id] = self._make_client(client_id)
        return client

    def _make_client(self, client_id: int) -> Task:
        client = self.spec.task_class(client_id=client_id, **self.spec.task_args)
        if not isinstance(client, Task):
            raise TaskContractError(f"task.class: {self.spec.task_class.__name__} is not a fedsup.Task subclass")
        client.task_id = f"client-{client_id}"  # stable ids: a resumed run must find its tasks again
        options = self.spec.task_options
        for name in ("estimate_memory", "estimate_cuda_memory"):
            if options.get(name) is not None:
                setattr(client, name, parse_bytes(options[name], f"task.{name}"))
        if options.get("cpus") is not None:
            client.cpus = options["cpus"]
        if options.get("labels"):
            client.labels = tuple(dict.fromkeys([*client.labels, *options["labels"]]))
        return client

    @property
    def path(self) -> Path:
        return Path(self.spec.output).resolve()  # children run in their own folders

    def _refuse_foreign(self, resume: bool) -> None:
        """Before anything is written there: a folder that holds files but no fedsup run is the user's, and a
        run would replace what it holds (``config.yaml``, ``summary.json``); a resume needs a run."""
        if not self.path.exists():
            if resume:
                raise RunDirError(f"--resume: {self.path} holds no run to resume (it does not exist)")
            return
        if not self.path.is_dir():
            raise RunDirError(f"output: {self.path} exists and is not a folder")
        if any((self.path / name).exists() for name in RUN_MARKS):
            return
        if resume:
            raise RunDirError(f"--resume: {self.path} holds no run to resume")
        entries = sorted(os.listdir(self.path))
        if entries:
            shown = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
            raise RunDirError(f"output: {self.path} holds files but no fedsup run ({shown}); a run would write "
                              "over them: choose an empty or a new folder")

    def _prepare_dir(self, resume: bool) -> int:
        """Check the run directory against ``resume``; return the last complete round (0 for none)."""
        held = (self.path / "events.jsonl").exists() or (self.path / "rounds.jsonl").exists()
        if not resume:
            if held:
                raise RunDirError(f"output: {self.path} already holds a run; pass --resume to continue it, "
                                  "or choose another --output")
            self.path.mkdir(parents=True, exist_ok=True)
            self._write_config()
            return 0
        if not held:
            raise RunDirError(f"--resume: {self.path} holds no run to resume")
        self._check_config()
        lines = read_jsonl(self.path / "rounds.jsonl")
        done, complete = self._resumable_round(lines)
        self._drop_updates(keep=done + 1 if done == complete else None)
        if done < len(lines) or (self.path / "rounds.jsonl").exists():
            # keep only the complete rounds, so that new lines never follow a torn one
            text = "".join(json.dumps(line) + "\n" for line in lines[:done])
            write_atomic(self.path / "rounds.jsonl", text.encode())
        return done

    def _drop_updates(self, keep: int | None) -> None:
        """Remove the updates of every round but ``keep``, the one the resume goes on with: a committed round's
        (a kill before their removal left them), and where rounds are given up, theirs (the client states
        they moved into place are gone, so their jobs must run again)."""
        folder = self.path / "updates"
        if folder.is_dir():
            for entry in os.scandir(folder):
                if entry.name != f"round-{keep}":
                    shutil.rmtree(entry.path, ignore_errors=True)

    def _resumable_round(self, lines: list[dict[str, Any]]) -> tuple[int, int]:
        """The round a resume starts from: the newest complete round whose checkpoint is there, among those
        retention keeps for resume (their strategy and client states are kept too); rounds after it run
        again. Pruning never removes the newest complete round's checkpoint, so that is the one but where
        a checkpoint was deleted by hand."""
        complete = 0
        for line in lines:
            if line.get("round") != complete + 1:
                break
            complete += 1
        folder = self.path / "checkpoints"
        for round_ in range(complete, self.retention.oldest_resumable(complete) - 1, -1):
            if (folder / f"round-{round_}.pt").exists():
                if round_ < complete:
                    log.warning("%s: round-%d.pt is missing; resuming from round %d (rounds %d to %d run again)",
                                folder, complete, round_, round_ + 1, complete)
                return round_, complete
        if complete:
            raise RunDirError(f"--resume: {self.path / 'rounds.jsonl'} says {complete} round(s) are complete, but "
                              f"{folder} holds none of the checkpoints a resume can start from (round-"
                              f"{self.retention.oldest_resumable(complete)}.pt to round-{complete}.pt)")
        return 0, 0

    def _write_config(self) -> None:
        if self.spec.config is not None:
            text = yaml.safe_dump(self.spec.config, sort_keys=False)
            write_atomic(self.path / "config.yaml", text.encode())

    def _check_config(self) -> None:
        stored_path = self.path / "config.yaml"
        if self.spec.config is None:
            return
        if not stored_path.exists():
            raise RunDirError(f"--resume: {stored_path} is missing, and without the run's own config fedsup "
                              "cannot tell whether this config is the same run (another would mix two runs "
                              "in one folder); put it back, or start a new run in another folder")
        try:
            # Read with the same bounds as any config: the run directory is not trusted more than a config.
            stored = read_file(stored_path)
        except ConfigProblems as exc:
            causes = [problem.removeprefix(f"{stored_path}: ") for problem in exc.problems]
            raise RunDirError(f"{stored_path}: damaged ({'; '.join(causes)})") from exc
        if not isinstance(stored, dict):
            raise RunDirError(f"{stored_path}: damaged (not a mapping of config keys)")
        changed = sorted(k for k in set(stored) | set(self.spec.config)
                         if k not in RESUMABLE_CHANGES and stored.get(k) != self.spec.config.get(k))
        if changed:
            raise RunDirError(f"--resume: the config no longer matches the run in {self.path}: "
                              f"{', '.join(changed)} changed; resume with the same config or start a new run")

    def _emit(self, **event: Any) -> None:
        if self.on_event is not None:
            self.on_event(event)

    # ------------------------------------------------------------ the run

    def run(self, resume: bool = False) -> dict[str, Any]:
        """Run (or resume) every round; return the summary that is also written to summary.json.

        Holds the run directory's lock throughout: a second run or resume of the same directory, from this
        process or another, is refused with a RunDirError naming the pid that holds it."""
        refuse_reentry()  # before anything is written or locked: see fedsup.engine.spawning
        self._refuse_foreign(resume)
        lock = lock_run_dir(self.path)
        try:
            return self._run(resume)
        finally:
            lock.release()

    def _run(self, resume: bool) -> dict[str, Any]:
        done = self._prepare_dir(resume)
        sweep(self.path / "checkpoints", self.retention, done)
        self.client_states.recover(done, self.retention.oldest_resumable(done))
        lines = read_jsonl(self.path / "rounds.jsonl")[:done]
        self._resume_totals(lines)
        self.trackers = Trackers(self.spec.tracking, self.path, self.spec.name, self.spec.config, self.report)
        self.trackers.catch_up(lines)
        shm = SharedMemory()
        status = "failed"
        try:
            with self.sessions([self.first_client]) as session:
                assert session.run_dir is not None
                session.run_dir.event(event="run_started", resume=resume, from_round=done + 1)
                self._emit(event="run_started", resume=resume, from_round=done + 1, rounds=self.spec.rounds)
                state = self._starting_state(session, done)
                for round_ in range(done + 1, self.spec.rounds + 1):
                    state = self._round(session, shm, round_, state)
                if state is not None:
                    save_state(state, self.path / "checkpoints" / "final.pt")
                status = "finished"
                session.run_dir.event(event="run_finished", status=status)
            return self._summary(status)
        except KeyboardInterrupt:
            status = "interrupted"
            raise
        finally:
            shm.close()
            if status != "finished":
                self._summary(status)
            self.trackers.end({"status": status})

    def _starting_state(self, session: Session, done: int) -> State | None:
        if done:
            load_strategy_state(self.spec.strategy, self.path / "checkpoints" / f"round-{done}.strategy.pt")
            return load_state(self.path / "checkpoints" / f"round-{done}.pt")
        initial = self.path / "checkpoints" / "initial.pt"
        if initial.exists():
            return load_state(initial)
        client = self.first_client
        if type(client).initial_state is Task.initial_state:
            return None
        # One-off: not kept for client 0 (the first round may not sample it), and not counted against the
        # few processes the cold fork server starts while the warm one gets ready.
        job = Job(client, task_id="initial-state", method="initial_state", federated=True,
                  state_path=str(initial), seed=derive_seed(self.spec.seed, "initial"), one_off=True)
        initial.parent.mkdir(parents=True, exist_ok=True)
        assert session.run_dir is not None
        session.run_dir.use_records("initial")
        record = session.run([job])[0]
        self._base = _add(self._base, _totals([_tally(record)]))
        self._check_contract(record)
        if not record.ok:
            raise RunFailed(f"initial_state() failed: {record.error.summary() if record.error else 'unknown'}")
        return load_state(initial)

    def _round(self, session: Session, shm: SharedMemory, round_: int, state: State | None) -> State:
        self.round = round_
        self._current, self._clients = {}, {}
        assert session.run_dir is not None
        session.run_dir.use_records(f"round-{round_}")
        result = RoundResult(round_, time.time())
        chosen = sample_clients(self.spec.seed, round_, self.spec.clients, self.spec.clients_per_round)
        plan = plan_round(self.spec.seed, round_, chosen, dropout=self.spec.dropout,
                          straggler_fraction=self.spec.straggler_fraction, mode=self.spec.straggler_mode)
        result.selected = [self._task_id(round_, i) for i in chosen]
        result.stragglers = {self._task_id(round_, i): work for i, work in plan.work.items()}
        result.dropped = [self._task_id(round_, i) for i in plan.dropped]
        result.dropped_out = [self._task_id(round_, i) for i in plan.dropped_out]
        assert session.run_dir is not None
        session.run_dir.event(event="round_started", round=round_, selected=len(chosen))
        self._emit(event="round_started", round=round_, rounds=self.spec.rounds, selected=len(chosen),
                   stragglers=len(plan.work), dropped=len(plan.dropped), dropped_out=len(plan.dropped_out))
        broadcast = self._broadcast(shm, round_, state)
        context = self._strategy_context(shm, round_, state)
        updates, failures = self._train(session, round_, plan, {"global_state": broadcast, **context}, result,
                                        state)
        if len(updates) < self.spec.min_clients:
            raise self._shortfall(round_, len(updates), failures)
        reference = state if state is not None else updates[0].state
        new_state = self.spec.strategy.aggregate(reference, updates)
        save_state(new_state, self.path / "checkpoints" / f"round-{round_}.pt")
        save_strategy_state(self.spec.strategy, self.path / "checkpoints" / f"round-{round_}.strategy.pt")
        if self.spec.evaluate and type(self.first_client).evaluate is not Task.evaluate:
            new_broadcast = self._broadcast(shm, round_, new_state, name="global-eval")
            result.eval_metrics = self._evaluate(session, round_, plan.train, new_broadcast)
        result.ended = time.time()
        self._finish_round(session, result)
        return new_state

    @staticmethod
    def _task_id(round_: int, client: int, method: str = "train") -> str:
        return f"round-{round_}.client-{client}" + ("" if method == "train" else f".{method}")

    def _broadcast(self, shm: SharedMemory, round_: int, state: State | None, name: str = "global") -> StateRef | None:
        """One copy of the global model per round, in shared memory; the previous one is removed."""
        if state is None:
            return None
        for old in shm.path.glob(f"{name}-*.pt"):
            old.unlink(missing_ok=True)
        path = shm.path / f"{name}-{round_}.pt"
        save_broadcast(state, path)
        return StateRef(str(path))

    def _strategy_context(self, shm: SharedMemory, round_: int, state: State | None) -> dict[str, Any]:
        """What the strategy sends every client besides the model (SCAFFOLD's server control variate)."""
        return {name: self._broadcast(shm, round_, value, name=f"strategy-{name}")
                for name, value in self.spec.strategy.broadcast(state).items()}

    def _train(self, session: Session, round_: int, plan: RoundPlan, shared: dict[str, Any],
               result: RoundResult, state: State | None) -> tuple[list[ClientUpdate], list[TaskRecord]]:
        """Train the round's clients; return the updates, in client order, and the records of the jobs that
        failed. A job whose update breaks the contract is one that failed, whoever found it (the client's
        process, or this one reading the update back)."""
        update_dir = self.path / "updates" / f"round-{round_}"
        update_dir.mkdir(parents=True, exist_ok=True)
        shape = describe(state) if state is not None else None
        records: dict[int, TaskRecord] = {}
        trusted: dict[int, State] = {}
        jobs: list[tuple[int, Job]] = []
        for i in plan.train:
            task_id = self._task_id(round_, i)
            path = update_dir / f"client-{i}.pt"
            contract = update_contract(f"client-{i}", shape, self.spec.reject_nonfinite)
            previous = session.run_dir.read_record(task_id) if session.run_dir else None
            if previous is not None and previous.ok:
                update, problem = self._trusted_update(path, contract)
                if update is None:
                    if path.exists():
                        log.warning("%s; %s trains again", problem, task_id)
                else:
                    records[i], trusted[i] = previous, update  # finished before the run was killed: never twice
                    result.resumed.append(task_id)
                    continue
            context = {**shared, "round": round_, "proximal_mu": self.spec.proximal_mu,
                       "work_fraction": plan.work_fraction(i), "client_state": self._client_state_ref(i),
                       UPDATE_CONTRACT: contract}
            jobs.append((i, Job(self._client(i), task_id=task_id, context=context, state_path=str(path),
                                seed=derive_seed(self.spec.seed, round_, i), federated=True,
                                client_state_path=str(ClientStates.pending(update_dir, i)))))
        ran = session.run([job for _, job in jobs])
        for (i, job), record in zip(jobs, ran, strict=True):
            records[i] = record
            if record.ok:  # checked again here: a worker that did not check it, or a file changed since
                update, problem = self._trusted_update(update_dir / f"client-{i}.pt", job.context[UPDATE_CONTRACT])
                if update is None:
                    records[i] = self._broken(session, record, problem or "no update")
                    ClientStates.pending(update_dir, i).unlink(missing_ok=True)  # nothing of a failed job is kept
                else:
                    trusted[i] = update
        if shape is None and trusted:  # no global model yet: the first client's update sets the keys
            first = min(trusted)
            for i in sorted(trusted)[1:]:
                problem = check_update(trusted[i], update_contract(f"client-{i}", describe(trusted[first]), False))
                if problem is not None:
                    del trusted[i]
                    records[i] = self._broken(session, records[i], f"{problem} (client-{first}'s update "
                                              "stands for the global model in a run without initial_state)")
                    ClientStates.pending(update_dir, i).unlink(missing_ok=True)
        updates, failures = [], []
        for i in plan.train:
            record = records[i]
            self._current[record.task_id] = _tally(record)
            (result.finished if record.ok else result.failed).append(record.task_id)
            if record.retried:
                result.retried.append(record.task_id)
            if record.ok:
                updates.append(self._update(i, record, update_dir, trusted[i]))
            else:
                failures.append(record)
        result.train_metrics = weighted_metrics([(u.num_examples, u.metrics) for u in updates])
        result.num_examples = sum(u.num_examples for u in updates)
        return updates, failures

    @staticmethod
    def _trusted_update(path: Path, contract: dict[str, Any]) -> tuple[State | None, str | None]:
        """The update in ``path`` where it can be read and keeps the contract, else what is wrong with it:
        a damaged or missing file, or a broken contract, is never aggregated or trusted on resume."""
        try:
            update = read_state(path)
        except TensorFileError as exc:
            return None, f"{exc} (a damaged update)"
        except Exception as exc:  # noqa: BLE001 - any damage means the same: the work is not trusted
            return None, f"{path} is damaged or missing ({why_unreadable(exc)})"
        if not isinstance(update, dict):
            return None, f"{path}: holds a {type(update).__name__}, not a state dict"
        problem = check_update(update, contract)
        return (None, problem) if problem is not None else (update, None)

    @staticmethod
    def _broken(session: Session, record: TaskRecord, problem: str) -> TaskRecord:
        """Record as failed, for the contract, a job that finished with an update this process cannot use, so
        that ``fedsup status`` says why and ``--resume`` runs it again."""
        error = ErrorInfo(kind="contract", type="fedsup.TaskContractError", message=problem, phase="train",
                          device=record.device)
        reason = "its update breaks the federated contract; retrying would not change it"
        broken = record.model_copy(update={"status": TaskStatus.FAILED, "error": error, "reason": reason})
        finished = [i for i, a in enumerate(broken.history) if a.status is TaskStatus.FINISHED]
        at = finished[-1] if finished else len(broken.history) - 1  # not a speculative copy that lost after it
        if at >= 0:
            entry = broken.history[at].model_copy(update={"status": TaskStatus.EXCEPTION, "error": error})
            broken.history = [*broken.history[:at], entry, *broken.history[at + 1:]]
        if session.run_dir is not None:
            session.run_dir.write_record(broken)
            session.run_dir.event(task=record.task_id, attempt=record.attempts, status="FAILED",
                                  previous="FINISHED", kind="contract", error=error.summary(), reason=reason)
        return broken

    def _shortfall(self, round_: int, finished: int, failures: list[TaskRecord]) -> Exception:
        """The error that ends a round short of ``min_clients``, with its root cause: the failing jobs' errors
        (the contract breakers first). TaskContractError (bad input, exit 2) where a client broke the
        contract, since no retry or resume can mend that; RunFailed otherwise."""
        broke = [r for r in failures if r.error is not None and r.error.kind == "contract"]
        ordered = broke + [r for r in failures if r not in broke]
        causes = "; ".join(f"{r.task_id}: {_cause(r)}" for r in ordered[:CAUSES_SHOWN])
        if len(ordered) > CAUSES_SHOWN:
            causes += f"; and {len(ordered) - CAUSES_SHOWN} more (fedsup status {self.path} lists them)"
        message = (f"round {round_}: {finished} client(s) finished, fewer than min_clients={self.spec.min_clients};"
                   f" {len(failures)} failed: {causes or 'none'}")
        return TaskContractError(message) if broke else RunFailed(message)

    def _client_state_ref(self, client: int, update_dir: Path | None = None) -> StateRef | dict[str, Any]:
        """The client's newest state: this round's, where ``update_dir`` holds one, else its committed one."""
        if update_dir is not None and ClientStates.pending(update_dir, client).exists():
            return StateRef(str(ClientStates.pending(update_dir, client)))
        committed = self.client_states.committed(client)
        return {} if committed is None else StateRef(str(committed))

    def _update(self, client: int, record: TaskRecord, update_dir: Path, state: State) -> ClientUpdate:
        metrics = {k: v for k, v in (record.result or {}).items() if k not in ("state", "num_examples")}
        pending = ClientStates.pending(update_dir, client)
        committed = self.client_states.committed(client)
        return ClientUpdate(client, state, int(record.result["num_examples"]),
                            metrics, client_state=load_state(pending) if pending.exists() else {},
                            previous_client_state=load_state(committed) if committed is not None else {})

    def _evaluate(self, session: Session, round_: int, chosen: list[int],
                  broadcast: StateRef | None) -> dict[str, float]:
        results: list[tuple[int, dict[str, Any]]] = []
        jobs = []
        for i in chosen:
            task_id = self._task_id(round_, i, "evaluate")
            previous = session.run_dir.read_record(task_id) if session.run_dir else None
            if previous is not None and previous.ok:
                self._current[task_id] = _tally(previous)
                results.append((int(previous.result["num_examples"]), previous.result))
                continue
            update_dir = self.path / "updates" / f"round-{round_}"
            jobs.append(Job(self._client(i), task_id=task_id, method="evaluate", federated=True,
                            context={"global_state": broadcast, "round": round_,
                                     "client_state": self._client_state_ref(i, update_dir)},
                            seed=derive_seed(self.spec.seed, round_, i, "evaluate")))
        for record in session.run(jobs):
            self._current[record.task_id] = _tally(record)
            self._check_contract(record)
            if record.ok:
                results.append((int(record.result["num_examples"]), record.result))
        return weighted_metrics([(n, {k: v for k, v in r.items() if k != "num_examples"}) for n, r in results])

    @staticmethod
    def _check_contract(record: TaskRecord) -> None:
        """An evaluate() or initial_state() that broke the contract ends the run (a bug in the client class)."""
        if record.error is not None and record.error.kind == "contract" and not record.ok:
            raise TaskContractError(f"task {record.task_id}: {record.error.message}")

    def _finish_round(self, session: Session, result: RoundResult) -> None:
        """rounds.jsonl is the commit point of a round: after it, the round's updates are no longer needed."""
        result.jobs = _totals(self._current.values())
        data = result.to_json()
        line = json.dumps(data) + "\n"
        assert session.run_dir is not None
        clients = [int(task.rsplit("client-", 1)[1]) for task in result.finished]
        kept = self.client_states.commit(result.round, self.path / "updates" / f"round-{result.round}", clients)
        session.run_dir.commit()  # the round's records and updates are durable before the line that commits it
        with open(self.path / "rounds.jsonl", "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        # only now that the line is on disk: a checkpoint being pruned is never the newest complete one
        self.client_states.prune(result.round, kept, self.retention.oldest_resumable(result.round))
        prune(self.path / "checkpoints", self.retention, result.round)
        shutil.rmtree(self.path / "updates" / f"round-{result.round}", ignore_errors=True)
        with contextlib.suppress(OSError):
            (self.path / "updates").rmdir()  # between rounds, an empty folder is only clutter
        session.run_dir.event(event="round_finished", round=result.round, finished=len(result.finished),
                              failed=len(result.failed), eval_metrics=result.eval_metrics)
        self.last, self.completed = result, self.completed + 1
        self._base, self._current = _add(self._base, result.jobs), {}
        self._emit(event="round_finished", **data)
        self._summary("running")
        self.trackers.round(data)

    def _resume_totals(self, lines: list[dict[str, Any]]) -> None:
        """The totals and the newest round of the complete rounds a resume keeps, from their lines (and, for a
        run directory of the older layout, whose lines lack them, from its per-task records)."""
        self.completed = len(lines)
        if lines:
            fields = RoundResult.__dataclass_fields__
            self.last = RoundResult(**{k: v for k, v in lines[-1].items() if k in fields})
        records, _ = read_record_lines(self.path / "records" / "initial.jsonl")
        self._base = _totals([_tally(r) for r in records.values()])
        if all(isinstance(line.get("jobs"), dict) for line in lines):
            for line in lines:
                self._base = _add(self._base, line["jobs"])
            return
        done = len(lines)
        legacy = [r for r in read_records(self.path)
                  if r.task_id == "initial-state" or _round_of(r.task_id) in range(1, done + 1)]
        self._base = _add(self._base, _totals([_tally(r) for r in legacy]))

    def _summary(self, status: str) -> dict[str, Any]:
        if status not in ("running", "finished") and self.round:
            # a round cut short: its jobs' records as written, those session.run never handed back too
            found, _ = read_record_lines(self.path / "records" / f"round-{self.round}.jsonl")
            self._current.update({task: _tally(r) for task, r in found.items()})
        totals = _add(self._base, _totals(self._current.values()))
        last = self.last
        summary = {
            "name": self.spec.name,
            "status": status,
            "rounds": self.spec.rounds,
            "rounds_completed": self.completed,
            "final_metrics": {**(last.train_metrics if last else {}),
                              **{f"eval_{k}": v for k, v in (last.eval_metrics if last else {}).items()}},
            "totals": {**totals, "duration": round(time.time() - self.started, 3)},
            "started": self.started,
            "ended": time.time(),
        }
        write_json(self.path / "summary.json", summary)
        return summary


def _tally(record: TaskRecord) -> tuple[int, bool, float]:
    return record.attempts, record.status is TaskStatus.FAILED, record.cpu_time


def _totals(tally: Any) -> dict[str, Any]:
    rows = list(tally)
    return {"tasks": len(rows), "attempts": sum(a for a, _, _ in rows), "failed": sum(f for _, f, _ in rows),
            "cpu_time": round(sum(c for _, _, c in rows), 6)}


def _add(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    return {"tasks": int(a["tasks"]) + int(b.get("tasks", 0)),
            "attempts": int(a["attempts"]) + int(b.get("attempts", 0)),
            "failed": int(a["failed"]) + int(b.get("failed", 0)),
            "cpu_time": round(float(a["cpu_time"]) + float(b.get("cpu_time", 0.0)), 6)}


def _round_of(task_id: str) -> int:
    """R of a job id ``round-R.client-I[.method]``; 0 for any other id."""
    head = task_id.split(".", 1)[0]
    return int(head[6:]) if head.startswith("round-") and head[6:].isdigit() else 0


def _cause(record: TaskRecord) -> str:
    """A failed job's root cause in one line: its last error's type and message."""
    if record.error is None:
        return record.reason or record.status.value
    first = (record.error.message.strip().splitlines() or [""])[0]
    first = first if len(first) <= 300 else first[:297] + "..."
    return f"{record.error.type}: {first}"
