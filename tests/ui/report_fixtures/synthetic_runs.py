"""Hand-written run directories for the report tests: a small federated run and a large one-shot run.

They are written the way fedsup writes a run directory (events.jsonl, tasks/<task>/record.json) plus the
files a federated runner adds (rounds.jsonl, summary.json, config.yaml), with fixed timestamps and seeds.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedsup.engine.records import AttemptRecord, ErrorInfo, PhaseRecord, TaskRecord
from fedsup.engine.rundir import safe_name
from fedsup.engine.states import TaskStatus

T0 = 1_700_000_000.0
MiB = 1024**2
TRICKY = 'client<5>&"x"'   # a task id that must be escaped everywhere it is shown
FAILED_CLIENT = "client-4"
OOM_CLIENT = "client-2"


@dataclass
class Log:
    """Events and per-attempt records of one task, built up as its story is told."""

    task: str
    events: list[dict[str, Any]] = field(default_factory=list)
    history: list[AttemptRecord] = field(default_factory=list)
    status: str = "INIT"

    def go(self, when: float, status: str, **info: Any) -> None:
        attempt = len(self.history)
        self.events.append({"time": round(when, 6), "task": self.task, "attempt": attempt, "status": status,
                            "previous": self.status, "pid": 1000 + attempt, **info})
        self.status = status

    def load(self, start: float, spawn: float, duration: float, memory: int) -> None:
        self.history.append(AttemptRecord(attempt=len(self.history) + 1, status=TaskStatus.AVAILABLE,
                                          started=start))
        self.go(start, "AVAILABLE")
        self.go(start, "LOADING")
        phase = PhaseRecord(phase="load", started=start + spawn, duration=duration, cpu_time=duration * 0.9,
                            peak_memory=memory)
        self.history[-1].load = phase
        self.go(start + spawn + duration, "WAITING")

    def train(self, start: float, duration: float, device: str, memory: int, gpu: int | None,
              error: ErrorInfo | None = None, status: str = "EXCEPTION") -> None:
        self.go(start, "TRAINING", device=device)
        attempt = self.history[-1]
        attempt.device = device
        attempt.train = PhaseRecord(phase="train", device=device, started=start, duration=duration,
                                    cpu_time=duration * 0.95, peak_memory=memory, peak_gpu_memory=gpu)
        end = start + duration
        if error is None:
            attempt.status = TaskStatus.FINISHED
            attempt.ended = end
            self.go(end, "FINISHED", device=device)
            return
        attempt.status, attempt.ended, attempt.error = TaskStatus(status), end, error
        self.go(end, status, kind=error.kind, error=error.summary())

    def record(self, status: str, error: ErrorInfo | None = None) -> TaskRecord:
        phases = [p for a in self.history for p in (a.load, a.train) if p is not None]
        last = self.history[-1]
        return TaskRecord(
            task_id=self.task, status=TaskStatus(status), attempts=len(self.history), device=last.device,
            error=error, duration=(last.ended or last.started) - self.history[0].started,
            cpu_time=sum(p.cpu_time for p in phases),
            peak_memory=max(p.peak_memory or 0 for p in phases),
            peak_gpu_memory=max((p.peak_gpu_memory for p in phases if p.peak_gpu_memory is not None), default=None),
            estimate_memory=400 * MiB, load=last.load, train=last.train, history=list(self.history))


def _write(run_dir: Path, logs: list[Log], records: list[TaskRecord], run_events: list[dict[str, Any]]) -> None:
    events = sorted([e for log in logs for e in log.events] + run_events, key=lambda e: e["time"])
    (run_dir / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    for record in records:
        path = run_dir / "tasks" / safe_name(record.task_id) / "record.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(record.model_dump_json(indent=2))


# ---------------------------------------------------------------- a federated run

OOM = ErrorInfo(kind="cuda_oom", type="torch.OutOfMemoryError",
                message="CUDA out of memory. Tried to allocate 2.00 GiB <on> cuda:0", phase="train")
CRASH = ErrorInfo(kind="crash", type="ProcessCrashed", phase="train",
                  message="the process crashed with a segmentation fault (SIGSEGV) during train(): a bug in "
                          "native code")


def write_federated_run(run_dir: Path, rounds: int = 5, clients: int = 6) -> Path:
    """Six clients on two GPUs for five rounds: one OOMs once and is retried, one crashes twice and fails."""
    run_dir.mkdir(parents=True, exist_ok=True)
    names = [f"client-{i}" for i in range(clients - 1)] + [TRICKY]
    logs = {name: Log(name) for name in names}
    rng = random.Random(7)
    for i, name in enumerate(names):
        logs[name].load(T0 + 0.2 * i, 0.4, 1.0 + 0.3 * i, (300 + 40 * i) * MiB)
    run_events: list[dict[str, Any]] = [{"time": T0, "event": "run_started", "rounds": rounds}]
    rows, t = [], T0 + 3.5
    for r in range(1, rounds + 1):
        row, t = _round(r, t, logs, rng)
        rows.append(row)
        run_events += [{"time": row["started"], "event": "round_started", "round": r},
                       {"time": row["ended"], "event": "round_finished", "round": r}]
    for log in logs.values():
        if log.status == "FINISHED":
            log.go(t + 0.1, "EXITED")
    run_events.append({"time": t + 0.2, "event": "run_finished", "status": "finished"})
    records = [log.record("FAILED" if log.task == FAILED_CLIENT else "FINISHED",
                          CRASH if log.task == FAILED_CLIENT else None) for log in logs.values()]
    _write(run_dir, list(logs.values()), records, run_events)
    with open(run_dir / "events.jsonl", "a") as f:
        f.write('{"time": %f, "task": "client-0", "attempt": 1, "sta' % (t + 0.3))  # killed mid-write
    (run_dir / "rounds.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    _write_summary(run_dir, rows, records, t + 0.2)
    (run_dir / "config.yaml").write_text("name: fed-demo\nrounds: 5\nclients: 6\nnote: <script>alert(1)</script>\n")
    return run_dir


def _round(r: int, start: float, logs: dict[str, Log], rng: random.Random) -> tuple[dict[str, Any], float]:
    finished: list[str] = []
    failed: list[str] = []
    retried: list[str] = []
    end = start
    for i, log in enumerate(logs.values()):
        if log.status not in ("WAITING", "FINISHED"):
            continue
        device = f"cuda:{i % 2}"
        begin = start + 0.15 * i
        duration = 2.0 + rng.random() * 2.0
        memory, gpu = (500 + 60 * i) * MiB, (1200 + 300 * i + 50 * r) * MiB
        if log.task == OOM_CLIENT and r == 2:
            log.train(begin, 1.2, device, memory, gpu, OOM, "INTERRUPT")
            log.go(begin + 1.2, "INIT", retry=2)
            log.load(begin + 1.3, 0.3, 0.8, memory)
            begin, retried = begin + 2.5, retried + [log.task]
        if log.task == FAILED_CLIENT and r >= 3:
            log.train(begin, 1.5, device, memory, gpu, CRASH, "CRASHED")
            failed.append(log.task)
            if r == 3:
                log.go(begin + 1.5, "INIT", retry=2)
                log.load(begin + 1.6, 0.3, 0.9, memory)
                retried.append(log.task)
            else:
                log.go(begin + 1.5, "FAILED", reason="failed 2 times (max_retries=1)")
            end = max(end, begin + 2.9)
            continue
        log.train(begin, duration, device, memory, gpu)
        finished.append(log.task)
        end = max(end, begin + duration)
    selected = finished + failed
    row = {"round": r, "started": start, "ended": end, "duration": end - start, "selected": selected,
           "finished": finished, "failed": failed, "retried": retried,
           "train_metrics": {"loss": round(2.3 * 0.62**r, 4), "accuracy": round(0.35 + 0.11 * r, 4)},
           "eval_metrics": {"loss": round(2.4 * 0.66**r, 4), "accuracy": round(0.3 + 0.12 * r, 4)},
           "num_examples": 2000 * len(finished)}
    return row, end + 0.5


def _write_summary(run_dir: Path, rows: list[dict[str, Any]], records: list[TaskRecord], ended: float) -> None:
    summary = {"name": "fed-demo <b>bold</b>", "status": "finished", "rounds": len(rows),
               "rounds_completed": len(rows), "final_metrics": rows[-1]["eval_metrics"],
               "totals": {"tasks": len(records), "attempts": sum(r.attempts for r in records),
                          "failed": sum(1 for r in records if r.status is TaskStatus.FAILED),
                          "cpu_time": sum(r.cpu_time for r in records), "duration": ended - T0},
               "started": T0, "ended": ended}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))


# ---------------------------------------------------------------- a large run

def write_large_run(run_dir: Path, tasks: int = 1000, gpus: int = 8, slots: int = 4, seed: int = 3) -> Path:
    """``tasks`` one-shot tasks on ``gpus`` GPUs, ``slots`` at a time on each; a few retried, a few failed."""
    run_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    free = [(T0, g, s) for g in range(gpus) for s in range(slots)]
    logs, records = [], []
    for i in range(tasks):
        log = Log(f"task-{i:04d}")
        tries = 2 if i % 23 == 0 else 1
        ready = T0
        for attempt in range(tries):
            free.sort()
            slot_free, g, s = free.pop(0)
            start = max(slot_free, ready)
            load, train = 0.5 + rng.random() * 1.5, 2.0 + rng.random() * 8.0
            memory, gpu = int(rng.lognormvariate(19.5, 0.4)), int(rng.lognormvariate(21.5, 0.5))
            log.load(start, 0.05, load, memory)
            fail = (attempt == 0 and tries == 2) or i % 97 == 5
            log.train(start + 0.05 + load, train, f"cuda:{g}", memory, gpu, OOM if fail else None, "INTERRUPT")
            ready = start + 0.05 + load + train + 0.05
            free.append((ready, g, s))
            if fail and attempt + 1 < tries:
                log.go(start + load + train + 0.05, "INIT", retry=2)
        status = "FAILED" if log.status == "INTERRUPT" else "FINISHED"
        if status == "FAILED":
            log.go(log.events[-1]["time"], "FAILED", reason="out of memory 2 times (max_interrupts=1)")
        logs.append(log)
        records.append(log.record(status, OOM if status == "FAILED" else None))
    _write(run_dir, logs, records, [])
    return run_dir


def write_long_federated_run(run_dir: Path, clients: int = 1000, rounds: int = 30, gpus: int = 8) -> Path:
    """Only an event log and rounds.jsonl: ``clients`` clients that each train once in each of ``rounds``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(11)
    logs = [Log(f"c{i:04d}") for i in range(clients)]
    for i, log in enumerate(logs):
        log.history.append(AttemptRecord(attempt=1, status=TaskStatus.AVAILABLE, started=T0))
        log.go(T0 + i * 0.001, "AVAILABLE")
        log.go(T0 + i * 0.001, "LOADING")
        log.go(T0 + 1 + rng.random(), "WAITING")
    rows, start = [], T0 + 3.0
    for r in range(1, rounds + 1):
        end = start
        for i, log in enumerate(logs):
            begin = start + (i % 50) * 0.05
            finish = begin + 1.0 + rng.random()
            log.go(begin, "TRAINING", device=f"cuda:{i % gpus}")
            log.go(finish, "FINISHED", device=f"cuda:{i % gpus}")
            end = max(end, finish)
        rows.append({"round": r, "started": start, "ended": end, "duration": end - start,
                     "train_metrics": {"loss": 2.0 / r}, "eval_metrics": {"accuracy": 1 - 1 / (r + 1)}})
        start = end + 0.2
    events = sorted((e for log in logs for e in log.events), key=lambda e: e["time"])
    (run_dir / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    (run_dir / "rounds.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return run_dir
