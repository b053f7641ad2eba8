"""Bad input for the Ray backend: each one line naming what is wrong, exit status 2, in seconds; no cluster
is needed to say so."""

from __future__ import annotations

import socket
import sys
import time
from pathlib import Path

import pytest
import yaml

import fedsup
from fedsup.ui.cli import main as cli_main


def config(tmp_path: Path, **supervisor: object) -> Path:
    data = {"name": "bad", "seed": 0, "task": {"class": "fedsup.examples.synthetic:SyntheticClient",
                                                "args": {"samples": 50}},
            "federation": {"clients": 2, "rounds": 1},
            "supervisor": {"devices": "cpu", **supervisor}, "output": str(tmp_path / "run")}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.timeout(60)
def test_ray_not_installed_names_the_install_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now raises ImportError, as where it is absent
    assert cli_main(["run", str(config(tmp_path, backend="ray"))]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "supervisor.backend" in line and "pip install 'fedsup[ray]'" in line
    with pytest.raises(fedsup.ConfigError, match=r"pip install 'fedsup\[ray\]'"):
        fedsup.Supervisor(backend="ray")


@pytest.mark.timeout(60)
def test_an_address_with_nothing_listening_is_named_in_seconds(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("ray", reason="the Ray backend's tests need ray: pip install 'fedsup[ray]'")
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    began = time.monotonic()
    assert cli_main(["run", str(config(tmp_path, backend="ray", ray_address=address))]) == 2
    assert time.monotonic() - began < 30
    line = one_error_line(capsys.readouterr().err)
    assert "supervisor.ray_address" in line and address in line
    assert cli_main(["run", str(config(tmp_path, backend="ray", ray_address="head-node"))]) == 2
    assert "supervisor.ray_address" in one_error_line(capsys.readouterr().err)


@pytest.mark.timeout(60)
def test_a_misspelt_backend_gets_a_did_you_mean(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["run", str(config(tmp_path, backend="rayy"))]) == 2
    err = capsys.readouterr().err
    assert "has 1 problem" in err and "Traceback" not in err, err  # the config's problems, one line each
    line = next(line for line in err.splitlines() if "supervisor.backend" in line)
    assert "supervisor.backend" in line and "did you mean 'ray'?" in line and "rayy" in line
    with pytest.raises(fedsup.ConfigError, match="did you mean 'ray'"):
        fedsup.Supervisor(backend="rayy")
