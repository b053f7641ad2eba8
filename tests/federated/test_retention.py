"""Checkpoint retention: which rounds stay on disk, kept client state to match, and kills timed around the
pruning (the main process SIGKILLs itself at the moment chosen) that resume bit-identical."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

import fedsup
from fedsup.federated.chaos import differing_checkpoints, finished_twice
from fedsup.federated.client_state import ClientStates
from fedsup.federated.retention import Retention, sweep

TESTS = Path(__file__).resolve().parent.parent  # where the toy task modules are

# Runs the CLI with the checkpoint pruning wrapped: at round AT the process SIGKILLs itself at MOMENT:
# "before" (the round's line is on disk, nothing pruned), "between" (the model pruned, its strategy
# state not yet), "after" (pruned, before the round's event and summary).
KILLER = """
import os, signal, sys
import fedsup.federated.rounds as rounds
from fedsup.federated import retention
moment, at = sys.argv[1], int(sys.argv[2])
def prune(folder, keep, done):
    if done == at:
        if moment == "before":
            os.kill(os.getpid(), signal.SIGKILL)
        if moment == "between":
            retention.round_files(folder, keep.dropped_by(done))[0].unlink()
            os.kill(os.getpid(), signal.SIGKILL)
    retention.prune(folder, keep, done)
    if done == at and moment == "after":
        os.kill(os.getpid(), signal.SIGKILL)
