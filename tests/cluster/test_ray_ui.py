"""What a person sees of a Ray cluster: ``fedsup devices --cluster``, its error lines without a cluster (no
ray installed, nothing listening at the address) and its listing of a running one."""

from __future__ import annotations

import json
import re
import socket
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from ray_cluster import LocalCluster, ray_or_skip

from fedsup.ui.cli import main as cli_main


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.timeout(60)
def test_devices_cluster_without_ray_names_the_install_command(monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now raises ImportError, as where it is absent
    assert cli_main(["devices", "--cluster"]) == 2
    out, err = capsys.readouterr()
    line = one_error_line(err)
    assert "--cluster" in line and "pip install 'fedsup[ray]'" in line and out == "", line


@pytest.mark.timeout(60)
def test_devices_cluster_at_an_address_with_nothing_listening(capsys: pytest.CaptureFixture[str]) -> None:
    ray_or_skip()
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    began = time.monotonic()
    assert cli_main(["devices", "--cluster", address, "--json"]) == 2
    assert time.monotonic() - began < 30
    out, err = capsys.readouterr()
    line = one_error_line(err)
    assert line.startswith("fedsup: error: --cluster: ") and address in line and out == "", line
    assert cli_main(["devices", "--cluster", "head-node"]) == 2  # no port: named at once, nothing dialled
    assert "--cluster" in one_error_line(capsys.readouterr().err)


@pytest.mark.timeout(240)
def test_devices_cluster_lists_every_node(cluster: LocalCluster, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["devices", "--cluster", cluster.address, "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    nodes = listed["nodes"]
    assert listed["address"] == cluster.address
    assert sorted(n["ray_cpus"] for n in nodes) == [0, 1, 1], nodes  # the head has none, the two nodes one each
    for node in nodes:
        assert "error" not in node, node
        assert node["cores"] >= 1 and isinstance(node["gpus"], list) and node["address"], node
    assert cli_main(["devices", "--cluster", cluster.address]) == 0
    text = capsys.readouterr().out
    for node in nodes:
        assert any(line.startswith(f"{node['node']}  ") and "CPU" in line for line in text.splitlines()), text


def test_the_driver_tells_the_live_view_each_jobs_state() -> None:
    """``Driver.jobs()``, which the live view counts on Ray: a job's record once it has one, else the state its
    node last reported (INIT while queued)."""
    from types import SimpleNamespace

    from fedsup.cluster.driver import Driver, _Job
    from fedsup.engine.records import TaskRecord
    from fedsup.engine.states import TaskStatus

    driver = Driver(SimpleNamespace(options={}), None, [])
    assert driver.jobs() == []
    jobs = [_Job(SimpleNamespace(), i, f"round-1.client-{i}", f"client-{i}") for i in range(3)]
    jobs[1].status = "TRAINING"
    driver.batch = jobs
    driver.records = [TaskRecord(task_id="round-1.client-0", status=TaskStatus.FINISHED), None, None]
    assert driver.jobs() == [("round-1.client-0", "FINISHED"), ("round-1.client-1", "TRAINING"),
                             ("round-1.client-2", "INIT")]


@pytest.mark.timeout(400)
def test_a_cluster_run_shows_its_nodes_live_and_in_the_report(tmp_path: Path, cluster: LocalCluster) -> None:
    """A real run on the two nodes: the panel, drawn as each round ends, has the nodes line and the job counts
    (not "starting…"); the report's timeline has a lane per node."""
    from rich.console import Console

    from fedsup.federated.runner import prepare
    from fedsup.ui import digest, report
    from fedsup.ui.live import LiveView

    data = {"name": "live", "seed": 0, "output": str(tmp_path / "run"),
            "task": {"class": "fedsup.examples.synthetic:SyntheticClient", "args": {"samples": 50}},
            "federation": {"clients": 4, "rounds": 2, "clients_per_round": 4},
            "supervisor": {"devices": "cpu", "backend": "ray", "ray_address": cluster.address, "grace_period": 1}}
    view = LiveView(Console(record=True, force_terminal=True, width=200, color_system=None))
    panels: list[str] = []

    def on_event(event: dict[str, Any]) -> None:
        if event.get("event") == "round_finished":
            with view.console.capture() as shot:
                view.console.print(view.render())
            panels.append(shot.get())

    federation = prepare(data, output=str(tmp_path / "run"), on_event=on_event)
    view.attach(federation)
    assert federation.run()["status"] == "finished"
    assert len(panels) == 2, panels
    for panel in panels:
        assert "starting" not in panel and re.search(r"(train|evaluate) jobs\s+\d", panel), panel
        assert re.search(r"^nodes: \S+ \d+/\d+, \S+ \d+/\d+   processes: \d+", panel, re.M), panel
    page = report.render_html(digest.load_run(tmp_path / "run"))
    labels = re.findall(r'<g class="device" data-device="cpu" data-node="([^"]+)"', page)
    assert len(labels) == 2 and all(f"{node} / cpu" in page for node in labels), labels


@pytest.mark.timeout(180)
def test_dry_run_on_a_cluster_lists_its_nodes_and_job_slots(tmp_path: Path, cluster: LocalCluster) -> None:
    import subprocess

    import yaml
    from ray_cluster import child_env

    data = {"name": "plan", "task": {"class": "fedsup.examples.synthetic:SyntheticClient"},
            "federation": {"clients": 4, "rounds": 1},
            "supervisor": {"devices": "cpu", "backend": "ray", "ray_address": cluster.address}}
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(data))
    done = subprocess.run([sys.executable, "-m", "fedsup", "run", str(path), "--dry-run"], capture_output=True,
                          text=True, timeout=150, env=child_env())
    assert done.returncode == 0, done.stderr
    assert f"ray cluster at {cluster.address}: 3 node(s), 2 job slot(s)" in done.stdout, done.stdout
    assert done.stdout.count("ray 1 CPU -> 1 slot(s); cores") == 2, done.stdout
    assert "2 training at once" in done.stdout, done.stdout
    assert not (tmp_path / "runs").exists(), "a dry run writes nothing"
