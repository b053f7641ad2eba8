"""The run report: parsing run directories, the text and JSON summaries, the HTML page, and the page as a
real browser renders it (headless Chromium, skipped where it is not installed)."""

from __future__ import annotations

import json
import random
import re
import struct
import zlib
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

import psutil
import pytest
from report_fixtures import browser
from report_fixtures.synthetic_runs import (
    FAILED_CLIENT,
    OOM_CLIENT,
    T0,
    TRICKY,
    write_federated_run,
    write_large_run,
    write_long_federated_run,
)
from report_fixtures.tasks import AlwaysFails, FailsOnce, Sleepy

import fedsup
from fedsup import AttemptRecord, PhaseRecord, TaskRecord, TaskStatus
from fedsup.engine.errors import ConfigError
from fedsup.ui import charts, digest, report

ODD_ID = "ok-<1>&"   # needs escaping in HTML text and attributes


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def engine_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real run: one task that succeeds, one that fails once then succeeds, one that always fails."""
    root = tmp_path_factory.mktemp("engine")
    run_dir = root / "run"
    tasks = [Sleepy(ODD_ID), FailsOnce("flaky", str(root)), AlwaysFails("broken")]
    records = fedsup.Supervisor(devices="cpu", run_dir=run_dir, max_retries=1, retry_backoff=0).run(tasks)
    assert [(r.task_id, r.status.value, r.attempts) for r in records] == [
        (ODD_ID, "FINISHED", 1), ("flaky", "FINISHED", 2), ("broken", "FAILED", 2)]
    assert psutil.Process().children(recursive=True) == []
    return run_dir


@pytest.fixture(scope="module")
def federated_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_federated_run(tmp_path_factory.mktemp("federated") / "run")


@pytest.fixture()
def killed_run(tmp_path: Path, federated_run: Path) -> Path:
    """The federated run as a kill would leave it mid-way: half the event log, no records or summaries."""
    run_dir = tmp_path / "killed"
    run_dir.mkdir()
    lines = (federated_run / "events.jsonl").read_text().splitlines()
    cut = max(i for i, line in enumerate(lines[: len(lines) // 2]) if '"status": "TRAINING"' in line) + 1
    (run_dir / "events.jsonl").write_text("\n".join(lines[:cut]) + "\n" + lines[cut][:17])
    return run_dir


# ---------------------------------------------------------------- reading the page back


@dataclass
class Page(HTMLParser):
    """Checks that tags nest and close, and collects what the tests look at."""

    stack: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    elements: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    void = frozenset({"meta", "br", "hr", "img", "input", "link", "wbr", "col", "source"})
    no_self_nesting = frozenset({"p", "li", "tr", "td", "th", "table", "section", "svg", "title", "text"})

    def __post_init__(self) -> None:
        super().__init__(convert_charrefs=True)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.elements.append((tag, {k: v or "" for k, v in attrs}))
        if tag in self.no_self_nesting and tag in self.stack:
            self.errors.append(f"<{tag}> inside <{tag}>")
        if tag not in self.void:
            self.stack.append(tag)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.elements.append((tag, {k: v or "" for k, v in attrs}))

    def handle_endtag(self, tag: str) -> None:
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes <{self.stack[-1] if self.stack else 'nothing'}>")
            return
        self.stack.pop()

    def handle_data(self, data: str) -> None:
        self.texts.append(data)

    def find(self, tag: str, cls: str | None = None) -> list[dict[str, str]]:
        return [a for t, a in self.elements if t == tag and (cls is None or cls in a.get("class", "").split())]

    def attempts(self) -> dict[tuple[str, int], bool]:
        """(task, attempt) -> failed, for every attempt drawn on the timeline."""
        groups = self.find("g", "attempt")
        return {(a["data-task"], int(a["data-attempt"])): "failed" in a["class"].split() for a in groups}


def parse(html_text: str) -> Page:
    page = Page()
    page.feed(html_text)
    page.close()
    assert page.errors == []
    assert page.stack == [], f"unclosed tags: {page.stack}"
    return page


def svg_ids(page: Page) -> list[str]:
    return [a.get("id", "") for a in page.find("svg")]


# ---------------------------------------------------------------- a real engine run


def test_engine_run_summaries(engine_run: Path) -> None:
    run = digest.load_run(engine_run)
    summary = digest.json_summary(run)
    assert summary["status"] == "finished"
    assert summary["tasks"] == {"total": 3, "finished": 2, "failed": 1, "cancelled": 0, "unfinished": 0,
                                "retried": 2}
    assert summary["attempts"] == 5
    assert summary["failures"] == [{"task": "broken", "status": "FAILED", "attempts": 2,
                                  "reason": "failed 2 times (max_retries=1)",
                                  "error": {"kind": "exception", "type": "ValueError",
                                            "message": "always <broken> & never fixed"}, "spans": []}]
    assert {"rounds.jsonl", "summary.json", "config.yaml"} <= set(summary["missing"])
    assert json.loads(json.dumps(summary)) == summary
    text = digest.text_summary(run)
    assert "run run: finished" in text
    assert "2 finished, 1 failed" in text and "2 retried, 5 attempts" in text
    assert "slowest tasks: " in text and "CPU time:" in text and "wall time:" in text
    assert "failed: broken (2 attempt(s)): ValueError: always <broken> & never fixed" in text


def test_engine_run_page(engine_run: Path) -> None:
    out = report.write_report(engine_run)
    assert out == engine_run / "report.html"
    assert not [p for p in engine_run.iterdir() if p.name.endswith(".tmp")]
    html_text = out.read_text()
    page = parse(html_text)
    assert svg_ids(page) == ["timeline", "memory"]
    assert "No <code>rounds.jsonl</code>" in html_text
    assert page.attempts() == {(ODD_ID, 1): False, ("flaky", 1): True, ("flaky", 2): False,
                               ("broken", 1): True, ("broken", 2): True}
    assert len(page.find("path", "cross")) == 3 + 1  # one per failed attempt, one in the legend
    assert {a["data-task"] for a in page.find("g", "mem-row")} == {ODD_ID, "flaky", "broken"}
    assert [a["data-task"] for a in page.find("tr") if "data-task" in a] == ["broken", "flaky"]
    # user text is escaped, in text and in attributes
    assert "ok-&lt;1&gt;&amp;" in html_text and ODD_ID not in html_text
    assert "always &lt;broken&gt; &amp; never fixed" in html_text and "<broken>" not in html_text
    titles = " ".join(page.texts)
    assert "error (exception): ValueError: always <broken> & never fixed" in titles


def test_write_report_to_another_path(engine_run: Path, tmp_path: Path) -> None:
    out = report.write_report(engine_run, tmp_path / "sub" / "r.html")
    assert out == tmp_path / "sub" / "r.html" and out.read_text().startswith("<!doctype html>")


# ---------------------------------------------------------------- a hand-written federated run


def test_federated_run_loads_despite_a_truncated_line(federated_run: Path) -> None:
    run = digest.load_run(federated_run)
    assert any("skipped 1 line" in p for p in run.problems)
    assert len(run.rounds) == 5 and run.summary is not None and run.config is not None
    assert set(run.records) == {f"client-{i}" for i in range(5)} | {TRICKY}
    summary = digest.json_summary(run)
    assert summary["status"] == "finished" and summary["status_source"] == "summary.json"
    assert summary["rounds"] == 5 and summary["rounds_completed"] == 5
    assert summary["final_metrics"] == {"loss": 0.3006, "accuracy": 0.9}
    assert summary["tasks"]["failed"] == 1 and summary["tasks"]["retried"] == 2
    assert "rounds: 5 of 5 completed" in digest.text_summary(run)


def test_federated_run_page(federated_run: Path) -> None:
    html_text = report.render_html(digest.load_run(federated_run))
    page = parse(html_text)
    assert svg_ids(page) == ["timeline", "metrics", "memory"]
    series = {a["data-series"] for a in page.find("g", "series")}
    assert series == {"train loss", "eval loss", "train accuracy", "eval accuracy", "round duration (s)"}
    assert all(len(a["points"].split()) == 5 for a in page.find("polyline"))
    attempts = page.attempts()
    assert attempts[(OOM_CLIENT, 1)] and not attempts[(OOM_CLIENT, 2)]
    assert attempts[(FAILED_CLIENT, 1)] and attempts[(FAILED_CLIENT, 2)]
    assert attempts[(TRICKY, 1)] is False
    devices = [a["data-device"] for a in page.find("g", "device")]
    assert devices == ["cuda:0", "cuda:1"]
    assert len(page.find("text", "round-label")) == 5 and len(page.find("rect", "round-band")) == 5
    assert [t for t in page.texts if re.fullmatch(r"round \d+", t)] == [f"round {r}" for r in range(1, 6)]
    assert {a["data-task"] for a in page.find("g", "mem-row")} == set(digest.load_run(federated_run).records)
    assert len(page.find("rect", "gpu")) == 6
    assert [a["data-task"] for a in page.find("tr") if "data-task" in a] == [FAILED_CLIENT, OOM_CLIENT]
    assert 'client&lt;5&gt;&amp;&quot;x&quot;' in html_text and TRICKY not in html_text
    assert "<script>" not in html_text and "&lt;script&gt;alert(1)&lt;/script&gt;" in html_text
    assert "fed-demo &lt;b&gt;bold&lt;/b&gt;" in html_text
    assert "cuda_oom" in " ".join(page.texts)


def test_killed_run_is_incomplete(killed_run: Path) -> None:
    run = digest.load_run(killed_run)
    summary = digest.json_summary(run)
    assert summary["status"] == "incomplete" and summary["tasks"]["unfinished"] > 0
    assert {"rounds.jsonl", "summary.json", "tasks/*/record.json"} <= set(summary["missing"])
    page = parse(report.render_html(run))
    assert svg_ids(page) == ["timeline"]
    assert page.find("path", "open"), "phases still running when the log ends are drawn as such"
    assert "No task records with memory measurements." in page.texts


def test_evaluate_phases_have_their_own_colour(tmp_path: Path) -> None:
    """The log says TRAINING for every method; the record says the job ran evaluate()."""
    task = "round-1.client-0.evaluate"
    statuses = ["AVAILABLE", "LOADING", "WAITING", "TRAINING", "FINISHED"]
    events = [{"time": T0 + i, "task": task, "attempt": 1, "status": status, "device": "cpu"}
              for i, status in enumerate(statuses)]
    (tmp_path / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    load = PhaseRecord(phase="load", started=T0 + 1.2, duration=0.8, cpu_time=0.1, peak_memory=100 * 2**20)
    evaluate = PhaseRecord.model_validate({"phase": "evaluate", "device": "cpu", "started": T0 + 3, "duration": 1,
                                           "cpu_time": 0.5})
    attempt = AttemptRecord.model_validate({"attempt": 1, "status": "FINISHED", "started": T0, "ended": T0 + 4,
                                            "device": "cpu", "load": load, "evaluate": evaluate})
    record = TaskRecord(task_id=task, status=TaskStatus.FINISHED, attempts=1, history=[attempt],
                        peak_memory=100 * 2**20)
    (tmp_path / "tasks" / task).mkdir(parents=True)
    (tmp_path / "tasks" / task / "record.json").write_text(record.model_dump_json())
    page = parse(report.render_html(digest.load_run(tmp_path)))
    assert [a["class"] for a in page.find("path", "bar")] == ["bar start", "bar load", "bar evaluate"]
    assert "evaluate" in page.texts


def test_a_cluster_run_has_a_lane_per_node_and_device(tmp_path: Path) -> None:
    """A run on two Ray nodes, both with a ``cpu``: a lane for each node's, labelled "node / device". The
    driver names the node on every event and on the records; a job the log lacks is placed by its record."""
    alpha, beta = "alpha:1a2b3c", "beta:4d5e6f"
    statuses = ["AVAILABLE", "LOADING", "WAITING", "TRAINING", "FINISHED"]
    events = [{"time": T0 + i, "task": task, "attempt": 1, "status": status, "device": "cpu", "node": node}
              for task, node in (("round-1.client-0", alpha), ("round-1.client-1", beta))
              for i, status in enumerate(statuses)]
    (tmp_path / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    for task, node in (("round-1.client-0", alpha), ("round-1.client-1", beta), ("round-1.client-2", beta)):
        train = PhaseRecord(phase="train", device="cpu", started=T0 + 3, duration=1, cpu_time=0.5)
        attempt = AttemptRecord(attempt=1, status=TaskStatus.FINISHED, started=T0, ended=T0 + 4, device="cpu",
                                node=node, train=train)
        record = TaskRecord(task_id=task, status=TaskStatus.FINISHED, attempts=1, device="cpu", node=node,
                            history=[attempt])
        (tmp_path / "tasks" / task).mkdir(parents=True)
        (tmp_path / "tasks" / task / "record.json").write_text(record.model_dump_json())
    page = parse(report.render_html(digest.load_run(tmp_path)))
    lanes = page.find("g", "device")
    assert [(a["data-node"], a["data-device"]) for a in lanes] == [(alpha, "cpu"), (beta, "cpu")]
    assert [t for t in page.texts if " / cpu" in t and "·" not in t] == [f"{alpha} / cpu", f"{beta} / cpu"]
    assert "1 attempt" in page.texts and "2 attempts" in page.texts
    assert f"round-1.client-2 · attempt 1 · {beta} / cpu · FINISHED" in " ".join(page.texts)


def test_not_a_run_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a fedsup run directory"):
        digest.load_run(tmp_path)


def test_large_run_stays_small(tmp_path: Path) -> None:
    run_dir = write_large_run(tmp_path / "large", tasks=1000)
    html_text = report.render_html(digest.load_run(run_dir))
    assert len(html_text.encode()) < 1_500_000
    page = parse(html_text)
    assert svg_ids(page) == ["timeline", "memory"]
    assert len(page.attempts()) == 1044
    assert len(page.find("g", "mem-row")) == charts.TOP_MEMORY_BARS
    assert len(page.find("g", "hist-bin")) == 2 * 30
    assert len(page.find("tr")) <= report.MAX_FAILURE_ROWS + digest.SLOWEST + 2


def test_long_federated_run_stays_small(tmp_path: Path) -> None:
    """A thousand clients training in each of 20 rounds: 21,000 bars, still a page of a megabyte or so."""
    run_dir = write_long_federated_run(tmp_path / "long", clients=1000, rounds=20)
    html_text = report.render_html(digest.load_run(run_dir))
    assert len(html_text.encode()) < 2_000_000
    page = parse(html_text)
    assert svg_ids(page) == ["timeline", "metrics"]
    assert len(page.attempts()) == 1000
    assert len(page.find("rect", "round-band")) == 20
    assert "drawn as one bar" not in html_text


@pytest.fixture(scope="module")
def grouped_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real federated run of today's layout (records/round-R.jsonl), with jobs that failed once and ran again."""
    run = tmp_path_factory.mktemp("grouped") / "run"
    fedsup.run({"name": "grouped", "seed": 2, "task": {"class": "fed_toys:KnownClient"},
                "federation": {"clients": 6, "rounds": 8, "clients_per_round": 4},
                "supervisor": {"devices": "cpu", "max_loaded": 4, "max_retries": 3, "retry_backoff": 0},
                "faults": {"probability": 0.25, "seed": 4, "kinds": ["exception"], "phases": ["train"]},
                "output": str(run)})
    return run


