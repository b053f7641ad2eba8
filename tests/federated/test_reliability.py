"""Reliability under faults: chaos (injected faults and an outside killer), SIGKILL of the main process at
random moments, host-memory limits, damaged run directories, and no listening sockets.

The fast subset runs here; `python bench/soak.py` is the full soak (docs/reliability.md)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml

import fedsup
import fedsup.engine.rundir
from fedsup.federated.chaos import Killer, differing_checkpoints, finished_twice, read_events
from fedsup.ui.cli import main as cli_main

TESTS = Path(__file__).resolve().parent.parent  # where the toy task modules are


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}


def synthetic(output: Path, clients: int = 40, rounds: int = 4, per_round: int = 10,
              faults: dict[str, Any] | None = None, **task_args: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "name": "chaos", "seed": 11,
        "task": {"class": "fedsup.examples.synthetic:SyntheticClient",
                 "args": {"samples": 300, "test_samples": 200, **task_args}},
        "federation": {"clients": clients, "rounds": rounds, "clients_per_round": per_round,
                       "min_clients": per_round},
        "supervisor": {"devices": "cpu", "max_loaded": 4, "max_retries": 4, "max_interrupts": 12,
                       "retry_backoff": 0.05, "timeouts": {"load": 20, "train": 3}},
        "output": str(output),
    }
    if faults is not None:
        data["faults"] = faults
    return data


def fedsup_run(config: dict[str, Any], path: Path, *extra: str) -> subprocess.Popen[bytes]:
    path.write_text(yaml.safe_dump(config))
    return subprocess.Popen([sys.executable, "-m", "fedsup", "run", str(path), *extra], env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same federated run with nothing going wrong: the model every faulted run must end with."""
    base = tmp_path_factory.mktemp("plain")
    started = time.monotonic()
    process = fedsup_run(synthetic(base / "run"), base / "plain.yaml")
    _, err = process.communicate(timeout=300)
    assert process.returncode == 0, err.decode()
    (base / "wall").write_text(str(time.monotonic() - started))  # how long a run takes on this machine now
    return base / "run"


@pytest.mark.timeout(600)
def test_chaos_every_round_completes_and_the_model_is_unchanged(tmp_path: Path, plain_run: Path) -> None:
    faults = {"probability": 0.3, "seed": 5, "kinds": ["exception", "exit", "sigkill", "cuda_oom", "hang"],
              "phases": ["load", "train"], "max_per_task": 1}
    process = fedsup_run(synthetic(tmp_path / "run", faults=faults), tmp_path / "chaos.yaml")
    # The kills come fast, so that they are over in the first rounds: hangs after them must time out (a
    # killer still at work in the last rounds could kill every hung process before its timeout, and a fork
    # server's kill takes every process it started, which with reused processes is most of the live ones).
    killer = Killer(process.pid, kills=10, seed=3, pause=(0.1, 0.4))
    killer.start()
    _, err = process.communicate(timeout=500)
    killer.stop()
    assert process.returncode == 0, err.decode()[-3000:]
    run = tmp_path / "run"
    rounds = [json.loads(line) for line in (run / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2, 3, 4]
    assert all(not r["failed"] and len(r["finished"]) == 10 for r in rounds)
    assert differing_checkpoints(plain_run, run) == []
    statuses = Counter(e.get("status") for e in read_events(run))
    injected = sum(1 for e in read_events(run) if e.get("fault"))
    assert injected >= 10 and statuses["TIMEOUT"] >= 1 and statuses["CRASHED"] >= 1
    assert statuses["INTERRUPT"] >= 1 and statuses["EXCEPTION"] >= 1
    assert len(killer.killed) >= 5 and "server" in killer.killed
    assert not finished_twice(run)


@pytest.mark.timeout(900)
def test_main_process_killed_at_random_moments_then_resumed(tmp_path: Path, plain_run: Path) -> None:
    rng = random.Random(7)
    wall = float((plain_run.parent / "wall").read_text())
    config = synthetic(tmp_path / "run")
    run = tmp_path / "run"
    kills = 0

    def runs_started() -> int:
        return sum(1 for e in read_events(run) if e.get("event") == "run_started") if run.exists() else 0

    while True:
        # a run killed before it wrote anything holds nothing to resume (--resume says so): start it again
        process = fedsup_run(config, tmp_path / "run.yaml", *(["--resume"] if runs_started() else []))
        if kills >= 4:
            _, err = process.communicate(timeout=300)
            assert process.returncode == 0, err.decode()[-3000:]
            break
        try:
            # a random moment: while torch is imported, before the run has written anything, or during it
            # (an undisturbed run spends ~40% of its time starting); or the run ends first. Scaled by the
            # undisturbed run's wall time, so a loaded machine moves the kills with the run, not before it.
            process.wait(timeout=rng.uniform(0.3, 0.9) * wall)
        except subprocess.TimeoutExpired:
            family = psutil.Process(process.pid).children(recursive=True)
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=60)
            kills += 1
            _, alive = psutil.wait_procs(family, timeout=30)  # a deadlock detector: PDEATHSIG acts at once
            assert not alive, f"kill {kills}: workers outlived the supervisor: {alive}"
            continue
        assert process.returncode == 0
        break
    assert kills >= 2, "the run ended before the kills it is here to survive"
    assert differing_checkpoints(plain_run, run) == []
    assert not finished_twice(run)
    assert runs_started() >= 2  # at least one kill came after the run had begun, and it was resumed


