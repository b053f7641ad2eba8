"""The guards around a run: one run per run directory (a lock that dies with its process), folders that are
not runs, a resume without its config, client updates checked against the contract, a failed run's root
cause on the terminal and in ``fedsup status``, and task folders that never collide.

Processes are real where they are the point (two runs on one directory, a SIGKILLed run then ``fedsup
status``). Nothing sleeps to synchronise: the holding client announces itself on a FIFO and waits there;
timeouts are deadlock detectors only.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch
import yaml
from announce import Fifo

import fedsup
from fedsup.engine.contract import check_update, update_contract
from fedsup.engine.errors import RunDirError
from fedsup.engine.rundir import LOCK_FILE, lock_run_dir, lock_state, safe_name
from fedsup.ui import digest
from fedsup.ui.cli import main as cli_main

TESTS = Path(__file__).resolve().parent.parent  # where the toy task modules are


def config(tmp_path: Path, **changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "name": "guards",
        "seed": 3,
        "task": {"class": "fed_toys:KnownClient"},
        "federation": {"clients": 3, "rounds": 2},
        "supervisor": {"devices": "cpu", "max_loaded": 3, "max_retries": 0},
        "output": str(tmp_path / "run"),
    }
    data.update(changes)
    return data


def write(tmp_path: Path, data: dict[str, Any], name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def fedsup_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "fedsup", *args]


def child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}


def record(run: Path, task: str) -> fedsup.TaskRecord:
    """A federated job's record: in its round's records/round-R.jsonl (the initial state's: initial.jsonl)."""
    from fedsup.engine.rundir import read_record_lines

    group = "initial" if task == "initial-state" else task.split(".")[0]
    return read_record_lines(run / "records" / f"{group}.jsonl")[0][task]


def events(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------- one run per run directory


@pytest.mark.timeout(300)
def test_a_run_directory_is_locked_while_used_and_a_sigkill_never_leaves_it_stuck(
        tmp_path: Path, fifo: Fifo, capsys: pytest.CaptureFixture[str]) -> None:
    go = tmp_path / "go"
    os.mkfifo(go)
    data = config(tmp_path, task={"class": "fed_toys:HoldingClient",
                                  "args": {"announce": fifo.path, "go": str(go), "hold_round": 2, "hold_client": 0}},
                  federation={"clients": 3, "rounds": 3})
    path = write(tmp_path, data)
    run = tmp_path / "run"
    with open(tmp_path / "first.err", "w") as err:
        first = subprocess.Popen(fedsup_cmd("run", str(path)), env=child_env(), stdout=subprocess.PIPE, stderr=err)
    try:
        fifo.lines(1, timeout=120, watch=[first.stdout])  # client 0 is training in round 2, and waits there
        holder = f"pid {first.pid} holds its lock"
        family = psutil.Process(first.pid).children(recursive=True)
        assert family, "the run should have its fork servers and client processes at this moment"
        for proc in family:  # no process of the run but the supervisor keeps the lock alive
            assert all(Path(f.path).name != LOCK_FILE for f in proc.open_files()), proc
        # a second run from another process, with another seed: refused, naming the run that holds the folder
        second = subprocess.run(fedsup_cmd("run", str(path), "--set", "seed=9"), env=child_env(),
                                capture_output=True, text=True, timeout=120)
        assert second.returncode == 2, second.stderr
        assert holder in second.stderr and "Traceback" not in second.stderr
        # a resume while it runs, and both through the API
        assert cli_main(["run", str(path), "--resume"]) == 2
        assert holder in capsys.readouterr().err
        for resume in (True, False):
            with pytest.raises(RunDirError, match=holder):
                fedsup.run(data, resume=resume)
        assert yaml.safe_load((run / "config.yaml").read_text())["seed"] == 3
        # status tells it is running, by the lock
        assert cli_main(["status", str(run)]) == 0
        assert f"run guards: running (from the run's lock, held by pid {first.pid})" in capsys.readouterr().out
        assert cli_main(["status", str(run), "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["running_pid"] == first.pid
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
        _, alive = psutil.wait_procs(family, timeout=30)  # a deadlock detector: PDEATHSIG acts at once
        assert not alive, f"processes outlived the killed supervisor: {alive}"
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
        assert first.stdout is not None
        first.stdout.close()
    # summary.json still says "running"; the lock says it is not
    assert json.loads((run / "summary.json").read_text())["status"] == "running"
    assert cli_main(["status", str(run)]) == 0
    head = capsys.readouterr().out.splitlines()[0]
    assert head == ("run guards: killed (from the run's lock: no process holds it, though summary.json says "
                    "running; --resume continues it)"), head
    assert cli_main(["status", str(run), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["status"] == "killed" and shown["running_pid"] is None
    # the lock died with the run: --resume takes the folder at once and finishes it
    resumed = subprocess.run(fedsup_cmd("run", str(path), "--resume"), env=child_env(), capture_output=True,
                             text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stderr
    assert cli_main(["status", str(run)]) == 0
    assert capsys.readouterr().out.startswith("run guards: finished (from summary.json)")
    # the report ends the attempt the kill cut off at the run's last event before the resume, not across the gap
    resumed_at = max(e["time"] for e in events(run) if e.get("event") == "run_started")
    cut, again = [a for a in digest.build_attempts(digest.load_run(run)) if a.task == "round-2.client-0"]
    assert cut.cut_off and cut.spans[-1].kind == "train" and cut.spans[-1].cut and cut.end < resumed_at
    assert not again.cut_off and again.start >= resumed_at and again.status == "FINISHED"


def test_the_lock_is_one_per_directory_in_a_process_too_and_not_kept_by_forked_children(tmp_path: Path) -> None:
    run = tmp_path / "run"
    lock = lock_run_dir(run)
    try:
        assert (run / LOCK_FILE).read_text() == f"{os.getpid()}\n"
        assert lock_state(run).held and lock_state(run).pid == os.getpid()
        with pytest.raises(RunDirError, match=rf"pid {os.getpid()} \(this process\) holds its lock"):
            lock_run_dir(run)
        joined = lock_run_dir(run, join=True)  # the supervisor of a federated run opens the same folder
        joined.release()
        assert lock_state(run).held
        pid = os.fork()
        if pid == 0:  # a forked child (a fork server, a task's daemon) holds no copy of the lock
            held = any(os.path.basename(os.readlink(f"/proc/self/fd/{fd}")) == LOCK_FILE
                       for fd in os.listdir("/proc/self/fd") if os.path.exists(f"/proc/self/fd/{fd}"))
            os._exit(1 if held else 0)
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    finally:
        lock.release()
    state = lock_state(run)
    assert state.exists and not state.held
    lock_run_dir(run).release()  # free again


# ---------------------------------------------------------------- folders that are not runs, resume without config


def test_a_folder_that_holds_files_but_no_run_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.yaml").write_text("my: own config\n")
    (mine / "summary.json").write_text('{"my": "own summary"}\n')
    write(mine, config(tmp_path, output="."), "experiment.yaml")
    before = {p.name: p.read_bytes() for p in mine.iterdir()}
    monkeypatch.chdir(mine)
    assert cli_main(["run", "experiment.yaml"]) == 2
    err = capsys.readouterr().err
    assert "holds files but no fedsup run (config.yaml, experiment.yaml, summary.json)" in err, err
    assert cli_main(["run", "experiment.yaml", "--resume"]) == 2
    assert "holds no run to resume" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in mine.iterdir()} == before  # not even a lock file left


@pytest.mark.timeout(120)
def test_resume_without_the_stored_config_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, config(tmp_path, federation={"clients": 2, "rounds": 1}))
    assert cli_main(["run", str(path)]) == 0
    run = tmp_path / "run"
    (run / "config.yaml").unlink()
    assert cli_main(["run", str(path), "--resume", "--set", "seed=4", "--set", "federation.rounds=2"]) == 2
    err = capsys.readouterr().err
    assert f"--resume: {run / 'config.yaml'} is missing" in err and "Traceback" not in err
    assert len((run / "rounds.jsonl").read_text().splitlines()) == 1  # nothing of another run mixed in


@pytest.mark.timeout(120)
def test_a_stored_config_is_read_with_the_same_bounds_as_any_config(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, config(tmp_path, federation={"clients": 2, "rounds": 1}))
    assert cli_main(["run", str(path)]) == 0
    stored = tmp_path / "run" / "config.yaml"
    # Eight levels of ten aliases each: a few hundred bytes that would expand to over 10**8 values.
    bomb = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    bomb += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)]
    stored.write_text("\n".join(bomb) + "\n" + stored.read_text())
    assert cli_main(["run", str(path), "--resume"]) == 2
    err = capsys.readouterr().err
    assert f"{stored}: damaged (its aliases expand it by" in err and "Traceback" not in err


# ---------------------------------------------------------------- client updates against the contract


@pytest.mark.parametrize(("flaw", "named"), [
    ("shape", "key 'w' has shape [5], the global model's is [4]"),
    ("missing", "missing key(s) 'steps'"),
    ("extra", "extra key(s) 'bias' not in the global model"),
    ("dtype", "key 'w' has dtype torch.float64, the global model's is torch.float32 (shape [4])"),
    ("nan", "key 'w' (shape [4]) holds 1 NaN and 0 Inf of 4 values"),
    ("inf", "key 'w' (shape [4]) holds 0 NaN and 2 Inf of 4 values"),
])
def test_the_update_contract_names_client_key_and_shapes(flaw: str, named: str) -> None:
    global_model = {"w": torch.zeros(4), "steps": torch.zeros((), dtype=torch.int64)}
    good = {"w": torch.ones(4), "steps": torch.tensor(2)}
    bad = dict(good)
    if flaw == "shape":
        bad["w"] = torch.zeros(5)
    elif flaw == "missing":
        del bad["steps"]
    elif flaw == "extra":
        bad["bias"] = torch.zeros(2)
    elif flaw == "dtype":
        bad["w"] = bad["w"].double()
    elif flaw == "nan":
        bad["w"] = torch.tensor([1.0, float("nan"), 2.0, 3.0])
    else:
        bad["w"] = torch.tensor([1.0, float("inf"), float("-inf"), 3.0])
    contract = update_contract("client-7", global_model)
    assert check_update(good, contract) is None
    problem = check_update(bad, contract)
    assert problem is not None and problem.startswith("client-7's update breaks the federated contract: ")
    assert named in problem, problem
    if flaw in ("nan", "inf"):  # the switch: federation.reject_nonfinite: false
        assert check_update(bad, update_contract("client-7", global_model, reject_nonfinite=False)) is None


def bad_update_config(tmp_path: Path, flaw: str, **federation: Any) -> dict[str, Any]:
    return config(tmp_path, task={"class": "fed_toys:BadUpdateClient",
                                  "args": {"bad_client": 1, "flaw": flaw, "fixed": str(tmp_path / "fixed")}},
                  federation={"clients": 3, "rounds": 2, **federation},
                  supervisor={"devices": "cpu", "max_loaded": 3, "max_retries": 2})


@pytest.mark.timeout(180)
def test_a_broken_update_ends_the_run_with_one_line_and_resume_runs_that_client_once_fixed(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, bad_update_config(tmp_path, "shape"))
    run = tmp_path / "run"
    assert cli_main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert ("fedsup: error: round 1: 2 client(s) finished, fewer than min_clients=3; 1 failed: round-1.client-1: "
            in err), err
    assert "client-1's update breaks the federated contract: key 'w' has shape [5], the global model's is [4]" in err
    assert "Traceback" not in err and len([line for line in err.splitlines() if "error" in line]) == 1, err
    broken = record(run, "round-1.client-1")
    assert broken.status is fedsup.TaskStatus.FAILED and broken.attempts == 1  # max_retries=2: never retried
    assert broken.error is not None and broken.error.kind == "contract"
    # the client's code is fixed: --resume runs it again, and the run finishes
    (tmp_path / "fixed").touch()
    assert cli_main(["run", str(path), "--resume"]) == 0
    assert record(run, "round-1.client-1").ok
    final = torch.load(run / "checkpoints" / "final.pt", weights_only=True)
    weights = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    assert torch.equal(final["w"], torch.full((4,), float((torch.tensor([200.0, 201, 202], dtype=torch.float64)
                                                           * weights).sum() / weights.sum())))


class _RunsCode:
    """Pickles to a call of ``os.system``: what a hostile update file in a run directory would hold."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (self.command,))


@pytest.mark.timeout(180)
def test_an_update_file_that_would_run_code_is_never_unpickled_and_its_client_trains_again(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write(tmp_path, bad_update_config(tmp_path, "shape"))
    run = tmp_path / "run"
    ran = tmp_path / "code-ran"
    with caplog.at_level("WARNING", logger="fedsup"):
        assert cli_main(["run", str(path)]) == 2  # round 1 ends short: clients 0 and 2 finished, updates kept
        update = run / "updates" / "round-1" / "client-0.pt"
        assert update.exists() and record(run, "round-1.client-0").ok
        torch.save({"w": _RunsCode(f"touch {ran}")}, update)
        (tmp_path / "fixed").touch()
        assert cli_main(["run", str(path), "--resume"]) == 0
    assert not ran.exists(), "the run directory's update file was unpickled as code"
    damaged = [m for m in caplog.messages if m.startswith(f"{update} is damaged or missing (")]
    assert len(damaged) == 1 and "GLOBAL posix.system" in damaged[0], caplog.messages  # one line, the cause
    assert damaged[0].endswith("; round-1.client-0 trains again")
    assert not [m for m in caplog.messages if "parked process" in m], caplog.messages  # fedsup ended those
    assert record(run, "round-1.client-0").ok
    final = torch.load(run / "checkpoints" / "final.pt", weights_only=True)
    weights = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    assert torch.equal(final["w"], torch.full((4,), float((torch.tensor([200.0, 201, 202], dtype=torch.float64)
                                                           * weights).sum() / weights.sum())))
    # the file was live: an unrestricted load runs the command
    live = tmp_path / "live.pt"
    torch.save({"w": _RunsCode(f"touch {ran}")}, live)
    torch.load(live, weights_only=False)
    assert ran.exists()


@pytest.mark.timeout(180)
def test_nan_in_one_update_fails_that_client_alone_unless_switched_off(tmp_path: Path) -> None:
    summary = fedsup.run(bad_update_config(tmp_path, "nan", rounds=1, min_clients=2))
    run = tmp_path / "run"
    assert summary["status"] == "finished"
    broken = record(run, "round-1.client-1")
    assert broken.status is fedsup.TaskStatus.FAILED and broken.attempts == 1
    assert broken.error is not None and broken.error.kind == "contract"
    assert "client-1's update breaks the federated contract: key 'w' (shape [4]) holds 1 NaN" in broken.error.message
    final = torch.load(run / "checkpoints" / "final.pt", weights_only=True)
    assert torch.equal(final["w"], torch.full((4,), (100.0 * 1 + 102.0 * 3) / 4))  # clients 0 and 2 only
    rounds = [json.loads(line) for line in (run / "rounds.jsonl").read_text().splitlines()]
    assert rounds[0]["failed"] == ["round-1.client-1"]
    # federation.reject_nonfinite: false lets it through (and the model is NaN, as asked)
    accepting = bad_update_config(tmp_path, "nan", rounds=1, min_clients=2, reject_nonfinite=False)
    fedsup.run({**accepting, "output": str(tmp_path / "accepting")})
    assert torch.isnan(torch.load(tmp_path / "accepting" / "checkpoints" / "final.pt", weights_only=True)["w"]).any()


@pytest.mark.timeout(120)
def test_a_bad_update_is_caught_in_its_process_before_the_job_is_recorded_finished(tmp_path: Path) -> None:
    fedsup.run(bad_update_config(tmp_path, "inf", rounds=1, min_clients=2))
    run = tmp_path / "run"
    statuses = [e["status"] for e in events(run) if e.get("task") == "round-1.client-1"]
    assert "FINISHED" not in statuses, ("recorded FINISHED before its update was checked: fedsup/engine/worker.py "
                                        "must call fedsup.engine.contract.check_update", statuses)
    broken = record(run, "round-1.client-1")
    assert broken.error is not None and broken.error.kind == "contract" and broken.error.phase == "train"
    assert "holds 0 NaN and 2 Inf" in broken.error.message


# ---------------------------------------------------------------- the root cause of a failed run


@pytest.mark.timeout(120)
def test_a_failed_run_says_why_on_the_terminal_and_in_status(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    data = config(tmp_path, task={"class": "fed_toys:FailingClient", "args": {"failing": [1, 2, 3, 4, 5]}},
                  federation={"clients": 6, "rounds": 1, "min_clients": 2})
    assert cli_main(["run", str(write(tmp_path, data))]) == 1
    err = capsys.readouterr().err
    run = tmp_path / "run"
    assert ("fedsup: error: round 1: 1 client(s) finished, fewer than min_clients=2; 5 failed: "
            "round-1.client-1: ValueError: client 1 always fails; round-1.client-2: ValueError: client 2 always "
            "fails; round-1.client-3: ValueError: client 3 always fails; and 2 more (fedsup status "
            f"{run} lists them)") in err, err
    assert "WARNING" not in err, err  # nothing about the processes fedsup itself ended
    assert cli_main(["status", str(run)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("run guards: failed (from summary.json)")
    for client in (1, 2, 3, 4, 5):
        assert f"failed: round-1.client-{client} (1 attempt(s)): ValueError: client {client} always fails" in out
    assert cli_main(["status", str(run), "--json"]) == 0
    failures = json.loads(capsys.readouterr().out)["failures"]
    assert [f["error"] for f in failures] == [
        {"kind": "exception", "type": "ValueError", "message": f"client {c} always fails"} for c in (1, 2, 3, 4, 5)]


def test_a_run_failing_after_a_round_warns_of_no_process_fedsup_ended(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    # round 1 leaves every client's process parked; round 2 fails and the teardown ends them all
    data = config(tmp_path, task={"class": "fed_toys:FailingClient",
                                  "args": {"failing": [1, 2, 3, 4, 5], "from_round": 2}},
                  federation={"clients": 6, "rounds": 2, "min_clients": 2})
    assert cli_main(["run", str(write(tmp_path, data))]) == 1
    err = capsys.readouterr().err
    assert "round 2: 1 client(s) finished, fewer than min_clients=2" in err, err
    assert "WARNING" not in err, err


# ---------------------------------------------------------------- task folders


HOSTILE_IDS = ["a/b", "a_b-3ec69c85",  # the pair that shared a folder: "a_b-3ec69c85" was "a/b"'s hashed name
               safe_name("a/b"), "a_b", "a b", "a+b", ".", "..", "x" * 81, "x" * 80, "../up", "\udcff", "é"]


def test_folder_names_never_collide() -> None:
    names = [safe_name(task_id) for task_id in HOSTILE_IDS]
    assert len(set(names)) == len(names), names
    assert all("/" not in n and n not in (".", "..", "") and len(n) < 200 for n in names)
    assert safe_name("round-1.client-3") == "round-1.client-3"  # plain ids keep their own names


@pytest.mark.timeout(120)
def test_task_folders_never_collide_in_a_real_run(tmp_path: Path) -> None:
    import toys

    # a lone surrogate has no UTF-8, so no record.json can hold it; dict.fromkeys: one task per id, on any scheme
    ids = list(dict.fromkeys(i for i in HOSTILE_IDS if i != "\udcff"))
    records = fedsup.Supervisor(devices="cpu", run_dir=tmp_path / "run", max_retries=0).run(
        [toys.Ok(task_id=i) for i in ids])
    assert all(r.ok for r in records), [(r.task_id, r.error) for r in records]
    folders = sorted((tmp_path / "run" / "tasks").iterdir())
    assert len(folders) == len(ids)
    stored = {fedsup.TaskRecord.model_validate_json((f / "record.json").read_bytes()).task_id for f in folders}
    assert stored == set(ids)
    assert len({r.result["cwd"] for r in records}) == len(ids)  # each ran in its own folder
