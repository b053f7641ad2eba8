"""The live view: its round lines and panel drawn on rich consoles that record, and a real run on a
pseudo-terminal, Ctrl-C'ed mid-round, whose final screen (replayed through a small terminal model) holds the
panel once."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml
from rich.console import Console
from terminal import run_on_terminal

from fedsup.engine.states import TaskStatus
from fedsup.ui.live import LiveView, job_counts

TESTS = Path(__file__).resolve().parent.parent
SCRIPT = str(Path(sys.executable).parent / "fedsup")


def recording() -> Console:
    return Console(record=True, force_terminal=True, width=160, color_system=None)


def handle(task_id: str, status: TaskStatus) -> SimpleNamespace:
    return SimpleNamespace(task_id=task_id, status=status, history=[SimpleNamespace(error=None)])


def fake_federation(handles: list[SimpleNamespace]) -> Any:
    cpu = SimpleNamespace(used_cores=1, cores=2)
    scheduler = SimpleNamespace(handles=handles, inventory=SimpleNamespace(gpus=[], cpu=cpu, probe=None),
                                training=1, procs=[1, 2])
    return SimpleNamespace(supervisor=SimpleNamespace(scheduler=scheduler), rounds=[], completed=1, round=2,
                           spec=SimpleNamespace(name="demo", rounds=3))


ROUND = {"event": "round_finished", "round": 2, "finished": [0, 1], "failed": [], "retried": [], "duration": 1.5,
         "train_metrics": {"loss": 0.5}, "eval_metrics": {"accuracy": 0.9}}


def test_the_round_line_ends_with_the_metrics() -> None:
    console = recording()
    view = LiveView(console)
    view.attach(fake_federation([]))
    view.on_event({"event": "run_started"})
    try:
        view.on_event(ROUND)
    finally:
        view.stop()
    lines = [line.rstrip() for line in console.export_text().splitlines()]
    line = next(line for line in lines if line.startswith("round 2/3"))
    assert line.endswith("train loss 0.5; eval accuracy 0.9"), line
    assert "live.py" not in console.export_text()


def test_the_panel_labels_train_and_evaluate_jobs() -> None:
    handles = [handle("round-2.client-0", TaskStatus.TRAINING), handle("round-2.client-1", TaskStatus.FINISHED),
               handle("round-2.client-0.evaluate", TaskStatus.WAITING), handle("round-1.client-5", TaskStatus.FAILED)]
    console = recording()
    console.print(job_counts([h for h in handles if h.task_id.startswith("round-2.")]))
    text = console.export_text()
    rows = {line.split()[0] + " " + line.split()[1]: line.split()[2:] for line in text.splitlines()[1:]}
    assert re.search(r"WAITING\s+TRAINING\s+FINISHED", text.splitlines()[0]), text
    assert rows == {"train jobs": ["-", "1", "1"], "evaluate jobs": ["1", "-", "-"]}, text
    view = LiveView(recording())
    view.attach(fake_federation(handles))
    view.console.print(view.render())
    assert "train jobs" in view.console.export_text() and "FAILED" not in view.console.export_text()


class FakeDriver:
    """What the panel reads of ``fedsup.cluster.driver.Driver``: its batch's jobs and its nodes."""

    gone = {"node-id-lost"}

    def jobs(self) -> list[tuple[str, str]]:
        return [("round-2.client-0", "TRAINING"), ("round-2.client-1", "TRAINING"), ("round-2.client-2", "INIT"),
                ("round-2.client-3", "FINISHED"), ("round-1.client-0", "FAILED")]

    def nodes(self) -> list[dict[str, Any]]:
        return [{"node": "alpha:1a2b3c", "jobs": 2, "slots": 4, "free_cores": 2, "processes": 3, "gpus": []},
                {"node": "beta:4d5e6f", "jobs": 0, "slots": 2, "free_cores": 2, "processes": 1, "gpus": []}]


def test_the_panel_on_a_cluster_reads_the_driver() -> None:
    """On Ray the supervisor has no scheduler: the panel counts the driver's jobs and lists its nodes."""
    fed = fake_federation([])
    fed.supervisor = SimpleNamespace(scheduler=None, backend=SimpleNamespace(driver=FakeDriver()))
    view = LiveView(recording())
    view.attach(fed)
    view.console.print(view.render())
    lines = [line.rstrip() for line in view.console.export_text().splitlines()]
    assert not any("starting" in line for line in lines), lines
    assert lines[0].startswith("fedsup demo   round 2/3"), lines
    assert re.search(r"INIT\s+TRAINING\s+FINISHED$", lines[1]) and "FAILED" not in "\n".join(lines), lines
    assert lines[2].split() == ["train", "jobs", "1", "2", "1"], lines
    nodes = next(line for line in lines if line.startswith("nodes: "))
    assert nodes == "nodes: alpha:1a2b3c 2/4, beta:4d5e6f 0/2   processes: 4   nodes lost: 1", nodes


# -- a real run on a terminal


@pytest.mark.timeout(240)
def test_ctrl_c_leaves_one_panel_on_the_terminal(tmp_path: Path) -> None:
    announce, go = tmp_path / "announce", tmp_path / "go"
    os.mkfifo(announce)
    os.mkfifo(go)
    data = {"name": "live", "seed": 0, "output": str(tmp_path / "run"),
            "task": {"class": "fed_toys:HoldingClient",
                     "args": {"announce": str(announce), "go": str(go), "hold_round": 2}},
            "federation": {"clients": 3, "rounds": 3},
            "supervisor": {"devices": "cpu", "max_retries": 0, "grace_period": 1}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}

    def interrupt_mid_round(process: subprocess.Popen[bytes]) -> None:
        with open(announce) as said:  # the held client of round 2 is training now
            said.readline()
        process.send_signal(signal.SIGINT)

    code, screen = run_on_terminal([SCRIPT, "run", str(path)], env, 120, interrupt_mid_round)
    assert code == 130
    headers = [line for line in screen if line.startswith("fedsup live")]
    assert len(headers) == 1, "\n".join(screen)
    assert any(line.startswith("round 1/3:") and line.endswith("eval -") for line in screen), "\n".join(screen)
    assert any(line.startswith("train jobs") for line in screen), "\n".join(screen)
    assert [line for line in screen if line][-1].startswith("fedsup: interrupted"), "\n".join(screen)