def test_a_long_run_is_read_in_detail_for_its_newest_rounds_and_counted_for_the_rest(grouped_run: Path) -> None:
    assert sorted(p.name for p in (grouped_run / "records").iterdir())[:2] == ["initial.jsonl", "round-1.jsonl"]
    full_run = digest.load_run(grouped_run, detail_rounds=None)
    full = digest.json_summary(full_run)
    assert full["tasks"]["total"] == 1 + 8 * 4 and full["tasks"]["retried"] > 0 and full["detailed_from_round"] is None
    short_run = digest.load_run(grouped_run, detail_rounds=3)
    short = digest.json_summary(short_run)
    assert short["detailed_from_round"] == 6
    assert short["tasks"] == full["tasks"] and short["attempts"] == full["attempts"]
    assert short["cpu_time"] == pytest.approx(full["cpu_time"], rel=1e-5)
    # one by one: the newest rounds' jobs, and of the older only those that did not finish at the first attempt
    older = {t for t, r in full_run.records.items() if digest._round_of(t) in range(1, 6)}
    troubled = {t for t in older if full_run.records[t].attempts > 1}
    assert troubled and {t for t in short_run.records if t in older} == troubled
    assert not [e for e in short_run.events if digest._round_of(str(e["task"])) in range(1, 6)]
    assert "rounds before 6 are counted from their records" in digest.text_summary(short_run)
    page = report.render_html(short_run)
    assert "Rounds 6 on: the 5 rounds before are counted, not drawn" in page
    assert len(parse(page).find("rect", "round-band")) == 3


