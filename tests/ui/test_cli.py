"""The command line: exit statuses, one-line errors without tracebacks, the plan, status and report, the live
panel on a terminal, and Ctrl-C then --resume."""

from __future__ import annotations

import json
import os
import pty
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from config_cases import CATALOG, FILES

from fedsup.federated.config import ConfigError
from fedsup.ui.cli import main

TESTS = Path(__file__).resolve().parent.parent  # where the toy task modules are


def write(tmp_path: Path, data: dict[str, Any], name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def known(tmp_path: Path, **federation: Any) -> dict[str, Any]:
    return {"name": "cli", "seed": 0, "task": {"class": "fed_toys:KnownClient"},
            "federation": {"clients": 3, "rounds": 1, **federation},
            "supervisor": {"devices": "cpu", "max_retries": 0}, "output": str(tmp_path / "run")}


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}


@pytest.mark.parametrize(("data", "expected"), [pytest.param(d, e, id=i) for i, d, e in CATALOG])
def test_every_bad_config_exits_2_naming_the_key(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                  data: dict[str, Any], expected: str) -> None:
    assert main(["validate", str(write(tmp_path, data))]) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err


@pytest.mark.parametrize(("content", "expected"), [pytest.param(c, e, id=i) for i, c, e in FILES])
def test_every_bad_file_exits_2_naming_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                 content: bytes, expected: str) -> None:
    path = tmp_path / "run.yaml"
    path.write_bytes(content)
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert expected in err and str(path) in err and "Traceback" not in err


def test_traceback_only_when_asked(tmp_path: Path) -> None:
    path = write(tmp_path, {"name": "x"})
    with pytest.raises(ConfigError):
        main(["--traceback", "validate", str(path)])


def test_a_bad_config_from_a_real_process_is_one_line_and_status_2(tmp_path: Path) -> None:
    path = write(tmp_path, {**known(tmp_path), "federation": {"clients": "ten", "rounds": 1, "stratgy": "fedavg"}})
    done = subprocess.run([sys.executable, "-m", "fedsup", "validate", str(path)], capture_output=True, text=True,
                          env=env(), timeout=120)
    assert done.returncode == 2
    assert "federation.stratgy: unknown key; did you mean 'strategy'?" in done.stderr
    assert "federation.clients: expected a whole number (got 'ten')" in done.stderr
    assert "Traceback" not in done.stderr


def test_validate_and_overrides(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, known(tmp_path))
    assert main(["validate", str(path)]) == 0
    assert main(["validate", str(path), "--set", "federation.rounds=0"]) == 2
    assert "federation.rounds: must be at least 1 (got 0)" in capsys.readouterr().err


def test_dry_run_prints_the_placement_plan(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = known(tmp_path, clients_per_round=2)
    data["task"]["estimate_cuda_memory"] = "6GiB"
    data["supervisor"]["devices"] = [{"name": "cuda:0", "memory": "16GiB"}, {"name": "cuda:1", "memory": "16GiB"}]
    path = write(tmp_path, data)
    assert main(["run", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "cuda:0: 16.0 GiB" in out and "2 task(s) at once" in out and "4 training at once" in out
    assert not (tmp_path / "run").exists(), "a dry run must not start anything"
    assert main(["run", str(path), "--dry-run", "--set", "task.estimate_cuda_memory=40GiB"]) == 2
    assert "does not fit on any device" in capsys.readouterr().err


def test_devices(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["devices", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["cpu_cores"] >= 1 and isinstance(shown["gpus"], list)


@pytest.mark.timeout(120)
def test_run_then_status_and_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, known(tmp_path))
    assert main(["run", str(path)]) == 0
    assert "cli: finished, 1/1 rounds" in capsys.readouterr().out
    run = str(tmp_path / "run")
    assert main(["status", run]) == 0
    assert "finished" in capsys.readouterr().out
    assert main(["status", run, "--json"]) == 0
    json.loads(capsys.readouterr().out)
    assert main(["report", run]) == 0
    assert (tmp_path / "run" / "report.html").stat().st_size > 1000
    assert main(["status", str(tmp_path)]) == 2
    assert "not a fedsup run directory" in capsys.readouterr().err


@pytest.mark.timeout(120)
def test_min_clients_not_reached_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = known(tmp_path)
    data["task"]["class"] = "toys_fed_fail:FailingKnownClient"
    (tmp_path / "toys_fed_fail.py").write_text(
        "from fed_toys import KnownClient\n"
        "class FailingKnownClient(KnownClient):\n"
        "    def train(self, device):\n"
        "        if self.client_id == 1:\n"
        "            raise ValueError('client 1 always fails')\n"
        "        return super().train(device)\n")
    sys.path.insert(0, str(tmp_path))
    try:
        assert main(["run", str(write(tmp_path, data))]) == 1
    finally:
        sys.path.remove(str(tmp_path))
    err = capsys.readouterr().err
    assert "round 1: 2 client(s) finished, fewer than min_clients=3" in err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "failed"


def run_on_a_terminal(args: list[str]) -> tuple[int, str]:
    """Run ``fedsup`` with a pseudo-terminal as its stdout and stderr; return its status and what it drew."""
    master, slave = pty.openpty()
    process = subprocess.Popen([sys.executable, "-m", "fedsup", *args], stdout=slave, stderr=slave, env=env())
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the terminal's other side is closed, the program has exited
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    return process.wait(timeout=60), b"".join(chunks).decode(errors="replace")


@pytest.mark.timeout(180)
def test_live_panel_on_a_terminal(tmp_path: Path) -> None:
    data = known(tmp_path, rounds=2)
    status, screen = run_on_a_terminal(["run", str(write(tmp_path, data))])
    assert status == 0, screen
    assert "\x1b[" in screen, "no terminal control sequences: the live panel was not drawn"
    assert "round 2/2" in screen and "elapsed" in screen and "cpu" in screen
    assert "cli: finished, 2/2 rounds" in screen


@pytest.mark.timeout(240)
def test_ctrl_c_exits_130_and_resume_finishes(tmp_path: Path) -> None:
    fifo = str(tmp_path / "moment")
    os.mkfifo(fifo)
    data = known(tmp_path, rounds=2)
    data["task"] = {"class": "fed_toys:SignallingClient",
                    "args": {"samples": 200, "fifo": fifo, "signal_round": 2, "signal_client": 0}}
    data["federation"]["clients"] = 2
    path = write(tmp_path, data)
    process = subprocess.Popen([sys.executable, "-m", "fedsup", "run", str(path)], env=env(),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with open(fifo) as moment:
        moment.readline()
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["rounds_completed"] == 1
    resumed = subprocess.run([sys.executable, "-m", "fedsup", "run", str(path), "--resume"], env=env(),
                             capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["rounds_completed"] == 2
