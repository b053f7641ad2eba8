"""A run directory read into a digest: its attempts, tasks and totals, and the text and JSON summaries.

Only ``events.jsonl`` and the task records (``records/*.jsonl``, or ``tasks/*/record.json`` in plain runs and
runs of the older layout) are expected; ``rounds.jsonl``, ``summary.json`` and
``config.yaml`` are optional and the digest says what it could not find. A killed run leaves a truncated
last line in its logs: lines that do not parse are skipped and counted. ``fedsup status`` prints the
summaries; ``fedsup.ui.charts`` and ``fedsup.ui.report`` draw the same digest as a page.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from fedsup.engine.errors import ConfigError
from fedsup.engine.records import AttemptRecord, PhaseRecord, SpanRecord, TaskRecord
from fedsup.engine.rundir import LockState, lock_state
from fedsup.engine.units import format_bytes

OUTCOMES = ("FINISHED", "FAILED", "CANCELLED")
ATTEMPT_FAILED = frozenset({"EXCEPTION", "INTERRUPT", "CRASHED", "TIMEOUT"})
PHASE_OF = {"LOADING": "load", "TRAINING": "train"}
MAX_CONFIG_CHARS = 64_000
MAX_ERROR_CHARS = 400
SLOWEST = 10
# A run of more complete rounds than this is read in detail for its newest DETAIL_ROUNDS only; the older are
# counted from their records without reading them one by one (but for the jobs that failed or were retried),
# so that `fedsup status` and `fedsup report` of a run of 1,000 rounds x 50 clients take about what 50 do.
DETAIL_ROUNDS = 50
_PLAIN_FINISH = b'","status":"FINISHED","attempts":1,'  # how the record of a job that went well goes on
FAILURES_SHOWN = 5  # failed tasks named, with their errors, in the text summary
CLIENT_STATE_FILE = re.compile(r"^client-(\d+)\.round-(\d+)\.pt$")
STRATEGY_STATE_FILE = re.compile(r"^round-(\d+)\.strategy\.pt$")


# ---------------------------------------------------------------- loading


@dataclass
class RunData:
    """What a run directory holds, parsed; missing parts are empty and named in ``missing``."""

    path: Path
    events: list[dict[str, Any]]            # task transitions, in the order they were written
    run_events: list[dict[str, Any]]        # run-level lines (an "event" key): run and round starts and ends
    records: dict[str, TaskRecord]          # by task id
    rounds: list[dict[str, Any]]
    summary: dict[str, Any] | None
    config: str | None
    lock: LockState = field(default_factory=lambda: LockState(exists=False, held=False, pid=None))
    missing: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    older: Older | None = None              # rounds counted, not read in detail (a long run)


@dataclass
class Older:
    """The rounds of a long run before ``first_detailed``: of their jobs, those that finished at the first
    attempt are only counted (``tasks``, ``cpu_time``); the others are in ``records`` like any."""

    first_detailed: int
    tasks: int = 0
    cpu_time: float = 0.0
    line_cpu: dict[int, float] = field(default_factory=dict)  # per older round: its line's jobs' CPU time


def load_run(run_dir: str | Path, detail_rounds: int | None = DETAIL_ROUNDS) -> RunData:
    """Parse a run directory; raise ConfigError when it holds neither an event log nor task records.

    ``detail_rounds``: in a run of grouped records (``records/``) with more complete rounds than this, only
    the newest ``detail_rounds`` are read in detail (``RunData.older`` says what the others add up to);
    None reads everything."""
    path = Path(run_dir)
    if not (path / "events.jsonl").is_file() and not (path / "tasks").is_dir() and not (path / "records").is_dir():
        raise ConfigError(f"{path}: not a fedsup run directory (no events.jsonl, no records/ and no tasks/)")
    run = RunData(path, [], [], {}, [], None, None)
    run.rounds = sorted((r for r in _read_jsonl(run, "rounds.jsonl") if is_number(r.get("round"))),
                        key=lambda r: r["round"])
    complete = max((whole(r["round"]) for r in run.rounds), default=0)
    if detail_rounds is not None and complete > detail_rounds and (path / "records").is_dir():
        run.older = Older(first_detailed=complete - detail_rounds + 1)
        for row in run.rounds:
            jobs = row.get("jobs")
            if isinstance(jobs, dict) and is_number(jobs.get("cpu_time")):
                run.older.line_cpu[whole(row["round"])] = float(jobs["cpu_time"])
    lines = _read_jsonl(run, "events.jsonl", run.older.first_detailed if run.older else None)
    run.events = [e for e in lines if "task" in e and isinstance(e.get("status"), str) and is_number(e.get("time"))]
    run.run_events = [e for e in lines if "event" in e]
    if run.older is not None:  # a line of an older round's job after the detailed rounds began (an exit)
        run.events = [e for e in run.events if _round_of(str(e["task"])) == 0
                      or _round_of(str(e["task"])) >= run.older.first_detailed]
    run.records = _read_records(run)
    run.summary = _read_summary(run)
    run.config = _read_config(run)
    run.lock = lock_state(path)
    return run


def _round_of(task_id: str) -> int:
    """R of a federated job's id ``round-R.client-I[.method]``; 0 for any other id."""
    head = task_id.split(".", 1)[0]
    return int(head[6:]) if head.startswith("round-") and head[6:].isdigit() else 0


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _read_jsonl(run: RunData, name: str, from_round: int | None = None) -> list[dict[str, Any]]:
    """The lines of a JSON-lines file. ``from_round`` (the event log of a long run): every run-level line
    (``"event"``), but task lines only from the first ``round_started`` of that round on."""
    path = run.path / name
    if not path.is_file():
        run.missing.append(name)
        return []
    rows: list[dict[str, Any]] = []
    bad = 0
    detailed = from_round is None
    for raw in path.read_bytes().splitlines():
        if not detailed and b'"event": ' not in raw:
            continue  # a task line of a round read only in sum; json.dumps escapes every quote in a value
        line = raw.decode("utf-8", errors="replace")
        row = _parse_line(line)
        if row is not None and not detailed and row.get("event") == "round_started" \
                and whole(row.get("round")) >= (from_round or 0):
            detailed = True
        if row is None:
            bad += 1 if line.strip() else 0
        else:
            rows.append(row)
    if bad:
        run.problems.append(f"{name}: skipped {bad} line(s) that did not parse (a killed run truncates the last)")
    return rows


