"""Speculative copies in a federated run: a straggling client's copy wins, and the model does not change."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

import fedsup
from fedsup.ui.cli import main as cli_main


def config(tmp_path: Path, name: str, delay: float, speculative: dict[str, float] | None) -> dict[str, Any]:
    supervisor: dict[str, Any] = {"devices": "cpu", "max_loaded": 6, "max_retries": 0}
    if speculative is not None:
        supervisor["speculative"] = speculative
    return {
        "name": name, "seed": 5,
        "task": {"class": "fed_toys:StragglingClient",
                 "args": {"marker_dir": str(tmp_path), "slow_client": 2, "slow_round": 1, "delay": delay,
                          "samples": 200, "test_samples": 100, "features": 8, "hidden": 16}},
        "federation": {"clients": 4, "rounds": 2, "evaluate": False},
        "supervisor": supervisor,
        "output": str(tmp_path / name),
    }


@pytest.mark.timeout(240)
def test_a_straggling_client_s_copy_wins_and_the_model_is_the_one_without_speculation(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fedsup.run(config(tmp_path, "plain", 0.0, None))
    fedsup.run(config(tmp_path, "speculative", 60.0, {"after": 2.0}))
    plain = torch.load(tmp_path / "plain" / "checkpoints" / "final.pt", weights_only=True)
    speculated = torch.load(tmp_path / "speculative" / "checkpoints" / "final.pt", weights_only=True)
    assert plain.keys() == speculated.keys()
    assert all(torch.equal(plain[k], speculated[k]) for k in plain), "the copy computed the same update"
    lines = (tmp_path / "speculative" / "records" / "round-1.jsonl").read_text().splitlines()
    record = next(r for r in map(json.loads, lines) if r["task_id"] == "round-1.client-2")
    assert [a["status"] for a in record["history"]] == ["CANCELLED", "FINISHED"]
    assert record["history"][0]["error"]["kind"] == "superseded"
    # the race is not a retry: not in the round's line, nor in fedsup status
    rounds = [json.loads(line) for line in (tmp_path / "speculative" / "rounds.jsonl").read_text().splitlines()]
    assert [r["retried"] for r in rounds] == [[], []]
    assert cli_main(["status", str(tmp_path / "speculative"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tasks"]["retried"] == 0
