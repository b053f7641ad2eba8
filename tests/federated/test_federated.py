"""Federated runs end to end: exact aggregation, the run directory, the contract, SIGKILL and resume."""

from __future__ import annotations

import json
import os
import shutil
import signal
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
from fedsup.federated.chaos import differing_checkpoints
from fedsup.ui.cli import main as cli_main

TESTS = Path(__file__).resolve().parent.parent  # where the toy task modules are


def config(tmp_path: Path, **changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "name": "test",
        "seed": 3,
        "task": {"class": "fed_toys:KnownClient"},
        "federation": {"clients": 5, "rounds": 2, "strategy": "fedavg"},
        "supervisor": {"devices": "cpu", "max_loaded": 3, "max_retries": 0},
        "output": str(tmp_path / "run"),
    }
    for key, value in changes.items():
        section, _, name = key.partition("__")
        if name:
            data[section][name] = value
        else:
            data[section] = value
    return data


def expected(strategy: str, round_: int, clients: list[int]) -> torch.Tensor:
    values = torch.tensor([round_ * 100.0 + c for c in clients], dtype=torch.float64)
    weights = torch.tensor([c + 1.0 for c in clients], dtype=torch.float64)
    if strategy == "fedavg":
        return (values * weights).sum() / weights.sum()
    if strategy == "fedmedian":
        return values.median() if len(values) % 2 else values.sort().values[len(values) // 2 - 1:][:2].mean()
    trimmed = values.sort().values[1:-1]  # trimmed_mean with beta 0.2 drops one from each end of five
    return trimmed.mean()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("strategy", ["fedavg", "fedmedian", "trimmed_mean"])
def test_aggregation_is_exact_through_a_real_run(tmp_path: Path, strategy: str) -> None:
    args = {"beta": 0.2} if strategy == "trimmed_mean" else {}
    summary = fedsup.run(config(tmp_path, federation={"clients": 5, "rounds": 2, "strategy": strategy,
                                                      "strategy_args": args}))
    assert summary["status"] == "finished" and summary["rounds_completed"] == 2
    run = tmp_path / "run"
    for round_ in (1, 2):
        state = torch.load(run / "checkpoints" / f"round-{round_}.pt", weights_only=True)
        want = expected(strategy, round_, [0, 1, 2, 3, 4]).to(torch.float32)
        assert torch.equal(state["w"], torch.full((4,), float(want))), (round_, state["w"], want)
        assert state["steps"].dtype == torch.int64 and int(state["steps"]) == 4  # integers: the max
    final = torch.load(run / "checkpoints" / "final.pt", weights_only=True)
    assert torch.equal(final["w"], torch.load(run / "checkpoints" / "round-2.pt", weights_only=True)["w"])
    # every client of round 2 trained on round 1's aggregate, through shared memory
    from fedsup.engine.rundir import read_record_lines

    record = read_record_lines(run / "records" / "round-2.jsonl")[0]["round-2.client-3"]
    assert record.result["seen"] == pytest.approx(float(expected(strategy, 1, [0, 1, 2, 3, 4])), rel=1e-6)


@pytest.mark.timeout(120)
def test_run_directory_holds_everything(tmp_path: Path) -> None:
    summary = fedsup.run(config(tmp_path, federation={"clients": 6, "rounds": 3, "clients_per_round": 3,
                                                      "min_clients": 3}))
    run = tmp_path / "run"
    assert yaml.safe_load((run / "config.yaml").read_text())["federation"]["rounds"] == 3
    rounds = [json.loads(line) for line in (run / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    for line in rounds:
        assert len(line["selected"]) == 3 and sorted(line["finished"]) == sorted(line["selected"])
        assert line["failed"] == [] and line["num_examples"] > 0 and line["duration"] >= 0
    assert {p.name for p in (run / "checkpoints").iterdir()} == {"initial.pt", "round-1.pt", "round-2.pt",
                                                                 "round-3.pt", "final.pt"}
    assert not (run / "updates" / "round-3").exists()  # a committed round's updates are gone
    # a listing a person can read: one records file per round, no folder per job, no task folder for a
    # client that printed nothing
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "config.yaml", "events.jsonl", "fedsup.lock",
                                                     "records", "rounds.jsonl", "summary.json"]
    assert sorted(p.name for p in (run / "records").iterdir()) == ["initial.jsonl", "round-1.jsonl",
                                                                   "round-2.jsonl", "round-3.jsonl"]
    stored = json.loads((run / "summary.json").read_text())
    assert stored["status"] == "finished" and stored == summary
    # the same seed picks the same clients; a loaded client trains again without loading again
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    adopted = [e for e in events if e.get("adopted")]
    loads = Counter(e["task"] for e in events if e.get("status") == "LOADING")
    assert adopted, "no client process was reused across rounds"
    assert sum(loads.values()) < 1 + 9  # fewer loads than jobs


@pytest.mark.timeout(120)
def test_a_result_without_state_is_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config(tmp_path, task={"class": "fed_toys:NoStateClient"})))
    assert cli_main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert "train() must return" in err and "state" in err and "Traceback" not in err