def _parse_line(line: str) -> dict[str, Any] | None:
    try:
        row = json.loads(line)
    except ValueError:
        return None
    if not isinstance(row, dict) or not is_number(row.get("time", 0)):
        return None
    return row


def _read_records(run: RunData) -> dict[str, TaskRecord]:
    """The records of both layouts: ``records/<group>.jsonl`` (a line a record; a task's last line counts)
    and, from runs of the older layout and plain runs, ``tasks/<task>/record.json``."""
    records: dict[str, TaskRecord] = {}
    if (run.path / "tasks").is_dir():
        for path in sorted((run.path / "tasks").glob("*/record.json")):
            try:
                record = TaskRecord.model_validate_json(path.read_bytes())
            except (OSError, ValidationError) as exc:
                run.problems.append(f"{path.relative_to(run.path)}: unreadable ({type(exc).__name__})")
                continue
            records[record.task_id] = record
    for path in _record_files(run.path):
        _read_record_file(run, path, records, counted=_counted_only(run, path))
    if not records:
        run.missing.append("records/*.jsonl" if (run.path / "records").is_dir() else "tasks/*/record.json")
    return records


def _record_files(path: Path) -> list[Path]:
    """``records/*.jsonl`` in the order they were written: the initial state's, then round by round."""
    def order(file: Path) -> tuple[int, str]:
        stem = file.stem
        return (int(stem[6:]) if stem.startswith("round-") and stem[6:].isdigit() else -1, stem)
    return sorted((path / "records").glob("*.jsonl"), key=order)


def _counted_only(run: RunData, path: Path) -> bool:
    """Whether ``path`` is the records file of a round before the ones a long run's digest reads in detail."""
    stem = path.stem
    return (run.older is not None and stem.startswith("round-") and stem[6:].isdigit()
            and int(stem[6:]) < run.older.first_detailed)


