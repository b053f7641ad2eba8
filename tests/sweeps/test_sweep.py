"""Sweeps through real processes: every run of a sweep equals the same run alone, a killed sweep resumes
exactly, a failing run stops no other, and the sweep's report agrees with the runs' own rounds."""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch
import yaml

import fedsup
from fedsup.federated.sweep import load_sweep, run_sweep
from fedsup.ui import sweep_report

TESTS = Path(__file__).resolve().parent.parent
SYNTHETIC = {"class": "fedsup.examples.synthetic:SyntheticClient",
             "args": {"samples": 200, "test_samples": 100, "features": 8, "hidden": 16, "lr": 0.01}}


def write(folder: Path, base: dict[str, Any], sweep: dict[str, Any]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "base.yaml").write_text(yaml.safe_dump(base))
    path = folder / "sweep.yaml"
    path.write_text(yaml.safe_dump({"base": "base.yaml", "output": str(folder / "out"), **sweep}))
    return path


def base_config(task: dict[str, Any] = SYNTHETIC, rounds: int = 3) -> dict[str, Any]:
    return {"name": "base", "seed": 0, "task": task,
            "federation": {"clients": 6, "rounds": rounds, "clients_per_round": 3},
            "supervisor": {"devices": "cpu", "max_retries": 0}}


def models_equal(a: Path, b: Path) -> bool:
    x = torch.load(a / "checkpoints" / "final.pt", weights_only=True)
    y = torch.load(b / "checkpoints" / "final.pt", weights_only=True)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def metrics(run: Path) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in (run / "rounds.jsonl").read_text().splitlines()]
    return [{"train": r["train_metrics"], "eval": r["eval_metrics"]} for r in rows]


@pytest.mark.timeout(300)
def test_each_run_of_a_sweep_is_the_run_alone_and_the_report_agrees(tmp_path: Path) -> None:
    path = write(tmp_path, base_config(), {"name": "lr", "grid": {"task.args.lr": [0.01, 0.1]}, "seeds": [0, 1],
                                           "metric": "eval_accuracy"})
    sweep = load_sweep(path)
    assert [r.name for r in sweep.runs] == ["lr-0.01.seed-0", "lr-0.01.seed-1", "lr-0.1.seed-0", "lr-0.1.seed-1"]
    outcomes = run_sweep(sweep)
    assert [o.status for o in outcomes] == ["finished"] * 4, [o.error for o in outcomes]
    for run in sweep.runs:
        alone = tmp_path / "alone" / run.name
        fedsup.run(tmp_path / "base.yaml", overrides=run.overrides, output=alone)
        assert models_equal(run.path, alone), run.name
        assert metrics(run.path) == metrics(alone), run.name
    table = sweep_report.table_json(sweep_report.load_sweep_dir(tmp_path / "out"))
    assert [c["config"] for c in table["configs"]] == sorted(
        ["lr-0.01", "lr-0.1"], key=lambda c: -statistics.fmean(_final(tmp_path, c, s) for s in (0, 1)))
    for row in table["configs"]:
        finals = [_final(tmp_path, row["config"], seed) for seed in (0, 1)]
        assert row["mean"]["eval_accuracy"] == statistics.fmean(finals)
        assert row["std"]["eval_accuracy"] == statistics.stdev(finals)
    page = sweep_report.write_sweep_report(tmp_path / "out").read_text()
    assert page.count('class="band"') == 2 * len(table["metrics"]), "one band per config in every panel"
    for run in sweep.runs:
        assert (run.path / "report.html").is_file() and f'{run.name}/report.html' in page
    csv_text = sweep_report.write_sweep_report(tmp_path / "out", fmt="csv").read_text()
    assert csv_text.splitlines()[0].startswith("config,runs,accuracy_mean")


def _final(tmp_path: Path, config: str, seed: int) -> float:
    last = (tmp_path / "out" / f"{config}.seed-{seed}" / "rounds.jsonl").read_text().splitlines()[-1]
    return float(json.loads(last)["eval_metrics"]["accuracy"])


