"""Measured spans inside a task (``fedsup.span``), through real task processes."""

from __future__ import annotations

import json
from pathlib import Path

import toys

from fedsup import Supervisor, TaskStatus

MiB = 1024**2


def test_nested_spans_measure_their_own_peaks(tmp_path: Path) -> None:
    record = Supervisor("cpu", max_retries=0, run_dir=tmp_path).run([toys.Spanned("spans", mib=200)])[0]
    assert record.status is TaskStatus.FINISHED, record.error
    assert record.result == {"outside": None, "inner": "alloc", "outer": {"epoch": 3}, "after": None}
    (read,) = record.load.spans
    assert read.name == "read" and read.data == {"files": 2} and not read.failed
    (epoch,) = record.train.spans
    assert epoch.data == {"epoch": 3}
    alloc, idle, bad = epoch.children
    assert [s.name for s in epoch.children] == ["alloc", "idle", "bad"]
    assert alloc.peak_memory - idle.peak_memory >= 190 * MiB, (alloc.peak_memory, idle.peak_memory)
    assert epoch.peak_memory >= alloc.peak_memory
    assert record.train.peak_memory >= alloc.peak_memory, "the spans' resets must not hide the phase's peak"
    assert bad.failed and bad.error == "ValueError: caught by the task" and not alloc.failed
    for s in (epoch, alloc, idle, bad):
        assert s.duration >= 0 and s.cpu_time >= 0 and s.started >= record.train.started
    assert epoch.duration >= sum(s.duration for s in epoch.children)
    assert [s.name for s in record.spans] == ["read", "epoch"]
    on_disk = json.loads((tmp_path / "tasks" / "spans" / "record.json").read_text())
    assert on_disk["train"]["spans"][0]["children"][0]["name"] == "alloc"


def test_a_span_left_by_an_exception_is_closed_and_marked_failed() -> None:
    record = Supervisor("cpu", max_retries=0).run([toys.Spanned("escapes", mib=1, escape=True)])[0]
    assert record.status is TaskStatus.FAILED
    (epoch,) = record.history[0].train.spans
    assert epoch.failed and epoch.error == "RuntimeError: ends the phase"
    assert [(s.name, s.failed) for s in epoch.children] == [("alloc", False), ("idle", False), ("bad", True),
                                                            ("fatal", True)]