def _read_record_file(run: RunData, path: Path, records: dict[str, TaskRecord], counted: bool = False) -> None:
    """Add the file's records to ``records``. ``counted``: a job that finished at its first attempt is only
    counted in ``run.older`` (found from the start of its line, without parsing it: the line of a record
    begins with its task id, status and attempts)."""
    try:
        lines = path.read_bytes().splitlines()
    except OSError as exc:
        run.problems.append(f"{path.relative_to(run.path)}: unreadable ({type(exc).__name__})")
        return
    bad = 0
    plain: dict[str, bytes] = {}
    read: dict[str, float] = {}  # the CPU time of the jobs read here, by task
    for line in lines:
        if not line.strip():
            continue
        if counted and line.startswith(b'{"task_id":"'):
            end = line.find(b'","status":', 12)
            if end > 0 and line.startswith(_PLAIN_FINISH, end):
                task = line[12:end].decode("utf-8", errors="replace")
                plain[task] = line
                records.pop(task, None)  # a later line of the same task counts, not the earlier one
                read.pop(task, None)
                continue
        try:
            record = TaskRecord.model_validate_json(line)
        except ValidationError:
            bad += 1
            continue
        records[record.task_id] = record
        read[record.task_id] = record.cpu_time
        plain.pop(record.task_id, None)  # a later line of the same task counts, not the earlier one
    if counted and run.older is not None:
        # the round's line has the CPU time of all its jobs: the counted ones' is what the read ones leave
        run.older.tasks += len(plain)
        run.older.cpu_time += max(0.0, run.older.line_cpu.get(int(path.stem[6:]), 0.0) - sum(read.values()))
    if bad:
        run.problems.append(f"{path.relative_to(run.path)}: skipped {bad} line(s) that did not parse "
                            "(a killed run truncates the last)")


def _read_summary(run: RunData) -> dict[str, Any] | None:
    path = run.path / "summary.json"
    if not path.is_file():
        run.missing.append("summary.json")
        return None
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        run.problems.append("summary.json: does not parse")
        return None
    return summary if isinstance(summary, dict) else None


def _read_config(run: RunData) -> str | None:
    for name in ("config.yaml", "config.yml"):
        path = run.path / name
        if path.is_file():
            return path.read_text(encoding="utf-8", errors="replace")[:MAX_CONFIG_CHARS]
    run.missing.append("config.yaml")
    return None


# ---------------------------------------------------------------- attempts, from the event log


@dataclass
class Span:
    """One bar of the timeline: a process starting, or a load, train or evaluate phase."""

    kind: str            # "start" | "load" | "train" | "evaluate"
    start: float
    end: float
    failed: bool = False
    open: bool = False   # the log ends before the phase did
    cut: bool = False    # the supervisor died (SIGKILL) during the phase: it ends at the last event before resume


@dataclass
class Mark:
    """A measured span (``fedsup.span``) inside a phase, as the timeline draws it: nested ones one level down."""

    name: str
    start: float
    end: float
    depth: int
    failed: bool = False


def marks_of(spans: list[SpanRecord], depth: int = 0) -> list[Mark]:
    out: list[Mark] = []
    for span in spans:
        out.append(Mark(span.name, span.started, span.started + span.duration, depth, span.failed))
        out.extend(marks_of(span.children, depth + 1))
    return out


@dataclass
class Attempt:
    """One process's go at a task, as the timeline draws it."""

    task: str
    number: int
    device: str | None = None
    spans: list[Span] = field(default_factory=list)
    status: str = "INIT"
    node: str | None = None     # the cluster node it ran on (Ray backend); None on one machine
    kind: str | None = None     # the error kind of a failed attempt
    error: str | None = None
    failed_at: float | None = None
    marks: list[Mark] = field(default_factory=list)   # the measured spans inside its phases (fedsup.span)

    @property
    def start(self) -> float:
        return self.spans[0].start

    @property
    def end(self) -> float:
        return max(s.end for s in self.spans)

    @property
    def failed(self) -> bool:
        return self.failed_at is not None

    @property
    def cut_off(self) -> bool:
        return any(s.cut for s in self.spans)