def test_too_many_bars_are_merged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run_dir = write_long_federated_run(tmp_path / "long", clients=50, rounds=20)
    monkeypatch.setattr(charts, "MAX_BARS", 500)
    html_text = report.render_html(digest.load_run(run_dir))
    assert "1,050 phases: phases of an attempt less than" in html_text
    bars = sum(a["d"].count("z") for a in parse(html_text).find("path", "bar"))
    assert 50 * 2 <= bars <= 500


# ---------------------------------------------------------------- helpers


def test_nice_ticks() -> None:
    assert charts.nice_ticks(0, 10, 5) == [0, 2, 4, 6, 8, 10]
    assert charts.nice_ticks(0.3, 0.92, 5, cover=True) == [0.2, 0.4, 0.6, 0.8, 1.0]
    assert charts.nice_ticks(0, 2.94, 10) == [0, 0.5, 1.0, 1.5, 2.0, 2.5]


def test_pack_rows_keeps_a_retry_on_its_task_row() -> None:
    def attempt(task: str, number: int, start: float, end: float) -> digest.Attempt:
        return digest.Attempt(task, number, "cpu", [digest.Span("train", start, end)])

    rows = charts.pack_rows([attempt("a", 1, 0, 5), attempt("b", 1, 1, 3), attempt("c", 1, 5.5, 5.8),
                             attempt("b", 2, 6, 8)])
    assert [[(a.task, a.number) for a in row] for row in rows] == [[("a", 1), ("c", 1)], [("b", 1), ("b", 2)]]
    for row in rows:
        assert all(x.end <= y.start for x, y in zip(row, row[1:], strict=False))


