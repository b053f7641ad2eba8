"""The report's charts, drawn as inline SVG: the device timeline, metrics per round, peak memory per task.

Self-contained: no JavaScript, no fonts, nothing fetched; SVG ``<title>`` elements give the tooltips.
Every chart is drawn 1:1 at the page's content width, from a ``fedsup.ui.digest`` digest.
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

from fedsup.engine.units import format_bytes
from fedsup.ui.digest import (
    Attempt,
    Digest,
    Mark,
    RunData,
    Span,
    TaskView,
    fmt_seconds,
    fmt_value,
    is_number,
    round_metrics,
    whole,
)

MAX_BARS = 40_000      # timeline bars; beyond this, phases a few pixels apart are merged (page size)
MAX_TITLE_PHASES = 8
MIN_MARK_PX = 4        # a measured span narrower than this is left out of its bar
ALL_MEMORY_BARS = 30   # up to this many tasks the memory chart has a bar for each
TOP_MEMORY_BARS = 15   # beyond, a bar for each of the largest, and histograms of all

# Colours: the timeline's phases, failure marks, memory bars, metric series.
START_COLOUR = "#c7ccd4"
LOAD_COLOUR = "#5b8def"
TRAIN_COLOUR = "#2e9e6a"
EVAL_COLOUR = "#d9a21b"
FAIL_COLOUR = "#d62728"
HOST_COLOUR = "#f29e38"
GPU_COLOUR = "#7b5cc4"
SERIES_COLOURS = {"train": "#3b6fb6", "eval": "#e8772e"}  # any other series is grey


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


Lane = tuple[str | None, str]  # (node, device): the node is None on one machine


def lane_label(lane: Lane) -> str:
    node, device = lane
    return device if node is None else f"{node} / {device}"


def _lanes(attempts: list[Attempt]) -> list[tuple[Lane, list[list[Attempt]]]]:
    """One lane per device; on a cluster (any attempt has a node) per node and device, since every node has
    its own ``cpu`` and ``cuda:0``. The nodes in name order, each node's devices as on one machine."""
    on_nodes = any(a.node for a in attempts if a.spans)
    by_lane: dict[Lane, list[Attempt]] = {}
    for attempt in attempts:
        if attempt.spans:
            lane = (attempt.node if on_nodes else None, attempt.device or "not placed")
            by_lane.setdefault(lane, []).append(attempt)

    def order(lane: Lane) -> tuple[bool, str, tuple[int, list[Any]]]:
        return lane[0] is None, lane[0] or "", _lane_key(lane[1])  # attempts never placed on a node go last

    return [(lane, pack_rows(by_lane[lane])) for lane in sorted(by_lane, key=order)]


def _label_room(attempts: list[Attempt]) -> float:
    """The width left of the bars for the lane labels: LANE_LABEL, or wider for "node / device" labels (up to
    a third of the chart). A run on one machine keeps LANE_LABEL, whatever its device names."""
    if not any(a.node for a in attempts if a.spans):
        return LANE_LABEL
    widest = max(text_width(lane_label((a.node, a.device or "not placed")), 12.0) for a in attempts if a.spans)
    return min(max(LANE_LABEL, widest + 16), WIDTH / 3)


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
    lo = _detailed_start(d, run)
    scale = Scale(lo, max(d.wall_time, lo + 1e-3), _label_room(d.attempts), WIDTH - 24)
    attempts, merged_px = coarsen([a for a in d.attempts if a.spans and a.end - d.started >= lo], scale)
    lanes = _lanes(attempts)
    rows = sum(len(r) for _, r in lanes)
    row_h = max(2.0, min(18.0, 1100.0 / max(rows, 1)))  # a thousand rows still fit in about 2,000 px
    rounds = [r for r in _round_times(run) if r[1] - d.started >= lo]
    top = 50.0 if rounds else 32.0
    backgrounds, body, y = [], [], top
    for index, (lane, lane_rows) in enumerate(lanes):
        height = max(len(lane_rows) * row_h + 8, 36.0)
        backgrounds.append(rect(0, y, WIDTH, height, "#f4f6f9" if index % 2 == 0 else "#fbfcfd", ' class="lane"'))
        body.append(_lane(lane, lane_rows, y, row_h, scale, d.started))
        y += height + 4
    bands = _round_bands(rounds, d.started, scale, top, y - 4)
    axis = _time_axis(scale, y + 2)
    note = (f'<p class="note">{sum(len(a.spans) for a in d.attempts):,} phases: phases of an attempt less than '
            f"{merged_px:g} px apart are drawn as one bar to keep the page small.</p>" if merged_px else "")
    if run.older:
        note += (f'<p class="note">Rounds {run.older.first_detailed} on: the {run.older.first_detailed - 1} '
                 "rounds before are counted, not drawn (their metrics are in the charts below).</p>")
    evaluates = any(s.kind == "evaluate" for a in attempts for s in a.spans)
    legend = _timeline_legend(6, evaluates, cut=any(a.cut_off for a in attempts))
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
        # merged bars have lost their phases' own extent: the spans inside them are left out too
        merged = [replace(a, spans=_merge_spans(a.spans, px * seconds_per_px), marks=[]) for a in merged]
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
            last.cut = last.cut or span.cut
        else:
            out.append(Span(span.kind, span.start, span.end, span.failed, span.open, span.cut))
    return out