@pytest.mark.timeout(300)
def test_a_run_that_fails_stops_no_other_and_the_exit_status_says_so(tmp_path: Path) -> None:
    failing = {"class": "fed_toys:FailingClient", "args": {"failing": [0, 1, 2, 3, 4, 5], "from_round": 2}}
    path = write(tmp_path, base_config({"class": "fed_toys:KnownClient"}),
                 {"name": "mixed", "runs": [{"name": "ok"},
                                            {"name": "bad", "set": [f"task={json.dumps(failing)}"]}]})
    done = subprocess.run([sys.executable, "-m", "fedsup", "sweep", str(path)], capture_output=True, text=True,
                          timeout=240, env={**os.environ, "PYTHONPATH": str(TESTS)})
    assert done.returncode == 1, done.stderr
    assert "ok.seed-0: finished" in done.stdout and "bad.seed-0: failed" in done.stdout
    assert "1/2 runs finished" in done.stdout
    summary = json.loads((tmp_path / "out" / "sweep-summary.json").read_text())
    assert [r["status"] for r in summary["runs"]] == ["finished", "failed"] and not summary["finished"]


def _sweep_command(path: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "fedsup", "sweep", str(path), *extra]


PLAIN = {"class": "fed_toys:HoldingClient", "args": {}}


def held_runs(tmp_path: Path) -> tuple[Path, list[dict[str, Any]]]:
    """A ``held`` run whose client 1 of round 2 announces itself on a FIFO and waits, beside a ``free`` one:
    the FIFO to read, and the sweep's runs."""
    announce, go = tmp_path / "announce", tmp_path / "go"
    os.mkfifo(announce)
    os.mkfifo(go)
    holding = {"class": "fed_toys:HoldingClient",
               "args": {"announce": str(announce), "go": str(go), "hold_round": 2, "hold_client": 1}}
    return announce, [{"name": "held", "set": [f"task={json.dumps(holding)}"]},
                      {"name": "free", "set": [f"task={json.dumps(PLAIN)}"]}]


@pytest.mark.timeout(400)
def test_a_sweep_killed_mid_way_resumes_and_every_run_ends_as_it_would_have(tmp_path: Path) -> None:
    announce, runs = held_runs(tmp_path)
    sweep = {"name": "killed", "seeds": [0, 1], "runs": runs}
    path = write(tmp_path / "killed", base_config(PLAIN, rounds=4), sweep)
    reference = write(tmp_path / "reference", base_config(PLAIN, rounds=4),
                      {**sweep, "runs": [{"name": "held", "set": [f"task={json.dumps(PLAIN)}"]},
                                         {"name": "free", "set": [f"task={json.dumps(PLAIN)}"]}]})
    env = {**os.environ, "PYTHONPATH": str(TESTS)}
    process = subprocess.Popen(_sweep_command(path), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               start_new_session=True)
    try:
        with open(announce) as said:  # a held client of round 2 is training: the sweep is mid-way
            said.readline()
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    psutil.wait_procs([p for p in psutil.process_iter() if _of_session(p, process.pid)], timeout=60)
    resumed = subprocess.run(_sweep_command(path, "--resume"), env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    alone = subprocess.run(_sweep_command(reference), env=env, capture_output=True, text=True, timeout=300)
    assert alone.returncode == 0, alone.stderr[-3000:]
    for name in ("held.seed-0", "held.seed-1", "free.seed-0", "free.seed-1"):
        run = tmp_path / "killed" / "out" / name
        assert models_equal(run, tmp_path / "reference" / "out" / name), name
        events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines() if line.strip()]
        finished = Counter(e["task"] for e in events if e.get("status") == "FINISHED" and "task" in e)
        assert finished and max(finished.values()) == 1, f"{name}: a finished client-round ran again"


def _of_session(process: psutil.Process, session: int) -> bool:
    try:
        return os.getsid(process.pid) == session
    except (ProcessLookupError, PermissionError):
        return False


@pytest.mark.timeout(400)
def test_ctrl_c_stops_a_sweep_with_130_and_resume_finishes_it(tmp_path: Path) -> None:
    announce, runs = held_runs(tmp_path)
    base = {**base_config(PLAIN, rounds=4), "supervisor": {"devices": "cpu", "max_retries": 0, "grace_period": 1}}
    path = write(tmp_path, base, {"name": "stopped", "seeds": [0, 1], "runs": runs})
    env = {**os.environ, "PYTHONPATH": str(TESTS)}
    process = subprocess.Popen(_sweep_command(path), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    try:
        with open(announce) as said:  # mid-way: a held client of round 2 is training, the other runs go on
            said.readline()
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 130, err[-3000:]
    psutil.wait_procs([p for p in psutil.process_iter() if _of_session(p, process.pid)], timeout=60)
    assert not [p for p in psutil.process_iter() if _of_session(p, process.pid)], "a process of the sweep was left"
    resumed = subprocess.run(_sweep_command(path, "--resume"), env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "sweep-summary.json").read_text())
    assert summary["finished"] and {r["status"] for r in summary["runs"]} <= {"finished", "skipped"}
