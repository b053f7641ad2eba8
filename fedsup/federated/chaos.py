"""Tools to prove a run loses nothing: an outside killer of task processes, and checks of what a run left.

Used by the reliability tests and ``bench/soak.py``; useful to anyone who wants to try their own clients
under fire.
"""

from __future__ import annotations

import json
import random
import signal
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import psutil
import torch


class Killer(threading.Thread):
    """SIGKILLs random task processes of a running supervisor on a seeded schedule, as the kernel's OOM
    killer or a careless operator would. With ``servers``, the fork server is among the targets too (after
    half the kills), which takes down every task process it holds at once."""

    def __init__(self, supervisor_pid: int, kills: int, seed: int = 0, servers: bool = True,
                 pause: tuple[float, float] = (0.3, 1.2)) -> None:
        super().__init__(daemon=True, name="fedsup-killer")
        self.supervisor = psutil.Process(supervisor_pid)
        self.kills, self.servers, self.pause = kills, servers, pause
        self.rng = random.Random(seed)
        self.stopped = threading.Event()
        self.killed: list[str] = []

    def stop(self) -> None:
        self.stopped.set()
        self.join()

    def run(self) -> None:
        server_killed = not self.servers
        while len(self.killed) < self.kills and not self.stopped.wait(self.rng.uniform(*self.pause)):
            try:
                servers = self.supervisor.children()
                tasks = [p for s in servers for p in s.children()]
            except psutil.NoSuchProcess:
                return
            targets = tasks if (server_killed or len(self.killed) < self.kills // 2) else servers
            if not targets:
                continue
            victim = self.rng.choice(targets)
            try:
                victim.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                continue
            hit_server = victim in servers
            server_killed = server_killed or hit_server
            self.killed.append("server" if hit_server else "task")


def read_events(run_dir: Path) -> list[dict[str, Any]]:
    """events.jsonl, skipping the torn lines that killed writers leave."""
    out = []
    for line in (run_dir / "events.jsonl").read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def finished_twice(run_dir: Path) -> list[str]:
    """Tasks that reached FINISHED more than once: work done twice (never expected). A speculative copy's
    FINISHED is the same work's race, not a second run of it."""
    counts = Counter(e["task"] for e in read_events(run_dir)
                     if e.get("status") == "FINISHED" and not e.get("speculative"))
    return sorted(task for task, n in counts.items() if n > 1)


def differing_checkpoints(a: Path, b: Path) -> list[str]:
    """Names of the checkpoints that differ (or exist in one run only), compared bit for bit."""
    names = sorted({p.name for run in (a, b) for p in (run / "checkpoints").glob("*.pt")})
    differ = []
    for name in names:
        if not (a / "checkpoints" / name).exists() or not (b / "checkpoints" / name).exists():
            differ.append(name)
            continue
        x = torch.load(a / "checkpoints" / name, weights_only=True)
        y = torch.load(b / "checkpoints" / name, weights_only=True)
        if not _identical(x, y):
            differ.append(name)
    return differ


def _identical(x: Any, y: Any) -> bool:
    """Bit for bit: tensors by ``torch.equal`` (dtype too), dicts key by key (a strategy's state nests them)."""
    if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
        return isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.dtype == y.dtype and torch.equal(x, y)
    if isinstance(x, dict) or isinstance(y, dict):
        return isinstance(x, dict) and isinstance(y, dict) and x.keys() == y.keys() and all(
            _identical(x[k], y[k]) for k in x)
    return bool(x == y)


def fault_figures(run_dir: Path) -> dict[str, Any]:
    """What went wrong in a run and was recovered from: injected faults by kind, attempt endings by status."""
    events = read_events(run_dir)
    return {
        "faults_injected": dict(Counter(e["fault"] for e in events if e.get("fault"))),
        "attempt_endings": dict(Counter(e["status"] for e in events
                                        if e.get("status") in ("EXCEPTION", "INTERRUPT", "CRASHED", "TIMEOUT"))),
        "failed_tasks": sorted({e["task"] for e in events if e.get("status") == "FAILED"}),
        "finished_twice": finished_twice(run_dir),
    }
