"""Measured spans where a person looks: ``fedsup status --json`` and the HTML report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import toys

from fedsup import Supervisor, TaskStatus
from fedsup.ui.report import write_report


def test_spans_reach_status_json_and_the_report(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    records = Supervisor("cpu", max_retries=0, run_dir=run_dir).run([toys.Spanned("spans", mib=200)])
    assert records[0].status is TaskStatus.FINISHED, records[0].error
    shown = subprocess.run([sys.executable, "-m", "fedsup", "status", str(run_dir), "--json"], capture_output=True,
                           text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    (slow,) = json.loads(shown.stdout)["slowest"]
    assert [s["name"] for s in slow["spans"]] == ["read", "epoch"]
    assert [c["name"] for c in slow["spans"][1]["children"]] == ["alloc", "idle", "bad"]
    page = write_report(run_dir).read_text()
    assert "Spans of the slowest tasks" in page
    for name in ("read", "epoch", "alloc", "idle", "bad"):
        assert f'data-task="spans" data-span="{name}"' in page, name
    assert "epoch=3" in page and "files=2" in page
    assert page.count('class="span-band"') >= 1, "the widest spans are drawn inside the timeline's bars"