def _attempts_from_events(events: list[dict[str, Any]], log_end: float,
                          cuts: list[tuple[float, float]] | None = None) -> list[Attempt]:
    """``cuts``: (a resume's ``run_started`` time, the last event's before it), in order. At each, the
    attempts of the run before are done: a phase still open was cut off by the supervisor's death."""
    attempts: dict[tuple[str, int], Attempt] = {}
    ended: list[Attempt] = []
    pending = sorted(cuts or [])
    for event in events:
        while pending and pending[0][0] <= float(event["time"]):
            last = pending.pop(0)[1]
            for before in attempts.values():
                if before.spans and before.spans[-1].end == math.inf:
                    _close(before, last)
                    before.spans[-1].cut = True
            ended += attempts.values()
            attempts = {}  # the resumed run's jobs start their attempts anew, maybe with the same numbers
        key = (str(event["task"]), whole(event.get("attempt")))
        attempt = attempts.get(key)
        if attempt is None:
            attempt = attempts[key] = Attempt(*key)
        _apply(attempt, event)
    for attempt in attempts.values():
        _close(attempt, log_end, still_open=True)
    return ended + list(attempts.values())


def whole(value: Any) -> int:
    return int(value) if is_number(value) else 0


def _apply(attempt: Attempt, event: dict[str, Any]) -> None:
    status, when = event["status"], float(event["time"])
    _close(attempt, when)
    if status in PHASE_OF:
        attempt.spans.append(Span(PHASE_OF[status], when, math.inf))
        attempt.device = attempt.device or _text_or_none(event.get("device"))
    attempt.node = attempt.node or _text_or_none(event.get("node"))  # the driver names it on every event
    if status in ATTEMPT_FAILED:
        if attempt.spans and attempt.spans[-1].end == when:
            attempt.spans[-1].failed = True
        attempt.failed_at = when
        attempt.kind = _text_or_none(event.get("kind"))
        attempt.error = _text_or_none(event.get("error"))
    if status not in ("INIT", "FAILED"):  # the requeue and the verdict come after the attempt itself
        attempt.status = status


def _close(attempt: Attempt, when: float, still_open: bool = False) -> None:
    if attempt.spans and attempt.spans[-1].end == math.inf:
        attempt.spans[-1].end = max(when, attempt.spans[-1].start)
        attempt.spans[-1].open = still_open


def _text_or_none(value: Any) -> str | None:
    return None if value is None else str(value)


def _attempts_from_record(record: TaskRecord) -> list[Attempt]:
    attempts = []
    for entry in record.history:
        attempt = Attempt(record.task_id, entry.attempt, entry.device, status=entry.status.value,
                          node=entry.node)
        for phase in _phases(entry):
            kind = phase.phase if phase.phase in ("load", "evaluate") else "train"
            attempt.spans.append(Span(kind, phase.started, phase.started + phase.duration))
            attempt.marks.extend(marks_of(phase.spans))
        if entry.status.value in ATTEMPT_FAILED:
            attempt.failed_at = entry.ended or (attempt.spans[-1].end if attempt.spans else entry.started)
            if attempt.spans:
                attempt.spans[-1].failed = True
        _note_error(attempt, entry.error)
        attempts.append(attempt)
    return attempts


def _phases(entry: AttemptRecord) -> list[PhaseRecord]:
    """The attempt's phases in the order they ran (records of older runs lack the federated ones)."""
    names = ("load", "train", "evaluate", "initial_state")
    phases = [getattr(entry, name, None) for name in names]
    return sorted((p for p in phases if p is not None), key=lambda p: p.started)


def _note_error(attempt: Attempt, error: Any) -> None:
    if error is not None:
        attempt.kind = attempt.kind or error.kind
        attempt.error = attempt.error or error.summary()


def _refine(attempt: Attempt, record: TaskRecord | None) -> None:
    """Split the parent's view of loading into the process starting and the load phase the child measured."""
    entry = next((h for h in record.history if h.attempt == attempt.number), None) if record else None
    if entry is None:
        return
    attempt.device = attempt.device or entry.device
    attempt.node = attempt.node or entry.node
    attempt.marks = [m for phase in _phases(entry) for m in marks_of(phase.spans)]
    _note_error(attempt, entry.error)
    if getattr(entry, "evaluate", None) is not None and entry.train is None:
        for span in attempt.spans:  # the log says TRAINING for every method; the record says which ran
            span.kind = "evaluate" if span.kind == "train" else span.kind
    load = next((s for s in attempt.spans if s.kind == "load"), None)
    if load is None or entry.load is None:
        return
    begun = entry.load.started
    if load.start + 0.001 < begun < load.end:
        attempt.spans.insert(attempt.spans.index(load), Span("start", load.start, begun))
        load.start = begun


