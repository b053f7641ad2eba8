"""Run reports: read a run directory and summarise it as text, as JSON, or as one self-contained HTML page.

The page needs nothing but a browser: inline CSS, and charts drawn here as inline SVG, with SVG ``<title>``
elements for tooltips (no JavaScript, no fonts, nothing fetched). It shows a device timeline of every
attempt's load and train phases, metrics per round, peak memory per task and the failures.

Only ``events.jsonl`` and the task records are expected; ``rounds.jsonl``, ``summary.json`` and
``config.yaml`` are optional and the report says what it could not find. A killed run leaves a truncated
last line in its logs: lines that do not parse are skipped and counted.
"""

from __future__ import annotations

import html
import json
import math
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from string import Template
from typing import Any

from pydantic import ValidationError

from fedsup.engine.errors import ConfigError
from fedsup.engine.records import AttemptRecord, PhaseRecord, TaskRecord
from fedsup.engine.rundir import write_atomic
from fedsup.engine.units import format_bytes

OUTCOMES = ("FINISHED", "FAILED", "CANCELLED")
ATTEMPT_FAILED = frozenset({"EXCEPTION", "INTERRUPT", "CRASHED", "TIMEOUT"})
PHASE_OF = {"LOADING": "load", "TRAINING": "train"}
MAX_CONFIG_CHARS = 64_000
MAX_FAILURE_ROWS = 200
MAX_ERROR_CHARS = 400
MAX_BARS = 40_000      # timeline bars; beyond this, phases a few pixels apart are merged (page size)
MAX_TITLE_PHASES = 8
ALL_MEMORY_BARS = 30   # up to this many tasks the memory chart has a bar for each
TOP_MEMORY_BARS = 15   # beyond, a bar for each of the largest, and histograms of all
SLOWEST = 10

# Colours: the timeline's phases, failure marks, memory bars, metric series.
START_COLOUR = "#c7ccd4"
LOAD_COLOUR = "#5b8def"
TRAIN_COLOUR = "#2e9e6a"
EVAL_COLOUR = "#d9a21b"
FAIL_COLOUR = "#d62728"
HOST_COLOUR = "#f29e38"
GPU_COLOUR = "#7b5cc4"
SERIES_COLOURS = {"train": "#3b6fb6", "eval": "#e8772e"}  # any other series is grey
STATUS_COLOURS = {"finished": "#2e9e6a", "failed": "#d62728", "interrupted": "#d98c1f",
                  "incomplete": "#d98c1f", "running": "#3b6fb6"}


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
    missing: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def load_run(run_dir: str | Path) -> RunData:
    """Parse a run directory; raise ConfigError when it holds neither an event log nor task records."""
    path = Path(run_dir)
    if not (path / "events.jsonl").is_file() and not (path / "tasks").is_dir():
        raise ConfigError(f"{path}: not a fedsup run directory (no events.jsonl and no tasks/)")
    run = RunData(path, [], [], {}, [], None, None)
    lines = _read_jsonl(run, "events.jsonl")
    run.events = [e for e in lines if "task" in e and isinstance(e.get("status"), str) and _is_number(e.get("time"))]
    run.run_events = [e for e in lines if "event" in e]
    run.records = _read_records(run)
    run.rounds = sorted((r for r in _read_jsonl(run, "rounds.jsonl") if _is_number(r.get("round"))),
                        key=lambda r: r["round"])
    run.summary = _read_summary(run)
    run.config = _read_config(run)
    return run


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _read_jsonl(run: RunData, name: str) -> list[dict[str, Any]]:
    path = run.path / name
    if not path.is_file():
        run.missing.append(name)
        return []
    rows: list[dict[str, Any]] = []
    bad = 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        row = _parse_line(line)
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
    if not isinstance(row, dict) or not _is_number(row.get("time", 0)):
        return None
    return row


def _read_records(run: RunData) -> dict[str, TaskRecord]:
    records: dict[str, TaskRecord] = {}
    for path in sorted((run.path / "tasks").glob("*/record.json")):
        try:
            record = TaskRecord.model_validate_json(path.read_bytes())
        except (OSError, ValidationError) as exc:
            run.problems.append(f"{path.relative_to(run.path)}: unreadable ({type(exc).__name__})")
            continue
        records[record.task_id] = record
    if not records:
        run.missing.append("tasks/*/record.json")
    return records


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


@dataclass
class Attempt:
    """One process's go at a task, as the timeline draws it."""

    task: str
    number: int
    device: str | None = None
    spans: list[Span] = field(default_factory=list)
    status: str = "INIT"
    kind: str | None = None     # the error kind of a failed attempt
    error: str | None = None
    failed_at: float | None = None

    @property
    def start(self) -> float:
        return self.spans[0].start

    @property
    def end(self) -> float:
        return max(s.end for s in self.spans)

    @property
    def failed(self) -> bool:
        return self.failed_at is not None


def _attempts_from_events(events: list[dict[str, Any]], log_end: float) -> list[Attempt]:
    attempts: dict[tuple[str, int], Attempt] = {}
    for event in events:
        key = (str(event["task"]), _int(event.get("attempt")))
        attempt = attempts.get(key)
        if attempt is None:
            attempt = attempts[key] = Attempt(*key)
        _apply(attempt, event)
    for attempt in attempts.values():
        _close(attempt, log_end, still_open=True)
    return list(attempts.values())


def _int(value: Any) -> int:
    return int(value) if _is_number(value) else 0


def _apply(attempt: Attempt, event: dict[str, Any]) -> None:
    status, when = event["status"], float(event["time"])
    _close(attempt, when)
    if status in PHASE_OF:
        attempt.spans.append(Span(PHASE_OF[status], when, math.inf))
        attempt.device = attempt.device or _text_or_none(event.get("device"))
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
        attempt = Attempt(record.task_id, entry.attempt, entry.device, status=entry.status.value)
        for phase in _phases(entry):
            kind = phase.phase if phase.phase in ("load", "evaluate") else "train"
            attempt.spans.append(Span(kind, phase.started, phase.started + phase.duration))
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
    attempts = _attempts_from_events(run.events, _log_end(run))
    for attempt in attempts:
        _refine(attempt, run.records.get(attempt.task))
    logged = {str(e["task"]) for e in run.events}
    for task, record in run.records.items():
        if task not in logged:
            attempts.extend(_attempts_from_record(record))
    return [a for a in attempts if a.spans or a.failed_at is not None]