def test_png_reader_against_every_filter(tmp_path: Path) -> None:
    rng = random.Random(1)
    width, height, bpp = 37, 25, 4
    rows = [bytes(rng.randrange(256) for _ in range(width * bpp)) for _ in range(height)]
    path = tmp_path / "t.png"
    path.write_bytes(_encode_png(rows, width, bpp, rng))
    image = browser.read_png(path)
    assert (image.width, image.height, image.channels) == (width, height, bpp)
    assert image.rows == rows


def _encode_png(rows: list[bytes], width: int, bpp: int, rng: random.Random) -> bytes:
    raw, previous = bytearray(), bytes(width * bpp)
    for row in rows:
        kind = rng.randrange(5)
        raw.append(kind)
        for i, x in enumerate(row):
            a, b, c = (row[i - bpp] if i >= bpp else 0), previous[i], (previous[i - bpp] if i >= bpp else 0)
            p = a + b - c
            paeth = a if abs(p - a) <= abs(p - b) and abs(p - a) <= abs(p - c) else b if abs(p - b) <= abs(p - c) else c
            raw.append((x - (0, a, b, (a + b) // 2, paeth)[kind]) & 0xFF)
        previous = row

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, len(rows), 8, 6, 0, 0, 0)
    body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(bytes(raw))) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


# ---------------------------------------------------------------- in a real browser


chromium = browser.chromium_binary


def _rgb(colour: str) -> tuple[int, int, int]:
    return int(colour[1:3], 16), int(colour[3:5], 16), int(colour[5:7], 16)


def _shoot(chromium: str, page: Path, png: Path) -> browser.Image:
    result = browser.screenshot(chromium, page, png)
    assert result.returncode == 0, result.stderr[-2000:]
    assert png.is_file() and png.stat().st_size > 10_000
    image = browser.read_png(png)
    assert (image.width, image.height) == (1280, 2000)
    return image


def test_browser_renders_the_federated_page(chromium: str, federated_run: Path, tmp_path: Path) -> None:
    out = report.write_report(federated_run, tmp_path / "report.html")
    image = _shoot(chromium, out, tmp_path / "federated.png")
    colours = image.colours()
    assert len(colours) > 500, "the screenshot is (nearly) blank"
    for name in ("LOAD_COLOUR", "TRAIN_COLOUR", "START_COLOUR", "HOST_COLOUR", "GPU_COLOUR"):
        assert colours.get(_rgb(getattr(charts, name)), 0) > 200, f"{name} is not on the screen"
    reds = sum(n for (r, g, b), n in colours.items() if r > 190 and g < 70 and b < 70)
    assert reds > 50, "no failure marks on the screen"
    dom = browser.dump_dom(chromium, out)
    page = parse(dom)
    assert svg_ids(page) == ["timeline", "metrics", "memory"]
    assert len(page.find("polyline")) == 5 and len(page.find("g", "attempt")) == 8


def test_browser_renders_the_engine_page(chromium: str, engine_run: Path, tmp_path: Path) -> None:
    out = report.write_report(engine_run, tmp_path / "report.html")
    image = _shoot(chromium, out, tmp_path / "engine.png")
    colours = image.colours()
    assert len(colours) > 300
    for name in ("LOAD_COLOUR", "TRAIN_COLOUR", "HOST_COLOUR"):
        assert colours.get(_rgb(getattr(charts, name)), 0) > 50, f"{name} is not on the screen"


def test_a_phase_cut_off_by_a_supervisor_kill_ends_before_the_resume(tmp_path: Path) -> None:
    """The log of a supervisor SIGKILLed mid-train, then resumed: the train phase ends at the last event
    before the resume and is marked cut off; the resumed run's attempt of the same job is its own."""
    def task(when: float, status: str, name: str = "round-2.client-0", **info: object) -> dict[str, object]:
        return {"time": T0 + when, "task": name, "attempt": 1, "status": status, **info}

    events = [{"time": T0, "event": "run_started", "resume": False, "from_round": 1},
              task(1, "AVAILABLE"), task(1, "LOADING"), task(2, "WAITING"), task(2, "TRAINING", device="cpu"),
              task(3, "AVAILABLE", "round-2.client-1"), task(3.5, "LOADING", "round-2.client-1"),
              {"time": T0 + 60, "event": "run_started", "resume": True, "from_round": 2},
              task(61, "AVAILABLE"), task(61, "LOADING"), task(62, "WAITING"), task(62, "TRAINING", device="cpu"),
              task(64, "FINISHED", device="cpu")]
    (tmp_path / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    run = digest.load_run(tmp_path)
    cut, resumed = [a for a in digest.build_attempts(run) if a.task == "round-2.client-0"]
    assert [(s.kind, s.start - T0, s.end - T0, s.cut) for s in cut.spans] == [
        ("load", 1, 2, False), ("train", 2, 3.5, True)]
    assert cut.cut_off and not cut.failed and not any(s.open for s in cut.spans)
    assert not resumed.cut_off and resumed.start == T0 + 61 and resumed.status == "FINISHED"
    other = next(a for a in digest.build_attempts(run) if a.task == "round-2.client-1")
    assert other.spans[-1].cut and other.end == T0 + 3.5  # the load it was in when the supervisor died
    page = parse(report.render_html(run))
    assert len(page.find("g", "cut-off")) == 2 and len(page.find("path", "cut-mark")) == 3  # 2 + the legend's
    assert "cut off: the supervisor was killed" in page.texts


def test_a_resume_after_an_orderly_stop_cuts_nothing(tmp_path: Path) -> None:
    events = [{"time": T0, "event": "run_started"},
              {"time": T0 + 1, "task": "a", "attempt": 1, "status": "TRAINING", "device": "cpu"},
              {"time": T0 + 2, "task": "a", "attempt": 1, "status": "CANCELLED", "reason": "stopped by SIGINT"},
              {"time": T0 + 9, "event": "run_started"},
              {"time": T0 + 10, "task": "a", "attempt": 1, "status": "TRAINING", "device": "cpu"},
              {"time": T0 + 11, "task": "a", "attempt": 1, "status": "FINISHED", "device": "cpu"}]
    (tmp_path / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    attempts = digest.build_attempts(digest.load_run(tmp_path))
    assert [(a.spans[0].start - T0, a.end - T0, a.cut_off) for a in attempts] == [(1, 2, False), (10, 11, False)]
    assert "cut off" not in report.render_html(digest.load_run(tmp_path))