def build_attempts(run: RunData) -> list[Attempt]:
    """Every attempt with something to draw: from the event log, or from a record where the log has none."""
    attempts = _attempts_from_events(run.events, _log_end(run), _resumes(run))
    for attempt in attempts:
        if not attempt.cut_off:  # the record tells of the attempt that ran after the resume
            _refine(attempt, run.records.get(attempt.task))
    logged = {str(e["task"]) for e in run.events}
    for task, record in run.records.items():
        if task not in logged:
            attempts.extend(_attempts_from_record(record))
    return [a for a in attempts if a.spans or a.failed_at is not None]


def _resumes(run: RunData) -> list[tuple[float, float]]:
    """Each later ``run_started`` (a start after the first: a resume) with the time of the last event before it."""
    times = sorted(float(e["time"]) for e in run.events + run.run_events if is_number(e.get("time")))
    starts = sorted(float(e["time"]) for e in run.run_events
                    if e.get("event") == "run_started" and is_number(e.get("time")))
    cuts, i = [], 0
    for start in starts:
        while i < len(times) and times[i] < start:
            i += 1
        if i:
            cuts.append((start, times[i - 1]))
    return cuts


def _log_end(run: RunData) -> float:
    times = [float(e["time"]) for e in run.events + run.run_events if is_number(e.get("time"))]
    return max(times, default=0.0)


# ---------------------------------------------------------------- per task and per run


@dataclass
class TaskView:
    task: str
    status: str                 # FINISHED, FAILED, CANCELLED, or UNFINISHED when the log ends first
    attempts: int
    duration: float | None
    cpu_time: float | None
    peak_memory: int | None
    peak_gpu_memory: int | None
    estimate_memory: int
    reason: str | None
    failures: list[Attempt]
    error: dict[str, Any] | None = None   # the last attempt's error: kind, type, message
    spans: list[SpanRecord] = field(default_factory=list)   # the last attempt's top-level spans
    retried: bool = False       # an attempt went wrong and it ran again (a speculative copy's race is not)


def build_tasks(run: RunData, attempts: list[Attempt]) -> list[TaskView]:
    by_task: dict[str, list[Attempt]] = {}
    for attempt in attempts:
        by_task.setdefault(attempt.task, []).append(attempt)
    events: dict[str, list[dict[str, Any]]] = {}
    for event in run.events:
        events.setdefault(str(event["task"]), []).append(event)
    order = list(dict.fromkeys(list(events) + list(run.records)))
    return [_task_view(task, run.records.get(task), events.get(task, []), by_task.get(task, [])) for task in order]


def _task_view(task: str, record: TaskRecord | None, events: list[dict[str, Any]],
               attempts: list[Attempt]) -> TaskView:
    spans = [s for a in attempts for s in a.spans]
    duration = record.duration if record else (max(s.end for s in spans) - min(s.start for s in spans)
                                               if spans else None)
    return TaskView(
        task=task,
        status=record.status.value if record else _status_from_events(events),
        attempts=max([record.attempts if record else 0] + [a.number for a in attempts]),
        duration=duration,
        cpu_time=record.cpu_time if record else None,
        peak_memory=record.peak_memory if record else None,
        peak_gpu_memory=record.peak_gpu_memory if record else None,
        estimate_memory=record.estimate_memory if record else 0,
        reason=_reason(events, record),
        failures=[a for a in attempts if a.failed],
        error=_last_error(record, attempts),
        spans=record.spans if record else [],
        retried=record.retried if record else len([a for a in attempts if a.kind != "superseded"]) > 1,
    )


def _last_error(record: TaskRecord | None, attempts: list[Attempt]) -> dict[str, Any] | None:
    """The root cause of a task that did not finish: its record's last error, else the event log's."""
    if record is not None and record.error is not None and not record.ok:
        first = (record.error.message.strip().splitlines() or [""])[0]
        return {"kind": record.error.kind, "type": record.error.type, "message": first[:MAX_ERROR_CHARS]}
    failed = [a for a in attempts if a.failed and a.error]
    if record is None and failed:
        last = failed[-1]
        kind, text = last.kind, str(last.error)
        type_, _, message = text.partition(": ")
        return {"kind": kind, "type": type_ if message else None, "message": (message or text)[:MAX_ERROR_CHARS]}
    return None