def _log_end(run: RunData) -> float:
    times = [float(e["time"]) for e in run.events + run.run_events if _is_number(e.get("time"))]
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
    )


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

    @property
    def wall_time(self) -> float:
        return max(0.0, self.ended - self.started)

    def count(self, status: str) -> int:
        return sum(1 for t in self.tasks if t.status == status)

    @property
    def retried(self) -> int:
        return sum(1 for t in self.tasks if t.attempts > 1)


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
        rounds=_int(summary.get("rounds")) or _planned_rounds(run) or None,
        rounds_completed=_int(summary.get("rounds_completed")) or _rounds_completed(run),
        attempts=attempts,
        tasks=tasks,
        cpu_time=_cpu_time(run, summary),
        final_metrics=_final_metrics(run, summary),
    )


def _run_bounds(run: RunData, attempts: list[Attempt]) -> tuple[float, float]:
    summary = run.summary or {}
    times = [float(e["time"]) for e in run.events + run.run_events if _is_number(e.get("time"))]
    times += [t for a in attempts for s in a.spans for t in (s.start, s.end)]
    times += [float(r[k]) for r in run.rounds for k in ("started", "ended") if _is_number(r.get(k))]
    first = min(times, default=math.inf)
    started = min(_number_or(summary.get("started"), first), first)
    started = 0.0 if started == math.inf else started
    ended = _number_or(summary.get("ended"), max(times, default=started))
    return started, max(ended, max(times, default=started))


def _number_or(value: Any, default: float) -> float:
    return float(value) if _is_number(value) else default


def _rounds_completed(run: RunData) -> int:
    logged = {_int(e.get("round")) for e in run.run_events if e.get("event") == "round_finished"}
    return max(len([r for r in run.rounds if "ended" in r]), len(logged))


def _planned_rounds(run: RunData) -> int:
    return max((_int(e.get("rounds")) for e in run.run_events if e.get("event") == "run_started"), default=0)


def _run_status(run: RunData, tasks: list[TaskView]) -> tuple[str, str]:
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
        return sum(r.cpu_time for r in run.records.values())
    totals = summary.get("totals")
    if isinstance(totals, dict) and _is_number(totals.get("cpu_time")):
        return float(totals["cpu_time"])
    return None


def _final_metrics(run: RunData, summary: dict[str, Any]) -> dict[str, Any]:
    if isinstance(summary.get("final_metrics"), dict):
        return dict(summary["final_metrics"])
    if not run.rounds:
        return {}
    last = run.rounds[-1]
    metrics = {f"eval {k}": v for k, v in _metrics(last, "eval_metrics").items()}
    metrics.update({f"train {k}": v for k, v in _metrics(last, "train_metrics").items()})
    return metrics


def _metrics(row: dict[str, Any], key: str) -> dict[str, float]:
    values = row.get(key)
    if not isinstance(values, dict):
        return {}
    return {str(k): float(v) for k, v in values.items() if _is_number(v)}


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
        "tasks": {"total": len(d.tasks), "finished": d.count("FINISHED"), "failed": d.count("FAILED"),
                  "cancelled": d.count("CANCELLED"), "unfinished": d.count("UNFINISHED"), "retried": d.retried},
        "attempts": sum(t.attempts for t in d.tasks),
        "final_metrics": d.final_metrics,
        "slowest": [{"task": t.task, "duration": t.duration} for t in _slowest(d.tasks)],
        "failures": [{"task": t.task, "status": t.status, "attempts": t.attempts, "reason": t.reason}
                   for t in d.tasks if t.status in ("FAILED", "CANCELLED")],
        "missing": list(run.missing),
        "problems": list(run.problems),
    }


def _slowest(tasks: list[TaskView], n: int = SLOWEST) -> list[TaskView]:
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
    if s["slowest"]:
        slow = ", ".join(f"{t['task']} {fmt_seconds(t['duration'])}" for t in s["slowest"][:5])
        lines.append(f"slowest tasks: {slow}")
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
    if _is_number(value):
        return f"{value:.4g}"
    return str(value)


# ---------------------------------------------------------------- SVG helpers


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def num(value: float) -> str:
    text = f"{value:.1f}"
    return text[:-2] if text.endswith(".0") else text


def rect(x: float, y: float, w: float, h: float, fill: str, extra: str = "") -> str:
    return (f'<rect x="{num(x)}" y="{num(y)}" width="{num(max(w, 0.0))}" height="{num(h)}" fill="{fill}"'
            f'{extra}/>')


def line(x1: float, y1: float, x2: float, y2: float, cls: str) -> str:
    return f'<line x1="{num(x1)}" y1="{num(y1)}" x2="{num(x2)}" y2="{num(y2)}" class="{cls}"/>'


def text(x: float, y: float, content: str, cls: str = "", anchor: str = "start") -> str:
    attrs = f' class="{cls}"' if cls else ""
    if anchor != "start":
        attrs += f' text-anchor="{anchor}"'
    return f'<text x="{num(x)}" y="{num(y)}"{attrs}>{esc(content)}</text>'


def svg(svg_id: str, width: float, height: float, body: Iterable[str], label: str) -> str:
    return (f'<svg id="{svg_id}" xmlns="http://www.w3.org/2000/svg" role="img" aria-label="{esc(label)}" '
            f'width="{num(width)}" height="{num(height)}" viewBox="0 0 {num(width)} {num(height)}">'
            + "".join(body) + "</svg>")


