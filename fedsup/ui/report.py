"""The HTML report of a run: one self-contained page that needs nothing but a browser.

It shows a device timeline of every attempt's load and train phases, metrics per round, peak memory per
task, the failures and the slowest tasks. The page's skeleton and its CSS are package data
(``assets/report.html``, ``assets/report.css``); the charts come from ``fedsup.ui.charts`` and the
numbers from ``fedsup.ui.digest``.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from string import Template

from fedsup.engine.records import SpanRecord
from fedsup.engine.rundir import write_atomic
from fedsup.engine.units import format_bytes
from fedsup.ui.charts import (
    EVAL_COLOUR,
    FAIL_COLOUR,
    LOAD_COLOUR,
    START_COLOUR,
    TRAIN_COLOUR,
    esc,
    render_memory,
    render_metrics,
    render_timeline,
    truncate,
)
from fedsup.ui.digest import (
    MAX_ERROR_CHARS,
    Attempt,
    Digest,
    RunData,
    TaskView,
    digest,
    fmt_seconds,
    fmt_value,
    heterogeneity,
    kept_state,
    load_run,
    slowest,
)

MAX_FAILURE_ROWS = 200
STATUS_COLOURS = {"finished": "#2e9e6a", "failed": "#d62728", "interrupted": "#d98c1f",
                  "incomplete": "#d98c1f", "running": "#3b6fb6", "killed": "#8a8f98"}


# ---------------------------------------------------------------- tables


def render_participation(run: RunData) -> str:
    rows = []
    for row in run.rounds[:MAX_FAILURE_ROWS]:
        work = [float(w) for w in (row.get("stragglers") or {}).values() if isinstance(w, (int, float))]
        share = f" (work {min(work):.2f}-{max(work):.2f})" if work else ""
        cells = [str(row.get("round")), str(len(row.get("selected") or [])), f"{len(work)}{share}",
                 str(len(row.get("dropped") or [])), str(len(row.get("dropped_out") or [])),
                 str(len(row.get("finished") or []))]
        rows.append("<tr>" + "".join(f'<td class="num">{esc(c)}</td>' for c in cells) + "</tr>")
    kept = kept_state(run)
    note = (f'<p class="note">Kept state: {kept["clients"]} client(s) hold {esc(format_bytes(kept["client_bytes"]))} '
            f'in client_state/ (newest from round {kept["newest_client_round"]})'
            + (f'; the strategy\'s state of round {kept["strategy_round"]} is '
               f'{esc(format_bytes(kept["strategy_bytes"] or 0))}' if kept["strategy_round"] else "") + ".</p>")
    return ('<table class="participation"><thead><tr><th>round</th><th>sampled</th><th>stragglers</th>'
            f'<th>dropped</th><th>dropped out</th><th>finished</th></tr></thead><tbody>{"".join(rows)}</tbody>'
            f'</table>{note}')


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
    slow = slowest(tasks)
    if not slow:
        return '<p class="note">No task durations recorded.</p>'
    rows = "".join(
        f'<tr><td class="task">{esc(t.task)}</td><td>{_pill(t.status)}</td><td class="num">{t.attempts}</td>'
        f'<td class="num">{fmt_seconds(t.duration)}</td>'
        f'<td class="num">{fmt_seconds(t.cpu_time)}</td><td class="num">{format_bytes(t.peak_memory)}</td></tr>'
        for t in slow)
    table = ('<table><thead><tr><th>task</th><th>outcome</th><th>attempts</th><th>duration</th><th>CPU time</th>'
             f'<th>peak memory</th></tr></thead><tbody>{rows}</tbody></table>')
    return table + render_span_breakdown(slow)


def render_span_breakdown(tasks: list[TaskView]) -> str:
    """Where the slowest tasks' time went, by their measured spans (fedsup.span), nested as they ran."""
    measured = [t for t in tasks if t.spans]
    if not measured:
        return ""
    parts = ['<h3>Spans of the slowest tasks</h3><table class="spans"><thead><tr><th>task · span</th><th>data</th>'
             '<th>duration</th><th>share</th><th>CPU time</th><th>peak memory</th><th>peak GPU memory</th>'
             "</tr></thead><tbody>"]
    for task in measured:
        for span, depth in _walk(task.spans):
            share = f"{100 * span.duration / task.duration:.0f} %" if task.duration else "-"
            data = ", ".join(f"{k}={fmt_value(v)}" for k, v in span.data.items())
            failed = ' <span class="pill FAILED">failed</span>' if span.failed else ""
            parts.append(
                f'<tr data-task="{esc(task.task)}" data-span="{esc(span.name)}"><td class="task" '
                f'style="padding-left:{0.5 + 1.2 * depth:.1f}em">{esc(task.task) + " · " if depth == 0 else ""}'
                f"{esc(span.name)}{failed}</td><td>{esc(data)}</td><td class='num'>{fmt_seconds(span.duration)}</td>"
                f'<td class="num">{share}</td><td class="num">{fmt_seconds(span.cpu_time)}</td>'
                f'<td class="num">{format_bytes(span.peak_memory)}</td>'
                f'<td class="num">{format_bytes(span.peak_gpu_memory)}</td></tr>')
    return "".join(parts) + "</tbody></table>"


def _walk(spans: list[SpanRecord], depth: int = 0) -> Iterator[tuple[SpanRecord, int]]:
    for span in spans:
        yield span, depth
        yield from _walk(span.children, depth + 1)


# ---------------------------------------------------------------- the page

def _asset(name: str) -> Template:
    """A page file from ``fedsup/ui/assets``. The style sheet's ``$name`` placeholders are the chart colours,
    filled in from ``fedsup.ui.charts`` so that the page and its charts agree."""
    return Template((resources.files("fedsup.ui") / "assets" / name).read_text(encoding="utf-8"))


CSS = _asset("report.css")
PAGE = _asset("report.html")


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
    if any(heterogeneity(run).values()) or kept_state(run)["clients"] or kept_state(run)["strategy_round"]:
        sections.insert(2, _section("Participation and kept state", "Per round, from rounds.jsonl: stragglers "
                                    "(with the share of local work each did), stragglers dropped, clients that "
                                    "dropped out; and what outlives the rounds: the clients' states and the "
                                    "strategy's.", render_participation(run)))
    if run.config is not None:
        sections.append(_section("Configuration", "", f"<details><summary>config.yaml</summary>"
                                                      f"<pre>{esc(run.config)}</pre></details>"))
    return PAGE.substitute(title=esc(f"fedsup run {d.name}"), css=css, header=_header(d, run),
                           sections="".join(sections), generated=esc(_utc(time.time())))


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
    cards = [("tasks", str(d.task_total), False), ("finished", str(d.count("FINISHED")), False),
             ("failed", str(d.count("FAILED")), d.count("FAILED") > 0),
             ("retried", str(d.retried), False), ("attempts", str(d.attempt_total), False)]
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
    page = render_html(run).encode("utf-8")
    try:  # through a symlink to the file it names (a loop is an error), not over the link
        write_atomic(target.resolve(), page)
    except OSError as exc:  # name the page, not the temporary file beside it
        raise OSError(exc.errno, exc.strerror, str(target)) from exc
    return target