def _status_from_events(events: list[dict[str, Any]]) -> str:
    statuses = [e["status"] for e in events]
    if statuses and statuses[-1] in OUTCOMES:
        return str(statuses[-1])
    if statuses and statuses[-1] == "EXITED" and "FINISHED" in statuses:
        return "FINISHED"  # a federated client sent away after its last round
    return "UNFINISHED"


def _reason(events: list[dict[str, Any]], record: TaskRecord | None) -> str | None:
    verdicts = [e.get("reason") for e in events if e["status"] in ("FAILED", "CANCELLED")]
    if verdicts and verdicts[-1]:
        return str(verdicts[-1])
    if record is not None and record.error is not None and not record.ok:
        return record.error.summary()
    return None


@dataclass
class Digest:
    """Everything the summaries and the page show, computed once."""

    name: str
    status: str
    status_source: str
    started: float
    ended: float
    rounds: int | None
    rounds_completed: int
    attempts: list[Attempt]
    tasks: list[TaskView]
    cpu_time: float | None
    final_metrics: dict[str, Any]
    counted: int = 0  # jobs of a long run's older rounds that finished at their first attempt: not in tasks

    @property
    def wall_time(self) -> float:
        return max(0.0, self.ended - self.started)

    def count(self, status: str) -> int:
        return sum(1 for t in self.tasks if t.status == status) + (self.counted if status == "FINISHED" else 0)

    @property
    def task_total(self) -> int:
        return len(self.tasks) + self.counted

    @property
    def attempt_total(self) -> int:
        return sum(t.attempts for t in self.tasks) + self.counted

    @property
    def retried(self) -> int:
        return sum(1 for t in self.tasks if t.retried)


def digest(run: RunData) -> Digest:
    attempts = build_attempts(run)
    tasks = build_tasks(run, attempts)
    summary = run.summary or {}
    started, ended = _run_bounds(run, attempts)
    status, source = _run_status(run, tasks)
    return Digest(
        name=str(summary.get("name") or run.path.resolve().name),
        status=status,
        status_source=source,
        started=started,
        ended=ended,
        rounds=whole(summary.get("rounds")) or _planned_rounds(run) or None,
        rounds_completed=whole(summary.get("rounds_completed")) or _rounds_completed(run),
        attempts=attempts,
        tasks=tasks,
        cpu_time=_cpu_time(run, summary),
        final_metrics=_final_metrics(run, summary),
        counted=run.older.tasks if run.older else 0,
    )


def _run_bounds(run: RunData, attempts: list[Attempt]) -> tuple[float, float]:
    summary = run.summary or {}
    times = [float(e["time"]) for e in run.events + run.run_events if is_number(e.get("time"))]
    times += [t for a in attempts for s in a.spans for t in (s.start, s.end)]
    times += [float(r[k]) for r in run.rounds for k in ("started", "ended") if is_number(r.get(k))]
    first = min(times, default=math.inf)
    started = min(_number_or(summary.get("started"), first), first)
    started = 0.0 if started == math.inf else started
    ended = _number_or(summary.get("ended"), max(times, default=started))
    return started, max(ended, max(times, default=started))


def _number_or(value: Any, default: float) -> float:
    return float(value) if is_number(value) else default


def _rounds_completed(run: RunData) -> int:
    logged = {whole(e.get("round")) for e in run.run_events if e.get("event") == "round_finished"}
    return max(len([r for r in run.rounds if "ended" in r]), len(logged))


def _planned_rounds(run: RunData) -> int:
    return max((whole(e.get("rounds")) for e in run.run_events if e.get("event") == "run_started"), default=0)