class Hog(fedsup.Task):
    def __init__(self, task_id: str, mib: int) -> None:
        super().__init__(task_id, estimate_memory="128MiB")
        self.mib = mib

    def load(self) -> None:
        pass

    def train(self, device: str) -> dict[str, Any]:
        import numpy as np

        block = np.ones(self.mib * 2**20, dtype=np.uint8)
        return {"sum": int(block[:8].sum())}


@pytest.mark.timeout(120)
def test_memory_limits_interrupt_and_requeue_and_what_never_fits_fails(tmp_path: Path) -> None:
    records = fedsup.Supervisor(devices="cpu", enforce_memory=True, retry_backoff=0.01, run_dir=tmp_path).run(
        [Hog("fits", 16), Hog("grows", 400), Hog("never", 10**7)])
    fits, grows, never = records
    assert fits.ok and fits.attempts == 1
    assert grows.ok and grows.attempts >= 2 and grows.history[0].status is fedsup.TaskStatus.INTERRUPT
    assert grows.history[0].error.kind == "host_oom" and grows.estimate_memory > 400 * 2**20
    assert never.status is fedsup.TaskStatus.FAILED
    assert "needs more host memory than this machine can give a task" in never.reason


@pytest.mark.timeout(120)
def test_damaged_run_directories(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = synthetic(tmp_path / "run", clients=4, rounds=2, per_round=2)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    assert cli_main(["run", str(path)]) == 0
    run = tmp_path / "run"
    # a torn last line of events.jsonl (a writer killed mid-line) is survived, and stays the only bad line
    with open(run / "events.jsonl", "a") as f:
        f.write('{"time": 1, "task": "round-2.cli')
    assert cli_main(["status", str(run)]) == 0
    # a damaged task record is not trusted: that task would run again; the round's others are
    records = run / "records" / "round-2.jsonl"
    lines = records.read_text().splitlines()
    first, second = (json.loads(line)["task_id"] for line in lines[:2])
    records.write_text("\n".join(["{ damaged", *lines[1:]]) + "\n")
    run_dir = fedsup.engine.rundir.RunDir(run)
    run_dir.use_records("round-2")
    assert run_dir.read_record(first) is None and run_dir.read_record(second) is not None
    run_dir.close()
    # a corrupt checkpoint of a complete round is named, never used
    (run / "checkpoints" / "round-2.pt").write_bytes(b"not a checkpoint")
    capsys.readouterr()
    assert cli_main(["run", str(path), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "round-2.pt: cannot be read as a model checkpoint" in err and "Traceback" not in err
    # rounds.jsonl damaged in the middle is an error, not a guess
    lines = (run / "rounds.jsonl").read_text().splitlines()
    (run / "rounds.jsonl").write_text(lines[0][:20] + "\n" + lines[1] + "\n")
    assert cli_main(["run", str(path), "--resume"]) == 2
    assert "rounds.jsonl: line 1 is not JSON" in capsys.readouterr().err


def listening_inodes() -> set[str]:
    found = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A":  # LISTEN
                found.add(fields[9])
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[3], 16) & 0x10000:  # __SO_ACCEPTCON: a listening socket
            found.add(fields[6])
    return found


def socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


@pytest.mark.timeout(180)
def test_no_process_of_a_run_listens_on_a_socket(tmp_path: Path) -> None:
    fifo = str(tmp_path / "moment")
    os.mkfifo(fifo)
    config = synthetic(tmp_path / "run", clients=4, rounds=1, per_round=4)
    config["task"] = {"class": "fed_toys:SignallingClient",
                      "args": {"samples": 200, "fifo": fifo, "signal_round": 1, "signal_client": 2}}
    process = fedsup_run(config, tmp_path / "run.yaml")
    with open(fifo) as moment:
        moment.readline()  # a task is training: every kind of process of the run exists now
        tree = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
        listening = listening_inodes()
        for proc in tree:
            assert not socket_inodes(proc.pid) & listening, f"{proc.pid} {proc.cmdline()} listens on a socket"
    assert len(tree) >= 3
    _, err = process.communicate(timeout=120)
    assert process.returncode == 0, err.decode()


def test_yaml_with_python_tags_is_rejected(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "evil.yaml"
    marker = tmp_path / "pwned"
    path.write_text(f"name: !!python/object/apply:os.system ['touch {marker}']\n")
    assert cli_main(["validate", str(path)]) == 2
    assert "unsafe tags such as !!python/object are not allowed" in capsys.readouterr().err
    assert not marker.exists()
