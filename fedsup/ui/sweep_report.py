"""A sweep's results on one page: per config, every metric by round with the mean over seeds and a band of
one standard deviation either side, a table of final metrics as mean ± std sorted by the sweep's metric, and
links to each run's own report. The same table as CSV or JSON (``fedsup report SWEEP_DIR --format csv``).

Reads only the sweep's files (``sweep.json``) and each run's ``rounds.jsonl`` and ``summary.json``: a sweep
still running, or killed, reports what its runs have finished so far. Standard library and fedsup's own
chart helpers only.
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedsup.engine.errors import ConfigError
from fedsup.engine.rundir import write_atomic
from fedsup.ui.charts import (
    PANEL_GAP,
    PANEL_H,
    PANEL_W,
    WIDTH,
    esc,
    num,
    panel_frame,
    svg,
)
from fedsup.ui.digest import fmt_value, is_number, round_metrics

SWEEP_FILE = "sweep.json"
PALETTE = ("#3b6fb6", "#e8772e", "#2e9e6a", "#d62728", "#7b5cc4", "#8c564b", "#d9a21b", "#17becf", "#7f7f7f",
           "#bcbd22")


@dataclass
class RunData:
    name: str
    config: str
    seed: int
    path: Path
    status: str
    rounds: list[dict[str, Any]]

    def curve(self, metric: str) -> dict[int, float]:
        """The metric by round: ``eval_x`` from the round's eval metrics, ``x`` from its train metrics."""
        key, name = ("eval_metrics", metric[5:]) if metric.startswith("eval_") else ("train_metrics", metric)
        out = {}
        for row in self.rounds:
            value = round_metrics(row, key).get(name)
            if value is not None and is_number(row.get("round")):
                out[int(row["round"])] = value
        return out

    def final(self, metric: str) -> float | None:
        curve = self.curve(metric)
        return curve[max(curve)] if curve else None


@dataclass
class ConfigRow:
    config: str
    runs: list[RunData]
    means: dict[str, float] = field(default_factory=dict)
    stds: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)


@dataclass
class SweepData:
    name: str
    path: Path
    metric: str | None
    runs: list[RunData]

    @property
    def metrics(self) -> list[str]:
        names: dict[str, None] = {}
        for run in self.runs:
            for row in run.rounds:
                names.update(dict.fromkeys(round_metrics(row, "train_metrics")))
                names.update(dict.fromkeys(f"eval_{k}" for k in round_metrics(row, "eval_metrics")))
        return list(names)


def is_sweep_dir(path: str | Path) -> bool:
    return (Path(path) / SWEEP_FILE).is_file()