def _run_status(run: RunData, tasks: list[TaskView]) -> tuple[str, str]:
    """The run's status, and what says so. The run's lock decides whether it is running: a run killed
    (SIGKILL, a power cut) leaves "running" in summary.json but holds the lock no more."""
    if run.lock.held:
        return "running", f"the run's lock, held by pid {run.lock.pid}" if run.lock.pid else "the run's lock"
    status, source = _recorded_status(run, tasks)
    if run.lock.exists and status in ("running", "incomplete"):
        said = source.split(" (")[0]
        return "killed", f"the run's lock: no process holds it, though {said} says {status}; --resume continues it"
    return status, source


def _recorded_status(run: RunData, tasks: list[TaskView]) -> tuple[str, str]:
    if run.summary and isinstance(run.summary.get("status"), str):
        return run.summary["status"], "summary.json"
    ends = [e for e in run.run_events if e.get("event") == "run_finished" and isinstance(e.get("status"), str)]
    if ends:
        return str(ends[-1]["status"]), "the event log"
    events = {e.get("event") for e in run.run_events}
    if "run_started" in events and "run_finished" not in events:
        return "incomplete", "the event log (a run_started line and no run_finished)"
    if any(t.status == "UNFINISHED" for t in tasks):
        return "incomplete", "the event log (some tasks never reached an outcome)"
    if any(t.status == "CANCELLED" for t in tasks):
        return "interrupted", "the event log"
    return "finished", "the event log"


def _cpu_time(run: RunData, summary: dict[str, Any]) -> float | None:
    if run.records:
        return sum(r.cpu_time for r in run.records.values()) + (run.older.cpu_time if run.older else 0.0)
    totals = summary.get("totals")
    if isinstance(totals, dict) and is_number(totals.get("cpu_time")):
        return float(totals["cpu_time"])
    return None


def _final_metrics(run: RunData, summary: dict[str, Any]) -> dict[str, Any]:
    if isinstance(summary.get("final_metrics"), dict):
        return dict(summary["final_metrics"])
    if not run.rounds:
        return {}
    last = run.rounds[-1]
    metrics = {f"eval {k}": v for k, v in round_metrics(last, "eval_metrics").items()}
    metrics.update({f"train {k}": v for k, v in round_metrics(last, "train_metrics").items()})
    return metrics


def round_metrics(row: dict[str, Any], key: str) -> dict[str, float]:
    values = row.get(key)
    if not isinstance(values, dict):
        return {}
    return {str(k): float(v) for k, v in values.items() if is_number(v)}


# ---------------------------------------------------------------- text and JSON


def json_summary(run: RunData) -> dict[str, Any]:
    """The run in a few numbers: status, rounds, task counts, times, final metrics, slowest tasks, failures."""
    d = digest(run)
    return {
        "name": d.name,
        "path": str(run.path),
        "status": d.status,
        "status_source": d.status_source,
        "started": d.started,
        "ended": d.ended,
        "wall_time": d.wall_time,
        "cpu_time": d.cpu_time,
        "rounds": d.rounds,
        "rounds_completed": d.rounds_completed,
        "tasks": {"total": d.task_total, "finished": d.count("FINISHED"), "failed": d.count("FAILED"),
                  "cancelled": d.count("CANCELLED"), "unfinished": d.count("UNFINISHED"), "retried": d.retried},
        "attempts": d.attempt_total,
        "final_metrics": d.final_metrics,
        "slowest": [{"task": t.task, "duration": t.duration, "spans": [s.model_dump() for s in t.spans]}
                    for t in slowest(d.tasks)],
        "running_pid": run.lock.pid if run.lock.held else None,
        "failures": [{"task": t.task, "status": t.status, "attempts": t.attempts, "reason": t.reason,
                      "error": t.error, "spans": [s.model_dump() for s in t.spans]}
                     for t in d.tasks if t.status in ("FAILED", "CANCELLED")],
        "heterogeneity": heterogeneity(run),
        "kept_state": kept_state(run),
        "missing": list(run.missing),
        "problems": list(run.problems),
        "detailed_from_round": run.older.first_detailed if run.older else None,
    }


def heterogeneity(run: RunData) -> dict[str, int]:
    """Stragglers, stragglers dropped and clients that dropped out, summed over the run's rounds."""
    totals = {"stragglers": 0, "dropped": 0, "dropped_out": 0}
    for row in run.rounds:
        for key in totals:
            value = row.get(key)
            totals[key] += len(value) if isinstance(value, (list, dict)) else 0
    return totals