@pytest.mark.timeout(60)
def test_an_existing_run_is_not_overwritten_and_resume_needs_a_run(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config(tmp_path, federation={"clients": 2, "rounds": 1})))
    assert cli_main(["run", str(path), "--resume"]) == 2
    assert "holds no run to resume" in capsys.readouterr().err
    assert cli_main(["run", str(path)]) == 0
    assert cli_main(["run", str(path)]) == 2
    assert "already holds a run" in capsys.readouterr().err
    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump(config(tmp_path, federation={"clients": 2, "rounds": 1}, seed=4)))
    assert cli_main(["run", str(changed), "--resume"]) == 2
    assert "seed changed" in capsys.readouterr().err


def synthetic_config(tmp_path: Path, output: Path, fifo: str, strategy: str = "fedavg") -> Path:
    data = config(tmp_path, task={"class": "fed_toys:SignallingClient",
                                  "args": {"samples": 300, "fifo": fifo, "signal_round": 2, "signal_client": -1}},
                  federation={"clients": 8, "rounds": 3, "clients_per_round": 4, "min_clients": 4,
                              "strategy": strategy},
                  output=str(output))
    path = tmp_path / f"{output.name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def fedsup_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "fedsup", *args]


def child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("strategy", ["fedavg", "fedadam"])  # fedadam: its moments must resume exactly too
def test_sigkill_of_the_main_process_then_resume_gives_the_same_model(tmp_path: Path, strategy: str) -> None:
    fifo = str(tmp_path / "moment")
    os.mkfifo(fifo)
    plain = synthetic_config(tmp_path, tmp_path / "plain", fifo="/nonexistent", strategy=strategy)
    subprocess.run(fedsup_cmd("run", str(plain)), check=True, env=child_env(), capture_output=True, timeout=240)

    killed_cfg = synthetic_config(tmp_path, tmp_path / "killed", fifo=fifo, strategy=strategy)
    data = yaml.safe_load(killed_cfg.read_text())
    data["task"]["args"]["signal_client"] = sorted(_round_two_clients(tmp_path / "plain"))[-1]
    killed_cfg.write_text(yaml.safe_dump(data))
    main = subprocess.Popen(fedsup_cmd("run", str(killed_cfg)), env=child_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    with open(fifo) as moment:  # returns once a round-2 client is training
        moment.readline()
    family = psutil.Process(main.pid).children(recursive=True)
    assert family, "the run should have worker processes at this moment"
    main.send_signal(signal.SIGKILL)
    main.wait(timeout=60)
    _, alive = psutil.wait_procs(family, timeout=30)  # a deadlock detector: PDEATHSIG acts at once
    assert not alive, f"workers outlived the killed supervisor: {alive}"

    resumed = subprocess.run(fedsup_cmd("run", str(killed_cfg), "--resume"), env=child_env(),
                             capture_output=True, text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stderr
    saved = sorted(p.name for p in (tmp_path / "plain" / "checkpoints").glob("*.pt"))
    stateful = [f"round-{r}.strategy.pt" for r in (1, 2, 3)] if strategy == "fedadam" else []
    assert saved == sorted(["initial.pt", "final.pt", "round-1.pt", "round-2.pt", "round-3.pt", *stateful]), saved
    assert differing_checkpoints(tmp_path / "plain", tmp_path / "killed") == []
    events = [json.loads(line) for line in (tmp_path / "killed" / "events.jsonl").read_text().splitlines()
              if line.strip().startswith("{") and line.strip().endswith("}")]
    finished = Counter(e["task"] for e in events if e.get("status") == "FINISHED")
    assert finished and max(finished.values()) == 1, [t for t, n in finished.items() if n > 1]
    assert any(e.get("event") == "run_started" and e.get("resume") for e in events)
    assert json.loads((tmp_path / "killed" / "summary.json").read_text())["status"] == "finished"


def _round_two_clients(run: Path) -> list[int]:
    line = json.loads((run / "rounds.jsonl").read_text().splitlines()[1])
    return [int(t.split("client-")[1]) for t in line["selected"]]


@pytest.mark.timeout(120)
def test_nothing_in_the_main_process_grows_with_the_rounds(tmp_path: Path) -> None:
    from fedsup.federated.runner import prepare

    federation = prepare(config(tmp_path, federation={"clients": 40, "rounds": 6, "clients_per_round": 3}))
    federation.run()
    scheduler = federation.supervisor.scheduler
    assert scheduler is not None and len(scheduler.handles) == 3  # the last round's jobs, not all 18
    assert federation.completed == 6 and federation.last is not None and federation.last.round == 6
    assert len(federation._clients) == 3  # client objects of the last round only, never all 40
    assert {k: federation.last.jobs[k] for k in ("tasks", "attempts", "failed")} == {"tasks": 3, "attempts": 3,
                                                                                       "failed": 0}


@pytest.mark.timeout(120)
def test_only_a_client_that_printed_keeps_a_task_folder(tmp_path: Path) -> None:
    fedsup.run(config(tmp_path, task={"class": "fed_toys:TalkingClient", "args": {"talker": 2}},
                      federation={"clients": 4, "rounds": 3, "clients_per_round": 4}))
    run = tmp_path / "run"
    assert sorted(p.name for p in (run / "tasks").iterdir()) == ["client-2"]
    assert sorted(p.name for p in (run / "tasks" / "client-2").iterdir()) == ["stdout.log"]
    assert (run / "tasks" / "client-2" / "stdout.log").read_text().splitlines() == [
        f"client 2 trains in round {r}" for r in (1, 2, 3)]


@pytest.mark.timeout(120)
def test_summary_totals_match_the_records_round_by_round(tmp_path: Path) -> None:
    # summary.json is rewritten after every round from that round's records alone: its totals must still be
    # those of every record in the run directory
    from fedsup.engine.rundir import read_records

    seen: list[tuple[dict[str, Any], dict[str, Any]]] = []

    def totals_now() -> dict[str, Any]:
        records = read_records(tmp_path / "run")
        return {"tasks": len(records), "attempts": sum(r.attempts for r in records),
                "failed": sum(r.status is fedsup.TaskStatus.FAILED for r in records)}

    def on_event(event: dict[str, Any]) -> None:
        if event.get("event") == "round_started" and event["round"] > 1:
            written = json.loads((tmp_path / "run" / "summary.json").read_text())["totals"]
            seen.append(({k: written[k] for k in ("tasks", "attempts", "failed")}, totals_now()))

    summary = fedsup.run(config(tmp_path, federation={"clients": 4, "rounds": 3, "clients_per_round": 3}),
                         on_event=on_event)
    assert summary["status"] == "finished" and len(seen) == 2
    assert all(written == actual for written, actual in seen), seen
    assert {k: summary["totals"][k] for k in ("tasks", "attempts", "failed")} == totals_now()


def to_older_layout(run: Path) -> None:
    """Rewrite a run directory as fedsup wrote one before records were grouped: a folder with a record.json per
    job, no totals in the lines of rounds.jsonl, no checkpoints section in config.yaml."""
    from fedsup.engine.rundir import read_record_lines, safe_name

    for path in (run / "records").glob("*.jsonl"):
        for task, found in read_record_lines(path)[0].items():
            folder = run / "tasks" / safe_name(task)
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "record.json").write_text(found.model_dump_json(indent=2) + "\n")
    shutil.rmtree(run / "records")
    lines = [json.loads(line) for line in (run / "rounds.jsonl").read_text().splitlines()]
    (run / "rounds.jsonl").write_text("".join(json.dumps({k: v for k, v in line.items() if k != "jobs"}) + "\n"
                                              for line in lines))
    stored = yaml.safe_load((run / "config.yaml").read_text())
    del stored["checkpoints"]
    (run / "config.yaml").write_text(yaml.safe_dump(stored, sort_keys=False))


@pytest.mark.timeout(300)
def test_a_run_directory_of_the_older_layout_is_resumed_without_running_a_job_twice(tmp_path: Path) -> None:
    fifo = str(tmp_path / "moment")
    os.mkfifo(fifo)
    plain = synthetic_config(tmp_path, tmp_path / "plain", fifo="/nonexistent", strategy="fedavg")
    subprocess.run(fedsup_cmd("run", str(plain)), check=True, env=child_env(), capture_output=True, timeout=240)
    killed_cfg = synthetic_config(tmp_path, tmp_path / "killed", fifo=fifo, strategy="fedavg")
    data = yaml.safe_load(killed_cfg.read_text())
    data["task"]["args"]["signal_client"] = sorted(_round_two_clients(tmp_path / "plain"))[-1]
    killed_cfg.write_text(yaml.safe_dump(data))
    main = subprocess.Popen(fedsup_cmd("run", str(killed_cfg)), env=child_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    with open(fifo) as moment:  # returns once the last of round 2's clients is training
        moment.readline()
    family = psutil.Process(main.pid).children(recursive=True)
    main.send_signal(signal.SIGKILL)
    main.wait(timeout=60)
    psutil.wait_procs(family, timeout=30)
    run = tmp_path / "killed"
    to_older_layout(run)
    before = {t for t in os.listdir(run / "tasks") if t.startswith("round-2.")}
    resumed = subprocess.run(fedsup_cmd("run", str(killed_cfg), "--resume"), env=child_env(),
                             capture_output=True, text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stderr
    assert differing_checkpoints(tmp_path / "plain", run) == []
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()
              if line.strip().startswith("{") and line.strip().endswith("}")]
    finished = Counter(e["task"] for e in events if e.get("status") == "FINISHED")
    assert max(finished.values()) == 1, [t for t, n in finished.items() if n > 1]
    assert before, "no job of round 2 had finished before the kill: nothing was tested"
    totals = json.loads((run / "summary.json").read_text())["totals"]
    assert totals["tasks"] == json.loads((tmp_path / "plain" / "summary.json").read_text())["totals"]["tasks"]