def load_sweep_dir(path: str | Path) -> SweepData:
    folder = Path(path)
    try:
        data = json.loads((folder / SWEEP_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"SWEEP_DIR: {folder / SWEEP_FILE} cannot be read: {exc}") from None
    runs = [_run(entry) for entry in data.get("runs", [])]
    return SweepData(str(data.get("name", folder.name)), folder, data.get("metric"), runs)


def _run(entry: dict[str, Any]) -> RunData:
    path = Path(entry["path"])
    rounds = []
    try:
        for line_text in (path / "rounds.jsonl").read_text().splitlines():
            try:
                row = json.loads(line_text)
            except ValueError:
                continue  # a torn last line of a killed run
            if isinstance(row, dict):
                rounds.append(row)
    except OSError:
        pass
    try:
        status = str(json.loads((path / "summary.json").read_text()).get("status", "unknown"))
    except (OSError, ValueError):
        status = "not started" if not rounds else "unknown"
    return RunData(entry["name"], entry["config"], int(entry["seed"]), path, status, rounds)


# ---------------------------------------------------------------- the table


def _spread(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def table(sweep: SweepData) -> list[ConfigRow]:
    """One row per config: each metric's final value, mean and std over its seeds; sorted by the sweep's
    metric (descending, or ascending for a metric named like a loss or an error)."""
    rows: dict[str, ConfigRow] = {}
    for run in sweep.runs:
        rows.setdefault(run.config, ConfigRow(run.config, [])).runs.append(run)
    for row in rows.values():
        for metric in sweep.metrics:
            values = [v for v in (r.final(metric) for r in row.runs) if v is not None]
            if values:
                row.means[metric] = statistics.fmean(values)
                row.stds[metric] = _spread(values)
                row.counts[metric] = len(values)
    ordered = list(rows.values())
    key = sweep.metric
    if key:
        lower_better = any(word in key for word in ("loss", "error", "perplexity"))
        missing = math.inf if lower_better else -math.inf
        ordered.sort(key=lambda r: r.means.get(key, missing), reverse=not lower_better)
    return ordered


def table_json(sweep: SweepData) -> dict[str, Any]:
    return {
        "name": sweep.name, "metric": sweep.metric, "metrics": sweep.metrics,
        "configs": [{"config": r.config, "runs": [{"name": x.name, "seed": x.seed, "status": x.status,
                                                   "path": str(x.path),
                                                   "final": {m: x.final(m) for m in sweep.metrics}}
                                                  for x in r.runs],
                     "mean": r.means, "std": r.stds, "n": r.counts} for r in table(sweep)],
    }


def table_csv(sweep: SweepData) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    metrics = sweep.metrics
    writer.writerow(["config", "runs", *(f"{m}_{s}" for m in metrics for s in ("mean", "std", "n"))])
    for row in table(sweep):
        cells: list[Any] = [row.config, len(row.runs)]
        for metric in metrics:
            cells += [row.means.get(metric, ""), row.stds.get(metric, ""), row.counts.get(metric, 0)]
        writer.writerow(cells)
    return out.getvalue()


# ---------------------------------------------------------------- the page


def _colours(rows: list[ConfigRow]) -> dict[str, str]:
    return {row.config: PALETTE[i % len(PALETTE)] for i, row in enumerate(sorted(rows, key=lambda r: r.config))}


def render_curves(sweep: SweepData, rows: list[ConfigRow]) -> str:
    metrics = sweep.metrics
    if not metrics:
        return '<p class="note">No run of this sweep has finished a round yet.</p>'
    colours = _colours(rows)
    body = [_panel(metric, rows, colours, (i % 2) * (PANEL_W + PANEL_GAP), (i // 2) * (PANEL_H + 20))
            for i, metric in enumerate(metrics)]
    count = math.ceil(len(metrics) / 2)
    return svg("sweep-curves", WIDTH, count * (PANEL_H + 20) - 20, body, "metrics by round, mean and std over seeds")


def _stats(rows: list[ConfigRow], metric: str) -> dict[str, list[tuple[int, float, float]]]:
    """Per config: (round, mean, std) over the seeds that reached the round."""
    out = {}
    for row in rows:
        curves = [r.curve(metric) for r in row.runs]
        rounds = sorted({n for c in curves for n in c})
        points = []
        for n in rounds:
            values = [c[n] for c in curves if n in c]
            points.append((n, statistics.fmean(values), _spread(values)))
        if points:
            out[row.config] = points
    return out


def _panel(metric: str, rows: list[ConfigRow], colours: dict[str, str], x: float, y: float) -> str:
    stats = _stats(rows, metric)
    if not stats:
        return ""
    bounds = [m + side * s for pts in stats.values() for _, m, s in pts for side in (-1, 1)]  # the bands' edges
    rounds = [float(n) for pts in stats.values() for n, _, _ in pts]
    sx, sy, parts = panel_frame(metric, rounds, bounds, x, y)
    for config, points in stats.items():
        colour = colours[config]
        upper = " ".join(f"{num(sx(n))},{num(sy(m + s))}" for n, m, s in points)
        lower = " ".join(f"{num(sx(n))},{num(sy(m - s))}" for n, m, s in reversed(points))
        mean = " ".join(f"{num(sx(n))},{num(sy(m))}" for n, m, _ in points)
        title = "; ".join(f"round {n}: {fmt_value(m)} ± {fmt_value(s)}" for n, m, s in points[-3:])
        parts.append(f'<g class="config" data-config="{esc(config)}" data-metric="{esc(metric)}">'
                     f"<title>{esc(config)}: {esc(title)}</title>"
                     f'<polygon class="band" points="{upper} {lower}" fill="{colour}" fill-opacity="0.18"/>'
                     f'<polyline class="mean" points="{mean}" fill="none" stroke="{colour}" stroke-width="2"/>'
                     "</g>")
    return "".join(parts)


def _legend(rows: list[ConfigRow]) -> str:
    colours = _colours(rows)
    items = "".join(f'<span class="swatch" style="background:{colours[r.config]}"></span>{esc(r.config)} '
                    for r in sorted(rows, key=lambda r: r.config))
    return f'<p class="legend">{items}</p>'


def render_table(sweep: SweepData, rows: list[ConfigRow], out_dir: Path) -> str:
    metrics = sweep.metrics
    head = "".join(f"<th>{esc(m)}{' ▼' if m == sweep.metric else ''}</th>" for m in metrics)
    body = []
    for row in rows:
        cells = "".join(
            f'<td class="num" data-metric="{esc(m)}">{_mean_std(row, m)}</td>' for m in metrics)
        links = " ".join(f'<a href="{esc(_relative(r.path / "report.html", out_dir))}">seed {r.seed}</a>'
                         f'{"" if r.status == "finished" else f" ({esc(r.status)})"}' for r in row.runs)
        body.append(f'<tr data-config="{esc(row.config)}"><td class="task">{esc(row.config)}</td>{cells}'
                    f"<td>{links}</td></tr>")
    return (f"<table><thead><tr><th>config</th>{head}<th>runs</th></tr></thead><tbody>{''.join(body)}"
            "</tbody></table>")


def _mean_std(row: ConfigRow, metric: str) -> str:
    if metric not in row.means:
        return "-"
    n = row.counts[metric]
    return f"{row.means[metric]:.4g} ± {row.stds[metric]:.2g} <span class=\"n\">(n={n})</span>"


def _relative(target: Path, start: Path) -> str:
    try:
        return str(target.resolve().relative_to(start.resolve()))
    except ValueError:
        return target.resolve().as_uri()


STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 24px auto; max-width: 1100px; color: #1f2933; }
h1 { font-size: 22px; margin: 0 0 4px; } h2 { font-size: 17px; margin: 28px 0 8px; }
.note, .sub { color: #5b6675; } table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; padding: 5px 8px; border-bottom: 1px solid #e3e7ed; } td.num { text-align: right; }
.n { color: #8a94a3; font-size: 12px; } .swatch { display: inline-block; width: 14px; height: 10px;
  margin: 0 4px 0 12px; border-radius: 2px; }
svg .panel { stroke: #d8dde4; } svg .panel-title { font-weight: 600; font-size: 13px; }
svg .grid { stroke: #eef1f5; } svg .axis { stroke: #9aa5b1; } svg .tick { font-size: 11px; fill: #5b6675; }
svg .axis-title { font-size: 11px; fill: #5b6675; } svg text { font-family: system-ui, sans-serif; }
"""


def render_html(sweep: SweepData, out_dir: Path) -> str:
    rows = table(sweep)
    finished = sum(1 for r in sweep.runs if r.status == "finished")
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    sort_note = f"sorted by {esc(sweep.metric)}" if sweep.metric else "in the sweep's order"
    return ("<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>fedsup sweep: {esc(sweep.name)}</title><style>{STYLE}</style></head><body>"
            f"<h1>Sweep {esc(sweep.name)}</h1><p class=\"sub\">{len(rows)} configs, {len(sweep.runs)} runs "
            f"({finished} finished); written {when}</p>"
            "<h2>Metrics by round</h2><p class=\"note\">Mean over each config's seeds, with a band of one "
            "standard deviation either side.</p>" + _legend(rows) + render_curves(sweep, rows) +
            f"<h2>Final metrics</h2><p class=\"note\">The last round's value of each run: mean ± standard "
            f"deviation over seeds (n runs), {sort_note}.</p>" + render_table(sweep, rows, out_dir) +
            "</body></html>")


def write_sweep_report(path: str | Path, out: str | Path | None = None, fmt: str = "html") -> Path:
    """Write the sweep's page (and each run's own report, which it links to), or its table as CSV or JSON."""
    sweep = load_sweep_dir(path)
    target = Path(out) if out else sweep.path / {"html": "report.html", "csv": "report.csv",
                                                  "json": "report.json"}[fmt]
    if fmt == "csv":
        write_atomic(target, table_csv(sweep).encode())
    elif fmt == "json":
        write_atomic(target, (json.dumps(table_json(sweep), indent=1) + "\n").encode())
    else:
        from fedsup.ui.report import write_report

        for run in sweep.runs:
            if (run.path / "events.jsonl").exists():
                write_report(run.path)
        write_atomic(target, render_html(sweep, target.parent).encode())
    return target