def kept_state(run: RunData) -> dict[str, Any]:
    """What outlives the rounds besides the model: the clients' states and the strategy's, by their files."""
    clients: dict[str, tuple[int, int]] = {}  # client -> (round, bytes)
    folder = run.path / "client_state"
    if folder.is_dir():
        for entry in os.scandir(folder):
            found = CLIENT_STATE_FILE.match(entry.name)
            if found and int(found.group(2)) >= clients.get(found.group(1), (0, 0))[0]:
                clients[found.group(1)] = (int(found.group(2)), entry.stat().st_size)
    strategy = sorted((int(m.group(1)), p.stat().st_size) for p in (run.path / "checkpoints").glob("*.strategy.pt")
                      if (m := STRATEGY_STATE_FILE.match(p.name)))
    return {"clients": len(clients), "client_bytes": sum(size for _, size in clients.values()),
            "newest_client_round": max((r for r, _ in clients.values()), default=None),
            "strategy_round": strategy[-1][0] if strategy else None,
            "strategy_bytes": strategy[-1][1] if strategy else None}


def slowest(tasks: list[TaskView], n: int = SLOWEST) -> list[TaskView]:
    timed = [t for t in tasks if t.duration is not None]
    return sorted(timed, key=lambda t: -(t.duration or 0.0))[:n]


def text_summary(run: RunData) -> str:
    """A few lines for a terminal."""
    s = json_summary(run)
    tasks = s["tasks"]
    lines = [f"run {s['name']}: {s['status']} (from {s['status_source']})"]
    if s["rounds"] or s["rounds_completed"]:
        lines.append(f"rounds: {s['rounds_completed']} of {s['rounds'] or '?'} completed")
    lines.append(f"tasks: {tasks['total']} ({tasks['finished']} finished, {tasks['failed']} failed, "
                 f"{tasks['cancelled']} cancelled, {tasks['unfinished']} unfinished); {tasks['retried']} retried, "
                 f"{s['attempts']} attempts")
    lines.append(f"CPU time: {fmt_seconds(s['cpu_time'])}   wall time: {fmt_seconds(s['wall_time'])}")
    if s["final_metrics"]:
        lines.append("final metrics: " + ", ".join(f"{k}={fmt_value(v)}" for k, v in s["final_metrics"].items()))
    if any(s["heterogeneity"].values()):
        h = s["heterogeneity"]
        lines.append(f"stragglers: {h['stragglers']} partial, {h['dropped']} dropped; {h['dropped_out']} dropped out")
    kept = s["kept_state"]
    if kept["clients"] or kept["strategy_round"]:
        lines.append(f"kept state: {kept['clients']} client(s), {format_bytes(kept['client_bytes'])}"
                     + (f"; strategy state of round {kept['strategy_round']}" if kept["strategy_round"] else ""))
    if s["slowest"]:
        slow = ", ".join(f"{t['task']} {fmt_seconds(t['duration'])}" for t in s["slowest"][:5])
        lines.append(f"slowest tasks: {slow}")
    failed = [f for f in s["failures"] if f["status"] == "FAILED"]
    for failure in failed[:FAILURES_SHOWN]:
        error = failure["error"]
        cause = (f"{error['type']}: {error['message']}" if error and error["type"] else
                 error["message"] if error else failure["reason"] or "no error recorded")
        lines.append(f"failed: {failure['task']} ({failure['attempts']} attempt(s)): {cause}")
    if len(failed) > FAILURES_SHOWN:
        lines.append(f"failed: and {len(failed) - FAILURES_SHOWN} more (--json lists them all)")
    if s["detailed_from_round"]:
        lines.append(f"note: rounds before {s['detailed_from_round']} are counted from their records, not read "
                     "one by one (but for jobs that failed or were retried): the slowest tasks are of the newer")
    for problem in s["problems"]:
        lines.append(f"note: {problem}")
    if s["missing"]:
        lines.append("missing: " + ", ".join(s["missing"]))
    return "\n".join(lines)


def fmt_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 10:
        return f"{seconds:.2f} s"
    if seconds < 120:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    return f"{minutes // 60}h {minutes % 60:02d}m"


def fmt_value(value: Any) -> str:
    if is_number(value):
        return f"{value:.4g}"
    return str(value)