def nice_ticks(lo: float, hi: float, count: int = 6, cover: bool = False) -> list[float]:
    """Round tick values in [lo, hi] (or, with ``cover``, just enough to span it): steps of 1, 2 or 5 × 10^k."""
    if not hi > lo:
        hi = lo + 1.0
    raw = (hi - lo) / max(count, 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw * (1 - 1e-9))
    if cover:
        first, last = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
    else:
        first, last = math.ceil(lo / step - 1e-9), math.floor(hi / step + 1e-9)
    return [round(i * step, 12) for i in range(first, last + 1)]


def tick_label(value: float) -> str:
    return f"{value:.6g}"


def truncate(value: str, limit: int) -> str:
    return value if len(value) <= limit else value[: limit - 1] + "…"


def text_width(value: str, size: float = 11.0) -> float:
    """A rough width for a sans-serif label: enough to decide whether it fits inside a bar."""
    return len(value) * size * 0.58


# ---------------------------------------------------------------- the device timeline

WIDTH = 1100  # the page's content width at 1280 px: charts are drawn 1:1, never scaled down
LANE_LABEL = 118.0


def _lane_key(device: str) -> tuple[int, list[Any]]:
    group = 2 if device == "not placed" else (1 if device == "cpu" else 0)
    return group, [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", device)]


def pack_rows(attempts: list[Attempt]) -> list[list[Attempt]]:
    """Greedy interval packing: each attempt goes on the first row free at its start, or on its task's
    previous row when that one is free, so that a retry reads as the next bar of the same task."""
    rows: list[list[Attempt]] = []
    ends: list[float] = []
    row_of: dict[str, int] = {}
    for attempt in sorted(attempts, key=lambda a: (a.start, a.task, a.number)):
        index = row_of.get(attempt.task, -1)
        if index < 0 or ends[index] > attempt.start:
            index = next((i for i, end in enumerate(ends) if end <= attempt.start), len(rows))
        if index == len(rows):
            rows.append([])
            ends.append(-math.inf)
        rows[index].append(attempt)
        ends[index] = attempt.end
        row_of[attempt.task] = index
    return rows


def _lanes(attempts: list[Attempt]) -> list[tuple[str, list[list[Attempt]]]]:
    by_device: dict[str, list[Attempt]] = {}
    for attempt in attempts:
        if attempt.spans:
            by_device.setdefault(attempt.device or "not placed", []).append(attempt)
    return [(device, pack_rows(by_device[device])) for device in sorted(by_device, key=_lane_key)]


@dataclass
class Scale:
    lo: float
    hi: float
    x0: float
    x1: float

    def __call__(self, value: float) -> float:
        span = self.hi - self.lo or 1.0
        return self.x0 + (value - self.lo) / span * (self.x1 - self.x0)


def render_timeline(d: Digest, run: RunData) -> str:
    if not any(a.spans for a in d.attempts):
        return '<p class="note">No task phases in the event log or the records: nothing to draw.</p>'
    scale = Scale(0.0, max(d.wall_time, 1e-3), LANE_LABEL, WIDTH - 24)
    attempts, merged_px = coarsen(d.attempts, scale)
    lanes = _lanes(attempts)
    rows = sum(len(r) for _, r in lanes)
    row_h = max(2.0, min(18.0, 1100.0 / max(rows, 1)))  # a thousand rows still fit in about 2,000 px
    rounds = _round_times(run)
    top = 50.0 if rounds else 32.0
    backgrounds, body, y = [], [], top
    for index, (device, lane_rows) in enumerate(lanes):
        height = max(len(lane_rows) * row_h + 8, 36.0)
        backgrounds.append(rect(0, y, WIDTH, height, "#f4f6f9" if index % 2 == 0 else "#fbfcfd", ' class="lane"'))
        body.append(_lane(device, lane_rows, y, row_h, scale, d.started))
        y += height + 4
    bands = _round_bands(rounds, d.started, scale, top, y - 4)
    axis = _time_axis(scale, y + 2)
    note = (f'<p class="note">{sum(len(a.spans) for a in d.attempts):,} phases: phases of an attempt less than '
            f"{merged_px:g} px apart are drawn as one bar to keep the page small.</p>" if merged_px else "")
    evaluates = any(s.kind == "evaluate" for a in attempts for s in a.spans)
    legend = _timeline_legend(6, evaluates)
    return note + svg("timeline", WIDTH, y + 38, [*backgrounds, bands, *body, axis, legend],
                      "device timeline: load and train phases of every attempt, per device")


def coarsen(attempts: list[Attempt], scale: Scale) -> tuple[list[Attempt], float]:
    """Merge each attempt's same-kind phases closer than 1, 2, 4... px until at most MAX_BARS bars remain.

    Returns the attempts to draw and the merging distance in pixels (0: nothing merged). Needed for long
    federated runs, where every client trains once per round: 1,000 clients by 100 rounds would be 100,000 bars.
    """
    if sum(len(a.spans) for a in attempts) <= MAX_BARS:
        return attempts, 0.0
    seconds_per_px = (scale.hi - scale.lo) / (scale.x1 - scale.x0)
    px, merged = 1.0, attempts
    while True:  # merging what is already merged with a wider gap is the same as merging the originals with it
        merged = [replace(a, spans=_merge_spans(a.spans, px * seconds_per_px)) for a in merged]
        if sum(len(a.spans) for a in merged) <= MAX_BARS or px >= scale.x1 - scale.x0:
            return merged, px
        px *= 2


def _merge_spans(spans: list[Span], gap: float) -> list[Span]:
    out: list[Span] = []
    for span in spans:
        last = out[-1] if out else None
        if last is not None and last.kind == span.kind and span.start - last.end <= gap:
            last.end = max(last.end, span.end)
            last.failed, last.open = last.failed or span.failed, last.open or span.open
        else:
            out.append(Span(span.kind, span.start, span.end, span.failed, span.open))
    return out


def _lane(device: str, rows: list[list[Attempt]], y: float, row_h: float, scale: Scale, origin: float) -> str:
    count = sum(len(r) for r in rows)
    parts = [text(8, y + 16, device, "lane-name"),
             text(8, y + 30, f"{count} attempt{'s' if count != 1 else ''}", "lane-sub")]
    for r, row in enumerate(rows):
        row_y = y + 4 + r * row_h
        parts.extend(_attempt(a, row_y, row_h, scale, origin) for a in row)
    return f'<g class="device" data-device="{esc(device)}">' + "".join(parts) + "</g>"


def _attempt(attempt: Attempt, y: float, row_h: float, scale: Scale, origin: float) -> str:
    bar_h = max(row_h - 3, 1.5)
    parts = [f"<title>{esc(_attempt_title(attempt, origin))}</title>"]
    if len(attempt.spans) > 1:  # the process is alive between its phases: waiting for a device or a round
        parts.append(line(scale(attempt.start - origin), y + bar_h / 2, scale(attempt.end - origin), y + bar_h / 2,
                          "wait"))
    parts.extend(_bars(attempt.spans, y, bar_h, scale, origin))
    if attempt.failed_at is not None:
        parts.append(_cross(scale(attempt.failed_at - origin), y + bar_h / 2, min(bar_h, 10.0)))
    parts.append(_attempt_label(attempt, y, bar_h, scale, origin))
    cls = "attempt failed" if attempt.failed else "attempt"
    return (f'<g class="{cls}" data-task="{esc(attempt.task)}" data-attempt="{attempt.number}">'
            + "".join(parts) + "</g>")


def _bars(spans: list[Span], y: float, bar_h: float, scale: Scale, origin: float) -> list[str]:
    """One path per kind of bar, a rectangle per phase: a fraction of the bytes of a <rect> per phase."""
    shapes: dict[str, list[str]] = {}
    for span in spans:
        x0 = scale(span.start - origin)
        width = max(scale(span.end - origin) - x0, 1.5)
        cls = f"bar {span.kind}" + (" failed" if span.failed else "") + (" open" if span.open else "")
        shapes.setdefault(cls, []).append(f"M{num(x0)} {num(y)}h{num(width)}v{num(bar_h)}h{num(-width)}z")
    return [f'<path class="{cls}" d="{"".join(d)}"/>' for cls, d in shapes.items()]


def _cross(x: float, y: float, size: float) -> str:
    h = size / 2
    return (f'<path class="cross" d="M{num(x - h)} {num(y - h)}L{num(x + h)} {num(y + h)}'
            f'M{num(x - h)} {num(y + h)}L{num(x + h)} {num(y - h)}"/>')


def _attempt_label(attempt: Attempt, y: float, bar_h: float, scale: Scale, origin: float) -> str:
    """The task's name inside the attempt's widest bar, where it fits."""
    label = attempt.task if attempt.number <= 1 else f"{attempt.task} #{attempt.number}"
    widest = max(attempt.spans, key=lambda s: s.end - s.start)
    x0, x1 = scale(widest.start - origin), scale(widest.end - origin)
    if bar_h < 11 or text_width(label, 10) + 8 > x1 - x0:
        return ""
    return text(x0 + 4, y + bar_h / 2 + 3.5, label, "bar-label")


def _attempt_title(attempt: Attempt, origin: float) -> str:
    lines = [f"{attempt.task} · attempt {attempt.number} · {attempt.device or 'not placed'} · {attempt.status}"]
    for span in attempt.spans[:MAX_TITLE_PHASES]:
        what = "process start" if span.kind == "start" else f"{span.kind}()"
        tail = " (still running when the log ends)" if span.open else (" (failed)" if span.failed else "")
        lines.append(f"{what}: {span.start - origin:.2f}–{span.end - origin:.2f} s, "
                     f"{fmt_seconds(span.end - span.start)}{tail}")
    if len(attempt.spans) > MAX_TITLE_PHASES:
        lines.append(f"… and {len(attempt.spans) - MAX_TITLE_PHASES} more phases")
    if attempt.failed:
        lines.append(f"error ({attempt.kind or 'unknown'}): {truncate(attempt.error or 'no message', 300)}")
    return "\n".join(lines)


def _round_bands(rounds: list[tuple[int, float, float]], origin: float, scale: Scale, top: float,
                 bottom: float) -> str:
    """Each round as a bracket above the lanes and a faint band across them (under the bars)."""
    parts = []
    for number, start, end in rounds:
        x0, x1 = scale(start - origin), scale(end - origin)
        parts.append(rect(x0, top - 14, x1 - x0, 12, "#dfe7f3", ' class="round-band"'))
        parts.append(rect(x0, top, x1 - x0, bottom - top, "#3b6fb6", ' class="round-shade"'))
        parts.append(line(x0, top - 14, x0, bottom, "round-edge"))
        label = f"round {number}" if x1 - x0 > 50 else (str(number) if x1 - x0 > 12 else "")
        if label:
            parts.append(text((x0 + x1) / 2, top - 4.5, label, "round-label", "middle"))
    return "".join(parts)


def _round_times(run: RunData) -> list[tuple[int, float, float]]:
    times = [(_int(r["round"]), float(r["started"]), float(r["ended"])) for r in run.rounds
             if _is_number(r.get("started")) and _is_number(r.get("ended"))]
    if times:
        return times
    starts = {_int(e.get("round")): float(e["time"]) for e in run.run_events if e.get("event") == "round_started"}
    ends = {_int(e.get("round")): float(e["time"]) for e in run.run_events if e.get("event") == "round_finished"}
    return [(r, starts[r], ends[r]) for r in sorted(starts) if r in ends]


def _time_axis(scale: Scale, y: float) -> str:
    parts = [line(scale.x0, y, scale.x1, y, "axis")]
    for tick in nice_ticks(scale.lo, scale.hi, 10):
        x = scale(tick)
        parts.append(line(x, y, x, y + 5, "axis"))
        parts.append(text(x, y + 17, tick_label(tick), "tick", "middle"))
    parts.append(text(scale.x1, y + 31, "seconds since the run started", "axis-title", "end"))
    return "".join(parts)


def _timeline_legend(y: float, evaluates: bool) -> str:
    items = [("process start", START_COLOUR, ""), ("load", LOAD_COLOUR, ""), ("train", TRAIN_COLOUR, "")]
    items += [("evaluate", EVAL_COLOUR, "")] if evaluates else []
    items += [("failed attempt", TRAIN_COLOUR, ' class="bar failed"'),
              ("still running when the log ends", "#ffffff", ' class="bar open"')]
    parts, x = [], LANE_LABEL
    for label, colour, extra in items:
        parts.append(rect(x, y, 22, 12, colour, extra))
        if "failed" in extra:
            parts.append(_cross(x + 11, y + 6, 8))
        parts.append(text(x + 28, y + 10, label, "legend"))
        x += 40 + text_width(label, 11)
    return f'<g class="legend">{"".join(parts)}</g>'


# ---------------------------------------------------------------- metrics per round

PANEL_W, PANEL_H, PANEL_GAP = 535, 230, 30


def metric_series(rounds: list[dict[str, Any]]) -> dict[str, dict[str, list[tuple[float, float]]]]:
    """Per metric name, its series ("train", "eval", or "duration") as (round, value) points."""
    panels: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for row in rounds:
        for role in ("train", "eval"):
            for name, value in _metrics(row, f"{role}_metrics").items():
                panels.setdefault(name, {}).setdefault(role, []).append((float(row["round"]), value))
    durations = [(float(r["round"]), float(r["duration"])) for r in rounds if _is_number(r.get("duration"))]
    if durations:
        panels["round duration (s)"] = {"duration": durations}
    return panels


def render_metrics(run: RunData) -> str:
    if not run.rounds:
        return '<p class="note">No <code>rounds.jsonl</code> in this run directory: no per-round metrics.</p>'
    panels = metric_series(run.rounds)
    if not panels:
        return '<p class="note"><code>rounds.jsonl</code> holds no numeric metrics.</p>'
    rows = math.ceil(len(panels) / 2)
    body = [_panel(name, series, (i % 2) * (PANEL_W + PANEL_GAP), (i // 2) * (PANEL_H + 20))
            for i, (name, series) in enumerate(panels.items())]
    return svg("metrics", WIDTH, rows * (PANEL_H + 20) - 20, body, "metrics per round")


def _panel(name: str, series: dict[str, list[tuple[float, float]]], x: float, y: float) -> str:
    points = [p for values in series.values() for p in values]
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    pad = (max(ys) - min(ys)) * 0.08 or abs(max(ys)) * 0.1 or 1.0
    yticks = nice_ticks(min(ys) - pad, max(ys) + pad, 5, cover=True)
    sx = Scale(min(xs), max(max(xs), min(xs) + 1), x + 56, x + PANEL_W - 12)
    sy = Scale(yticks[0], yticks[-1], y + PANEL_H - 34, y + 30)
    parts = [rect(x + 0.5, y + 0.5, PANEL_W - 1, PANEL_H - 1, "#ffffff", ' class="panel"'),
             text(x + 12, y + 19, name, "panel-title")]
    parts += _panel_axes(sx, sy, yticks, y)
    legend_x = x + PANEL_W - 12
    for role, values in reversed(series.items()):
        parts.append(_series(f"{role} {name}" if role != "duration" else name, values, sx, sy, _role_colour(role)))
        legend_x -= 34 + text_width(role)
        parts.append(_legend_item(legend_x, y + 15, role, _role_colour(role)))
    return "".join(parts)


def _role_colour(role: str) -> str:
    return SERIES_COLOURS.get(role, "#6b7280")


def _panel_axes(sx: Scale, sy: Scale, yticks: list[float], top: float) -> list[str]:
    parts = []
    for tick in yticks:
        parts.append(line(sx.x0, sy(tick), sx.x1, sy(tick), "grid"))
        parts.append(text(sx.x0 - 6, sy(tick) + 4, tick_label(tick), "tick", "end"))
    xticks = [t for t in nice_ticks(sx.lo, sx.hi, 8) if float(t).is_integer()]
    for tick in xticks:
        parts.append(line(sx(tick), sy.x0, sx(tick), sy.x0 + 4, "axis"))
        parts.append(text(sx(tick), sy.x0 + 16, tick_label(tick), "tick", "middle"))
    parts.append(line(sx.x0, sy.x0, sx.x1, sy.x0, "axis"))
    parts.append(line(sx.x0, sy.x0, sx.x0, sy.x1, "axis"))
    parts.append(text(sx.x1, sy.x0 + 29, "round", "axis-title", "end"))
    return parts


def _series(label: str, values: list[tuple[float, float]], sx: Scale, sy: Scale, colour: str) -> str:
    points = " ".join(f"{num(sx(r))},{num(sy(v))}" for r, v in sorted(values))
    dots = "" if len(values) > 60 else "".join(
        f'<circle cx="{num(sx(r))}" cy="{num(sy(v))}" r="3" fill="{colour}"><title>{esc(label)}, round '
        f'{tick_label(r)}: {fmt_value(v)}</title></circle>' for r, v in values)
    return (f'<g class="series" data-series="{esc(label)}"><polyline points="{points}" fill="none" '
            f'stroke="{colour}" stroke-width="2"/>{dots}</g>')


def _legend_item(x: float, y: float, label: str, colour: str) -> str:
    return (f'<line x1="{num(x)}" y1="{num(y)}" x2="{num(x + 20)}" y2="{num(y)}" stroke="{colour}" '
            f'stroke-width="2.5"/>' + text(x + 26, y + 4, label, "legend"))


# ---------------------------------------------------------------- peak memory per task

BAR_ROW, BAR_H = 20, 12


def render_memory(tasks: list[TaskView]) -> str:
    measured = [t for t in tasks if t.peak_memory is not None or t.peak_gpu_memory is not None]
    if not measured:
        return '<p class="note">No task records with memory measurements.</p>'
    ranked = sorted(measured, key=lambda t: (-(t.peak_memory or 0), -(t.peak_gpu_memory or 0), t.task))
    shown = ranked if len(ranked) <= ALL_MEMORY_BARS else ranked[:TOP_MEMORY_BARS]
    limit = max(max(t.peak_memory or 0, t.peak_gpu_memory or 0, t.estimate_memory) for t in shown)
    unit, factor = _byte_unit(limit)
    ticks = nice_ticks(0.0, limit / factor, 6, cover=True)
    scale = Scale(0.0, ticks[-1], 210, WIDTH - 70)
    has_gpu = any(t.peak_gpu_memory is not None for t in measured)
    parts = [_memory_legend(has_gpu, any(t.estimate_memory for t in shown))]
    y = 30.0
    for task in shown:
        parts.append(_memory_row(task, y, scale, factor, has_gpu))
        y += BAR_ROW + (BAR_H if has_gpu else 0)
    parts.append(_value_axis(scale, ticks, y + 4, f"peak memory ({unit})"))
    height = y + 44
    if len(measured) > len(shown):
        parts.append(text(0, height, f"the {len(shown)} largest of {len(measured)} tasks; the histograms below "
                                     f"count every task", "note-text"))
        histograms, extra = _histograms(measured, height + 20)
        parts.append(histograms)
        height += 20 + extra
    return svg("memory", WIDTH, height + 8, parts, "peak memory per task")


def _byte_unit(largest: float) -> tuple[str, float]:
    for unit, factor in (("GiB", 1024.0**3), ("MiB", 1024.0**2), ("KiB", 1024.0)):
        if largest >= 2 * factor:
            return unit, factor
    return "bytes", 1.0


def _memory_legend(has_gpu: bool, has_estimate: bool) -> str:
    parts = [rect(210, 4, 14, 12, HOST_COLOUR), text(230, 14, "peak host memory", "legend")]
    if has_gpu:
        parts += [rect(360, 4, 14, 12, GPU_COLOUR), text(380, 14, "peak GPU memory", "legend")]
    if has_estimate:
        parts += [line(510, 3, 510, 17, "estimate"), text(518, 14, "the task's estimate_memory", "legend")]
    return "".join(parts)


def _memory_row(task: TaskView, y: float, scale: Scale, factor: float, has_gpu: bool) -> str:
    title = (f"{task.task} · {task.status} · peak host {format_bytes(task.peak_memory)} · peak GPU "
             f"{format_bytes(task.peak_gpu_memory)} · estimate {format_bytes(task.estimate_memory)}")
    label_y = y + (BAR_H if has_gpu else BAR_H / 2) + 4
    parts = [f"<title>{esc(title)}</title>", text(200, label_y, truncate(task.task, 30), "bar-name", "end")]
    parts.append(_memory_bar(task.peak_memory, y, scale, factor, HOST_COLOUR, "host"))
    if has_gpu:
        parts.append(_memory_bar(task.peak_gpu_memory, y + BAR_H + 1, scale, factor, GPU_COLOUR, "gpu"))
    if task.estimate_memory:
        x = scale(task.estimate_memory / factor)
        parts.append(line(x, y - 2, x, y + BAR_H + 2, "estimate"))
    return f'<g class="mem-row" data-task="{esc(task.task)}">' + "".join(parts) + "</g>"


def _memory_bar(value: int | None, y: float, scale: Scale, factor: float, colour: str, cls: str) -> str:
    if value is None:
        return ""
    right = scale(value / factor)
    return (rect(scale.x0, y, right - scale.x0, BAR_H, colour, f' class="mem {cls}"')
            + text(right + 4, y + BAR_H - 2.5, format_bytes(value), "value"))


def _value_axis(scale: Scale, ticks: list[float], y: float, title: str) -> str:
    parts = [line(scale.x0, y, scale.x1, y, "axis")]
    for tick in ticks:
        parts.append(line(scale(tick), y, scale(tick), y + 4, "axis"))
        parts.append(text(scale(tick), y + 16, tick_label(tick), "tick", "middle"))
    parts.append(text(scale.x1, y + 30, title, "axis-title", "end"))
    return "".join(parts)


def _histograms(tasks: list[TaskView], y: float) -> tuple[str, float]:
    host = [float(t.peak_memory) for t in tasks if t.peak_memory is not None]
    gpu = [float(t.peak_gpu_memory) for t in tasks if t.peak_gpu_memory is not None]
    parts, width = [], (WIDTH - 40) / 2
    if host:
        parts.append(_histogram(host, 0, y, width, "peak host memory, all tasks", HOST_COLOUR))
    if gpu:
        parts.append(_histogram(gpu, width + 40, y, width, "peak GPU memory, all tasks", GPU_COLOUR))
    return "".join(parts), 210.0


def _histogram(values: list[float], x: float, y: float, width: float, title: str, colour: str) -> str:
    unit, factor = _byte_unit(max(values))
    lo, hi = min(values) / factor, max(values) / factor
    ticks = nice_ticks(lo, hi if hi > lo else lo + 1, 6, cover=True)
    lo, hi = ticks[0], ticks[-1]
    bins = 30
    counts = [0] * bins
    for v in values:
        counts[min(int((v / factor - lo) / (hi - lo) * bins), bins - 1)] += 1
    sx = Scale(lo, hi, x + 44, x + width - 8)
    top = nice_ticks(0, max(counts), 4, cover=True)[-1]
    sy = Scale(0, top, y + 160, y + 24)
    parts = [text(x + 44, y + 12, title, "panel-title")]
    step = (hi - lo) / bins
    for i, count in enumerate(counts):
        left, right = sx(lo + i * step), sx(lo + (i + 1) * step)
        tip = f"{count} task(s) with {lo + i * step:.4g}–{lo + (i + 1) * step:.4g} {unit}"
        parts.append(f'<g class="hist-bin"><title>{esc(tip)}</title>'
                     + rect(left + 0.5, sy(count), right - left - 1, sy.x0 - sy(count), colour) + "</g>")
    for tick in nice_ticks(0, top, 4, cover=True):
        parts.append(text(sx.x0 - 6, sy(tick) + 4, tick_label(tick), "tick", "end"))
    parts.append(_value_axis(Scale(lo, hi, sx.x0, sx.x1), [t for t in ticks if lo <= t <= hi], sy.x0, unit))
    return "".join(parts)


# ---------------------------------------------------------------- tables


def render_failures(tasks: list[TaskView]) -> str:
    troubled = [t for t in tasks if t.failures or t.status not in ("FINISHED",)]
    if not troubled:
        return '<p class="note">Every task finished on its first attempt.</p>'
    troubled.sort(key=lambda t: (t.status == "FINISHED", t.task))
    rows = "".join(_failure_row(t) for t in troubled[:MAX_FAILURE_ROWS])
    more = len(troubled) - MAX_FAILURE_ROWS
    tail = f'<p class="note">… and {more} more tasks not shown.</p>' if more > 0 else ""
    return ('<table class="failures"><thead><tr><th>task</th><th>outcome</th><th>attempts</th>'
            f'<th>what went wrong</th></tr></thead><tbody>{rows}</tbody></table>{tail}')


def _failure_row(task: TaskView) -> str:
    items = "".join(
        f'<li><span class="kind">#{a.number} {esc(_what(a))}</span> '
        f'{esc(truncate(a.error or "no message", MAX_ERROR_CHARS))}</li>' for a in task.failures)
    if task.reason:
        items += f'<li class="verdict">{esc(truncate(task.reason, MAX_ERROR_CHARS))}</li>'
    return (f'<tr data-task="{esc(task.task)}"><td class="task">{esc(task.task)}</td><td>{_pill(task.status)}</td>'
            f'<td class="num">{task.attempts}</td><td><ul>{items}</ul></td></tr>')


def _pill(status: str) -> str:
    return f'<span class="pill {esc(status.lower())}">{esc(status)}</span>'


def _what(attempt: Attempt) -> str:
    kind = attempt.kind or "unknown"
    return kind if attempt.status.lower() == kind else f"{attempt.status} · {kind}"


def render_slowest(tasks: list[TaskView]) -> str:
    slow = _slowest(tasks)
    if not slow:
        return '<p class="note">No task durations recorded.</p>'
    rows = "".join(
        f'<tr><td class="task">{esc(t.task)}</td><td>{_pill(t.status)}</td><td class="num">{t.attempts}</td>'
        f'<td class="num">{fmt_seconds(t.duration)}</td>'
        f'<td class="num">{fmt_seconds(t.cpu_time)}</td><td class="num">{format_bytes(t.peak_memory)}</td></tr>'
        for t in slow)
    return ('<table><thead><tr><th>task</th><th>outcome</th><th>attempts</th><th>duration</th><th>CPU time</th>'
            f'<th>peak memory</th></tr></thead><tbody>{rows}</tbody></table>')


# ---------------------------------------------------------------- the page

CSS = Template("""
:root { --ink: #1f2933; --muted: #5f6b7a; --line: #d8dee6; --bg: #f3f5f8; }
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: var(--ink);
       font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1220px; margin: 0 auto; padding: 24px 30px 40px; }
header h1 { margin: 0 0 4px; font-size: 26px; font-weight: 650; display: flex; align-items: center; gap: 12px;
            flex-wrap: wrap; }
.badge { font-size: 13px; font-weight: 600; color: #fff; padding: 3px 10px; border-radius: 999px;
         text-transform: uppercase; letter-spacing: .04em; }
.sub { color: var(--muted); margin: 0 0 16px; word-break: break-all; }
.cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(130px, 1fr)); gap: 10px; }
.card { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 10px 12px; }
.card .v { font-size: 21px; font-weight: 650; font-variant-numeric: tabular-nums; }
.card .k { color: var(--muted); font-size: 12px; text-transform: uppercase; letter-spacing: .04em; }
.card.bad .v { color: #c81e1e; }
.chips { margin: 12px 0 0; display: flex; flex-wrap: wrap; gap: 8px; }
.chip { background: #fff; border: 1px solid var(--line); border-radius: 6px; padding: 3px 9px; }
.chip b { font-variant-numeric: tabular-nums; }
.notes { margin: 12px 0 0; padding-left: 20px; color: #8a5a00; }
section { background: #fff; border: 1px solid var(--line); border-radius: 10px; padding: 16px 18px 18px;
          margin-top: 22px; overflow-x: auto; }
section h2 { margin: 0 0 4px; font-size: 18px; }
.hint, .note { color: var(--muted); margin: 0 0 12px; }
svg { display: block; max-width: 100%; height: auto; font-family: inherit; }
svg text { font-size: 11px; fill: var(--ink); }
svg .lane-name { font-weight: 650; font-size: 12px; }
svg .lane-sub, svg .tick, svg .axis-title, svg .note-text, svg .value { fill: var(--muted); }
svg .round-label { fill: #334766; font-size: 10px; font-weight: 600; }
svg .round-shade { fill-opacity: .045; }
svg .round-edge { stroke: #9fb3d1; stroke-width: 1; stroke-dasharray: 3 3; }
svg .panel-title { font-weight: 650; font-size: 12.5px; }
svg .bar-label { font-size: 10px; paint-order: stroke; stroke: #fff; stroke-width: 3px; stroke-linejoin: round; }
svg .axis { stroke: #8792a2; stroke-width: 1; }
svg .grid { stroke: #e8ecf1; stroke-width: 1; }
svg .wait { stroke: #9aa3ad; stroke-width: 1; stroke-dasharray: 2 2; }
svg .bar.start { fill: $start; }
svg .bar.load { fill: $load; }
svg .bar.train { fill: $train; }
svg .bar.evaluate { fill: $evaluate; }
svg .bar.failed { stroke: $fail; stroke-width: 2; }
svg .bar.open { stroke: #1f2933; stroke-width: 1.2; stroke-dasharray: 3 2; }
svg .cross { stroke: $fail; stroke-width: 2.2; stroke-linecap: round; fill: none; }
svg .estimate { stroke: #1f2933; stroke-width: 2; }
svg .panel { stroke: var(--line); }
svg g.attempt:hover rect.bar { filter: brightness(1.1); }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; padding: 6px 10px; border-bottom: 1px solid var(--line); vertical-align: top; }
th { font-size: 12px; color: var(--muted); text-transform: uppercase; letter-spacing: .04em; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.task { font-family: ui-monospace, "SFMono-Regular", Menlo, Consolas, monospace; font-size: 13px;
          min-width: 150px; max-width: 320px; overflow-wrap: anywhere; }
td ul { margin: 0; padding-left: 16px; }
td li { word-break: break-word; }
.kind { font-weight: 600; color: #b42318; }
.verdict { color: var(--muted); font-style: italic; }
.pill { font-size: 11px; font-weight: 600; padding: 2px 7px; border-radius: 999px; background: #e5e7eb; }
.pill.finished { background: #dcf3e6; color: #17663f; }
.pill.failed { background: #fde2e1; color: #b42318; }
.pill.cancelled, .pill.unfinished { background: #fdf0d5; color: #8a5a00; }
pre { background: #f6f8fa; border: 1px solid var(--line); border-radius: 6px; padding: 10px; overflow-x: auto;
      font-size: 12.5px; }
footer { color: var(--muted); font-size: 12px; margin-top: 20px; text-align: center; }
""")


def render_html(run: RunData) -> str:
    """The whole report as one self-contained HTML page."""
    d = digest(run)
    css = CSS.substitute(start=START_COLOUR, load=LOAD_COLOUR, train=TRAIN_COLOUR, evaluate=EVAL_COLOUR,
                         fail=FAIL_COLOUR)
    sections = [
        _section("Device timeline", _timeline_hint(d), render_timeline(d, run)),
        _section("Metrics per round", "From rounds.jsonl: each round's train_metrics and eval_metrics, and how "
                 "long the round took.", render_metrics(run)),
        _section("Peak memory per task", "Largest of any phase of any attempt, measured in the task's process.",
                 render_memory(d.tasks)),
        _section("Failed and retried tasks", "Every attempt that went wrong, with its error kind, and why a task "
                 "was given up.", render_failures(d.tasks)),
        _section("Slowest tasks", "First attempt's start to last attempt's end.", render_slowest(d.tasks)),
    ]
    if run.config is not None:
        sections.append(_section("Configuration", "", f"<details><summary>config.yaml</summary>"
                                                      f"<pre>{esc(run.config)}</pre></details>"))
    return ('<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>fedsup run {esc(d.name)}</title><style>{css}</style></head>"
            f"<body><main>{_header(d, run)}{''.join(sections)}"
            f"<footer>fedsup report · generated {esc(_utc(time.time()))}</footer></main></body></html>\n")


def _section(title: str, hint: str, body: str) -> str:
    slug = re.sub(r"[^a-z]+", "-", title.lower()).strip("-")
    hint_html = f'<p class="hint">{esc(hint)}</p>' if hint else ""
    return f'<section id="{slug}"><h2>{esc(title)}</h2>{hint_html}{body}</section>'


def _timeline_hint(d: Digest) -> str:
    return (f"One lane per device; overlapping attempts stack in rows. {len(d.attempts)} attempts over "
            f"{fmt_seconds(d.wall_time)}. Hover a bar for its phases and error.")


def _utc(epoch: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(epoch))


def _header(d: Digest, run: RunData) -> str:
    colour = STATUS_COLOURS.get(d.status, "#6b7280")
    when = f"started {_utc(d.started)}" if d.started else "start time unknown"
    cards = [("tasks", str(len(d.tasks)), False), ("finished", str(d.count("FINISHED")), False),
             ("failed", str(d.count("FAILED")), d.count("FAILED") > 0),
             ("retried", str(d.retried), False), ("attempts", str(sum(t.attempts for t in d.tasks)), False)]
    if d.count("CANCELLED") or d.count("UNFINISHED"):
        cards.append(("cancelled / unfinished", f"{d.count('CANCELLED')} / {d.count('UNFINISHED')}", True))
    if d.rounds or d.rounds_completed:
        cards.append(("rounds", f"{d.rounds_completed} / {d.rounds or '?'}", False))
    cards += [("CPU time", fmt_seconds(d.cpu_time), False), ("wall time", fmt_seconds(d.wall_time), False)]
    card_html = "".join(f'<div class="card{" bad" if bad else ""}"><div class="v">{esc(v)}</div>'
                        f'<div class="k">{esc(k)}</div></div>' for k, v, bad in cards)
    chips = "".join(f'<span class="chip">{esc(k)} <b>{esc(fmt_value(v))}</b></span>'
                    for k, v in d.final_metrics.items())
    chips_html = f'<div class="chips"><span class="chip">final metrics</span>{chips}</div>' if chips else ""
    return (f'<header><h1>{esc(d.name)} <span class="badge" style="background:{colour}">{esc(d.status)}</span>'
            f'</h1><p class="sub">{esc(str(run.path))} · {esc(when)} · status from {esc(d.status_source)}</p>'
            f'<div class="cards">{card_html}</div>{chips_html}{_notes(run)}</header>')


def _notes(run: RunData) -> str:
    why = {"rounds.jsonl": "no per-round metrics", "summary.json": "status and totals come from the event log",
           "config.yaml": "configuration not shown", "events.jsonl": "timeline drawn from the task records",
           "tasks/*/record.json": "no memory or CPU measurements"}
    notes = [f"{name} not found: {why.get(name, 'skipped')}" for name in run.missing] + run.problems
    if not notes:
        return ""
    return '<ul class="notes">' + "".join(f"<li>{esc(n)}</li>" for n in notes) + "</ul>"


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the HTML report (to RUN_DIR/report.html unless ``out`` is given), atomically; return its path."""
    run = load_run(run_dir)
    target = Path(out) if out is not None else Path(run_dir) / "report.html"
    write_atomic(target, render_html(run).encode("utf-8"))
    return target