def _lane(lane: Lane, rows: list[list[Attempt]], y: float, row_h: float, scale: Scale, origin: float) -> str:
    node, device = lane
    count = sum(len(r) for r in rows)
    parts = [text(8, y + 16, lane_label(lane), "lane-name"),
             text(8, y + 30, f"{count} attempt{'s' if count != 1 else ''}", "lane-sub")]
    for r, row in enumerate(rows):
        row_y = y + 4 + r * row_h
        parts.extend(_attempt(a, row_y, row_h, scale, origin) for a in row)
    where = f' data-node="{esc(node)}"' if node is not None else ""
    return f'<g class="device" data-device="{esc(device)}"{where}>' + "".join(parts) + "</g>"


def _attempt(attempt: Attempt, y: float, row_h: float, scale: Scale, origin: float) -> str:
    bar_h = max(row_h - 3, 1.5)
    parts = [f"<title>{esc(_attempt_title(attempt, origin))}</title>"]
    if len(attempt.spans) > 1:  # the process is alive between its phases: waiting for a device or a round
        parts.append(line(scale(attempt.start - origin), y + bar_h / 2, scale(attempt.end - origin), y + bar_h / 2,
                          "wait"))
    parts.extend(_bars(attempt.spans, y, bar_h, scale, origin))
    parts.extend(_marks(attempt.marks, y, bar_h, scale, origin))
    parts.extend(_cut_mark(scale(s.end - origin), y, bar_h) for s in attempt.spans if s.cut)
    if attempt.failed_at is not None:
        parts.append(_cross(scale(attempt.failed_at - origin), y + bar_h / 2, min(bar_h, 10.0)))
    parts.append(_attempt_label(attempt, y, bar_h, scale, origin))
    cls = "attempt" + (" failed" if attempt.failed else "") + (" cut-off" if attempt.cut_off else "")
    return (f'<g class="{cls}" data-task="{esc(attempt.task)}" data-attempt="{attempt.number}">'
            + "".join(parts) + "</g>")


def _bars(spans: list[Span], y: float, bar_h: float, scale: Scale, origin: float) -> list[str]:
    """One path per kind of bar, a rectangle per phase: a fraction of the bytes of a <rect> per phase."""
    shapes: dict[str, list[str]] = {}
    for span in spans:
        x0 = scale(span.start - origin)
        width = max(scale(span.end - origin) - x0, 1.5)
        cls = (f"bar {span.kind}" + (" failed" if span.failed else "") + (" open" if span.open else "")
               + (" cut" if span.cut else ""))
        shapes.setdefault(cls, []).append(f"M{num(x0)} {num(y)}h{num(width)}v{num(bar_h)}h{num(-width)}z")
    return [f'<path class="{cls}" d="{"".join(d)}"/>' for cls, d in shapes.items()]


def _marks(marks: list[Mark], y: float, bar_h: float, scale: Scale, origin: float) -> list[str]:
    """The measured spans inside the bars, where they are wide and tall enough to see: a band along the
    bar's bottom per span, nested ones thinner, each titled with its name and duration."""
    band = bar_h / 4
    if band < 2:
        return []
    out = []
    for mark in marks:
        x0 = scale(mark.start - origin)
        width = scale(mark.end - origin) - x0
        height = band / (1 + mark.depth)
        if width < MIN_MARK_PX or height < 1:
            continue
        cls = "span" + (" failed" if mark.failed else "")
        title = f"{mark.name}: {fmt_seconds(mark.end - mark.start)}" + (" (failed)" if mark.failed else "")
        top = y + bar_h - band * (mark.depth + 1) / (1 + mark.depth)
        out.append(f'<g class="{cls}" data-span="{esc(mark.name)}"><title>{esc(title)}</title>'
                   + rect(x0, top, width, height, "#1f2933", ' class="span-band"') + "</g>")
    return out


def _cut_mark(x: float, y: float, bar_h: float) -> str:
    """A bar across the end of a phase the supervisor's death cut off: nothing is known after it."""
    return f'<path class="cut-mark" d="M{num(x)} {num(y - 2)}V{num(y + bar_h + 2)}"/>'


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
    where = f"{attempt.node} / " if attempt.node else ""
    lines = [f"{attempt.task} · attempt {attempt.number} · {where}{attempt.device or 'not placed'} · "
             f"{attempt.status}"]
    for span in attempt.spans[:MAX_TITLE_PHASES]:
        what = "process start" if span.kind == "start" else f"{span.kind}()"
        tail = (" (still running when the log ends)" if span.open else
                " (cut off: the supervisor was killed; the log has nothing more of it)" if span.cut else
                " (failed)" if span.failed else "")
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