rounds.prune = prune
from fedsup.ui.cli import main
sys.exit(main(sys.argv[3:]))
"""


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}


def quadratic(output: Path, rounds: int = 8, keep_last: int | None = 2, every: int | None = 3) -> dict[str, Any]:
    return {"name": "retained", "seed": 1,
            "task": {"class": "fed_toys:QuadraticClient", "args": {"stateful": True, "scaffold": True}},
            "federation": {"clients": 3, "rounds": rounds, "evaluate": False, "strategy": "scaffold",
                           "stragglers": {"fraction": 0.34}},
            "checkpoints": {"keep_last": keep_last, "every": every},
            "supervisor": {"devices": "cpu", "max_loaded": 3, "max_retries": 0}, "output": str(output)}


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def states(run: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {p.name: torch.load(p, weights_only=True) for p in sorted((run / "client_state").glob("*.pt"))}


def test_retention_keeps_the_newest_rounds_every_kth_and_drops_one_per_round() -> None:
    keep = Retention(keep_last=3, every=50)
    assert [r for r in range(1, 201) if keep.keeps(r, 200)] == [50, 100, 150, 198, 199, 200]
    assert keep.oldest_resumable(200) == 198 and keep.oldest_resumable(2) == 1
    assert [keep.dropped_by(d) for d in (3, 4, 53, 54)] == [None, 1, None, 51]  # 50 stays: every 50th
    assert not keep.keeps(201, 200)  # a round after the newest complete one was never committed
    everything = Retention(keep_last=None, every=None)
    assert all(everything.keeps(r, 10) for r in range(1, 11)) and everything.dropped_by(10) is None


@pytest.mark.parametrize(("key", "value", "message"), [
    ("keep_last", 0, "checkpoints.keep_last: must be at least 1 (got 0)"),
    ("every", -5, "checkpoints.every: must be at least 1 (got -5)"),
    ("keep_lats", 3, "checkpoints.keep_lats: unknown key"),
])
def test_bad_retention_is_named_with_its_key_and_value(key: str, value: Any, message: str) -> None:
    from config_cases import VALID, changed

    from fedsup.engine.errors import ConfigError
    from fedsup.federated.config import load_config

    with pytest.raises(ConfigError) as info:
        load_config(changed(f"checkpoints.{key}", value), check_imports=False)
    assert message in str(info.value), str(info.value)
    config = load_config({k: v for k, v in VALID.items() if k != "checkpoints"}, check_imports=False)
    assert (config.checkpoints.keep_last, config.checkpoints.every) == (3, 50)  # the documented defaults
    everything = load_config(changed("checkpoints", {"keep_last": None, "every": None}), check_imports=False)
    assert everything.checkpoints.keep_last is None and everything.checkpoints.every is None


def test_client_states_keep_what_the_resumable_rounds_need(tmp_path: Path) -> None:
    states_ = ClientStates(tmp_path)
    updates = tmp_path / "updates"
    updates.mkdir()
    for round_, clients in [(1, [0, 1]), (2, [0]), (3, [0]), (4, [0]), (6, [1])]:
        for c in clients:
            ClientStates.pending(updates, c).write_bytes(b"x")
        moved = states_.commit(round_, updates, clients)
        states_.prune(round_, moved, oldest=max(1, round_ - 1))  # keep_last: 2
    # client 0 trained in rounds 1-4: a resume from round 3 or 4 needs rounds 3 and 4 (round 1 and 2 went);
    # client 1's round-1 state is what a resume from round 5 would read: it stays beside round 6's
    assert names(tmp_path / "client_state") == ["client-0.round-3.pt", "client-0.round-4.pt",
                                                 "client-1.round-1.pt", "client-1.round-6.pt"]
    ClientStates.pending(updates, 1).write_bytes(b"x")
    states_.prune(7, states_.commit(7, updates, [1]), oldest=6)
    assert names(tmp_path / "client_state")[2:] == ["client-1.round-6.pt", "client-1.round-7.pt"]
    # a resume from round 3 (round 4 given up): round 4's state goes, round 3's is what client 0 reads
    again = ClientStates(tmp_path)
    again.recover(3, oldest=2)
    assert names(tmp_path / "client_state") == ["client-0.round-3.pt"]
    assert again.committed(0) == tmp_path / "client_state" / "client-0.round-3.pt" and again.committed(1) is None


def test_sweep_removes_what_a_kill_in_pruning_or_writing_left(tmp_path: Path) -> None:
    for name in ["initial.pt", "final.pt", "round-1.pt", "round-3.pt", "round-3.strategy.pt", "round-4.pt",
                 "round-4.strategy.pt", "round-5.strategy.pt", "round-6.pt", ".round-6.pt.abc.tmp", "notes.txt"]:
        (tmp_path / name).write_bytes(b"x")
    sweep(tmp_path, Retention(keep_last=2, every=3), done=5)
    assert names(tmp_path) == ["final.pt", "initial.pt", "notes.txt", "round-3.pt", "round-3.strategy.pt",
                               "round-4.pt", "round-4.strategy.pt", "round-5.strategy.pt"]


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("plain") / "run"
    fedsup.run(quadratic(run))
    return run


@pytest.mark.timeout(240)
def test_a_run_keeps_the_newest_rounds_every_kth_final_and_the_client_state_they_need(plain: Path) -> None:
    assert names(plain / "checkpoints") == ["final.pt", "initial.pt", "round-3.pt", "round-3.strategy.pt",
                                            "round-6.pt", "round-6.strategy.pt", "round-7.pt",
                                            "round-7.strategy.pt", "round-8.pt", "round-8.strategy.pt"]
    kept = names(plain / "client_state")
    # each client: its newest state from round 7 or before, and any newer one (it may straggle, not skip)
    for client in range(3):
        rounds = [int(n.split("round-")[1][:-3]) for n in kept if n.startswith(f"client-{client}.")]
        assert rounds and max(rounds) == 8 and min(rounds) <= 7 and len(rounds) <= 2, kept


@pytest.mark.timeout(300)
@pytest.mark.parametrize("moment", ["before", "between", "after"])
def test_a_kill_around_pruning_resumes_bit_identical(tmp_path: Path, plain: Path, moment: str) -> None:
    run = tmp_path / "run"
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(quadratic(run)))
    killed = subprocess.run([sys.executable, "-c", KILLER, moment, "6", "run", str(path)], env=env(),
                            capture_output=True, text=True, timeout=240)
    assert killed.returncode == -9, killed.stderr[-2000:]
    lines = (run / "rounds.jsonl").read_text().splitlines()
    assert len(lines) == 6  # killed after round 6's commit line, in pruning round 4
    # never the only complete one: round 6 and the round before it (keep_last 2) are both there
    assert (run / "checkpoints" / "round-6.pt").exists() and (run / "checkpoints" / "round-5.pt").exists()
    assert (run / "checkpoints" / "round-4.pt").exists() == (moment == "before")
    assert (run / "checkpoints" / "round-3.strategy.pt").exists()  # round 3 is every 3rd: never pruned
    resumed = subprocess.run([sys.executable, "-m", "fedsup", "run", str(path), "--resume"], env=env(),
                             capture_output=True, text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert differing_checkpoints(plain, run) == []  # the same files kept, bit for bit
    a, b = states(plain), states(run)
    assert a.keys() == b.keys() and all(torch.equal(a[n]["rounds"], b[n]["rounds"]) for n in a)
    assert finished_twice(run) == []


@pytest.mark.timeout(240)
def test_resume_starts_from_an_older_kept_round_when_the_newest_is_gone(tmp_path: Path, plain: Path) -> None:
    run = tmp_path / "run"
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(quadratic(run)))
    killed = subprocess.run([sys.executable, "-c", KILLER, "after", "6", "run", str(path)], env=env(),
                            capture_output=True, text=True, timeout=240)
    assert killed.returncode == -9, killed.stderr[-2000:]
    for name in ("round-6.pt", "round-6.strategy.pt"):  # the newest complete round's files, deleted by hand
        (run / "checkpoints" / name).unlink()
    resumed = subprocess.run([sys.executable, "-m", "fedsup", "run", str(path), "--resume"], env=env(),
                             capture_output=True, text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from round 5 (rounds 6 to 6 run again)" in resumed.stderr
    assert differing_checkpoints(plain, run) == []  # round 5's model, strategy and client states were all kept
    a, b = states(plain), states(run)
    assert a.keys() == b.keys() and all(torch.equal(a[n]["rounds"], b[n]["rounds"]) for n in a)
