"""What a person sees of a sweep on a terminal: one live panel (runs done, running, queued) and a line per
finished round of each run."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import yaml
from terminal import run_on_terminal

SCRIPT = str(Path(sys.executable).parent / "fedsup")


@pytest.mark.timeout(180)
def test_a_sweep_on_a_terminal_shows_its_runs_and_their_rounds(tmp_path: Path) -> None:
    base = {"name": "view", "task": {"class": "fedsup.examples.synthetic:SyntheticClient",
                                     "args": {"samples": 100, "test_samples": 50, "features": 8, "hidden": 8}},
            "federation": {"clients": 4, "rounds": 2, "clients_per_round": 2}, "supervisor": {"devices": "cpu"}}
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump({"name": "view", "base": "base.yaml", "seeds": [0, 1],
                                                         "output": str(tmp_path / "out")}))
    code, screen = run_on_terminal([SCRIPT, "sweep", str(tmp_path / "sweep.yaml")], dict(os.environ), 150)
    assert code == 0
    text = "\n".join(screen)
    headers = [line for line in screen if line.startswith("fedsup sweep:")]
    assert len(headers) == 1, text
    assert headers[0].startswith("fedsup sweep: 2 done, 0 running, 0 queued of 2 runs"), text
    for run in ("base.seed-0", "base.seed-1"):
        assert any(line.startswith(f"{run}: round 2/2 in ") for line in screen), text
    assert "sweep view: 2/2 runs finished" in text