def _detailed_start(d: Digest, run: RunData) -> float:
    """Where the timeline starts, in seconds since the run did: a long run's is of the rounds read in detail."""
    if run.older is None:
        return 0.0
    starts = [float(r["started"]) for r in run.rounds
              if whole(r.get("round")) == run.older.first_detailed and is_number(r.get("started"))]
    return max(0.0, starts[0] - d.started) if starts else 0.0


def _round_times(run: RunData) -> list[tuple[int, float, float]]:
    times = [(whole(r["round"]), float(r["started"]), float(r["ended"])) for r in run.rounds
             if is_number(r.get("started")) and is_number(r.get("ended"))]
    if times:
        return times
    starts = {whole(e.get("round")): float(e["time"]) for e in run.run_events if e.get("event") == "round_started"}
    ends = {whole(e.get("round")): float(e["time"]) for e in run.run_events if e.get("event") == "round_finished"}
    return [(r, starts[r], ends[r]) for r in sorted(starts) if r in ends]


def _time_axis(scale: Scale, y: float) -> str:
    parts = [line(scale.x0, y, scale.x1, y, "axis")]
    for tick in nice_ticks(scale.lo, scale.hi, 10):
        x = scale(tick)
        parts.append(line(x, y, x, y + 5, "axis"))
        parts.append(text(x, y + 17, tick_label(tick), "tick", "middle"))
    parts.append(text(scale.x1, y + 31, "seconds since the run started", "axis-title", "end"))
    return "".join(parts)


def _timeline_legend(y: float, evaluates: bool, cut: bool = False) -> str:
    items = [("process start", START_COLOUR, ""), ("load", LOAD_COLOUR, ""), ("train", TRAIN_COLOUR, "")]
    items += [("evaluate", EVAL_COLOUR, "")] if evaluates else []
    items += [("failed attempt", TRAIN_COLOUR, ' class="bar failed"'),
              ("still running when the log ends", "#ffffff", ' class="bar open"')]
    items += [("cut off: the supervisor was killed", TRAIN_COLOUR, ' class="bar cut"')] if cut else []
    parts, x = [], LANE_LABEL
    for label, colour, extra in items:
        parts.append(rect(x, y, 22, 12, colour, extra))
        if "failed" in extra:
            parts.append(_cross(x + 11, y + 6, 8))
        if "cut" in extra:
            parts.append(_cut_mark(x + 22, y, 12))
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
            for name, value in round_metrics(row, f"{role}_metrics").items():
                panels.setdefault(name, {}).setdefault(role, []).append((float(row["round"]), value))
    durations = [(float(r["round"]), float(r["duration"])) for r in rounds if is_number(r.get("duration"))]
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


def panel_frame(title: str, xs: list[float], ys: list[float], x: float, y: float) -> tuple[Scale, Scale, list[str]]:
    """A per-round panel at (x, y) that holds these rounds and values: its scales, and its frame, title and axes."""
    pad = (max(ys) - min(ys)) * 0.08 or abs(max(ys)) * 0.1 or 1.0
    yticks = nice_ticks(min(ys) - pad, max(ys) + pad, 5, cover=True)
    sx = Scale(min(xs), max(max(xs), min(xs) + 1), x + 56, x + PANEL_W - 12)
    sy = Scale(yticks[0], yticks[-1], y + PANEL_H - 34, y + 30)
    parts = [rect(x + 0.5, y + 0.5, PANEL_W - 1, PANEL_H - 1, "#ffffff", ' class="panel"'),
             text(x + 12, y + 19, title, "panel-title")]
    return sx, sy, parts + panel_axes(sx, sy, yticks, y)


def _panel(name: str, series: dict[str, list[tuple[float, float]]], x: float, y: float) -> str:
    points = [p for values in series.values() for p in values]
    sx, sy, parts = panel_frame(name, [p[0] for p in points], [p[1] for p in points], x, y)
    legend_x = x + PANEL_W - 12
    for role, values in reversed(series.items()):
        parts.append(_series(f"{role} {name}" if role != "duration" else name, values, sx, sy, _role_colour(role)))
        legend_x -= 34 + text_width(role)
        parts.append(_legend_item(legend_x, y + 15, role, _role_colour(role)))
    return "".join(parts)


def _role_colour(role: str) -> str:
    return SERIES_COLOURS.get(role, "#6b7280")


def panel_axes(sx: Scale, sy: Scale, yticks: list[float], top: float) -> list[str]:
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
