"""tasks_per_process: a process that finished a task may load the next one, up to a limit; never after a
failure; each task still gets its own folder and logs. The default, "auto", reuses a process only after a
short task (under ``AUTO_REUSE_BELOW``), where a fresh process would cost a large share of the task."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from fakes import Behaviour, FakeRuntime, ok

import fedsup
from fedsup.engine.devices import Inventory
from fedsup.engine.scheduler import Policy, Scheduler
from fedsup.engine.supervisor import AUTO_REUSE_BELOW, process_reuse
from fedsup.engine.task import Task


class Echo(fedsup.Task):
    def __init__(self, task_id: str, fail: bool = False) -> None:
        super().__init__(task_id)
        self.fail = fail

    def load(self) -> None:
        print(f"loading {self.task_id}")

    def train(self, device: str) -> dict[str, Any]:
        import os

        if self.fail:
            raise ValueError(f"{self.task_id} fails")
        return {"pid": os.getpid(), "cwd": os.getcwd()}


@pytest.mark.timeout(120)
def test_processes_are_reused_up_to_the_limit_with_their_own_folders(tmp_path: Path) -> None:
    tasks = [Echo(f"t{i}") for i in range(9)]
    records = fedsup.Supervisor(devices="cpu", cpus=2, max_loaded=2, tasks_per_process=3,
                                run_dir=tmp_path).run(tasks)
    assert all(r.ok for r in records)
    uses = Counter(r.result["pid"] for r in records)
    assert max(uses.values()) <= 3 and len(uses) < 9, uses
    for r in records:
        folder = tmp_path / "tasks" / r.task_id
        assert r.result["cwd"] == str(folder)
        assert (folder / "stdout.log").read_text() == f"loading {r.task_id}\n"
        assert r.history[-1].pid == r.result["pid"]


@pytest.mark.timeout(120)
def test_a_process_is_not_reused_after_a_failure(tmp_path: Path) -> None:
    tasks = [Echo("bad", fail=True), *[Echo(f"t{i}") for i in range(4)]]
    records = fedsup.Supervisor(devices="cpu", cpus=1, max_loaded=1, max_retries=0, tasks_per_process=10,
                                run_dir=tmp_path).run(tasks)
    bad, *good = records
    assert bad.status is fedsup.TaskStatus.FAILED
    assert bad.history[0].pid not in {r.result["pid"] for r in good}
    assert len({r.result["pid"] for r in good}) == 1  # the healthy process serves the rest


@pytest.mark.timeout(120)
def test_one_process_per_task_on_request(tmp_path: Path) -> None:
    records = fedsup.Supervisor(devices="cpu", max_loaded=1, tasks_per_process=1).run(
        [Echo(f"t{i}") for i in range(3)])
    assert len({r.result["pid"] for r in records}) == 3


@pytest.mark.timeout(120)
def test_short_tasks_share_processes_by_default(tmp_path: Path) -> None:
    records = fedsup.Supervisor(devices="cpu", cpus=1, max_loaded=1, run_dir=tmp_path).run(
        [Echo(f"t{i}") for i in range(4)])
    assert all(r.ok for r in records)
    # the first may run in the cold server's process, the rest in one from the warm server
    assert len({r.result["pid"] for r in records}) <= 2
    for r in records:
        assert (tmp_path / "tasks" / r.task_id / "stdout.log").read_text() == f"loading {r.task_id}\n"


# ---------------------------------------------------------------- the "auto" rule, with a fake runtime


class T(Task):
    def load(self) -> None:  # pragma: no cover - the fake runtime plays the process
        pass

    def train(self, device: str) -> None:  # pragma: no cover
        return None


def _spawns(train_seconds: float, *, cold: bool = False, tasks: int = 4) -> int:
    """How many processes ``tasks`` tasks of ``train_seconds`` each took under "auto"."""
    runtime = FakeRuntime(default=Behaviour(load=ok(0.0), train=ok(train_seconds)))
    if cold:  # every process starts as the cold server's children do
        spawn = runtime.spawn

        def cold_spawn(spec: Any) -> Any:
            child = spawn(spec)
            child.warm = False
            return child

        runtime.spawn = cold_spawn  # type: ignore[method-assign]
    policy = Policy(max_loaded=1, **process_reuse("auto"))
    records = Scheduler(policy, Inventory([], cores=1), runtime).run([T(f"t{i}") for i in range(tasks)])
    assert all(r.ok for r in records)
    assert runtime.live() == []
    return sum(1 for e in runtime.log if e.action == "spawn")


def test_auto_reuses_after_short_tasks_only() -> None:
    assert _spawns(AUTO_REUSE_BELOW / 10) == 1
    assert _spawns(AUTO_REUSE_BELOW * 2) == 4


def test_auto_does_not_judge_a_cold_process_by_its_first_task() -> None:
    # a cold process's first task paid torch's first-use costs, which its next task will not: each cold
    # process takes a second long task, and is let go after that one
    assert _spawns(AUTO_REUSE_BELOW * 2, cold=True) == 2
    assert _spawns(AUTO_REUSE_BELOW / 10, cold=True) == 1


def test_tasks_per_process_values() -> None:
    assert process_reuse(1) == {"tasks_per_process": 1, "reuse_below": None}
    assert process_reuse(5) == {"tasks_per_process": 5, "reuse_below": None}
    with pytest.raises(ValueError, match="tasks_per_process"):
        fedsup.Supervisor(devices="cpu", tasks_per_process=0)
    with pytest.raises(ValueError, match="tasks_per_process"):
        fedsup.Supervisor(devices="cpu", tasks_per_process="always")  # type: ignore[arg-type]


class WarmingRuntime(FakeRuntime):
    """A runtime whose launcher has one process to give at once; every other would wait for a warm-up."""

    def can_spawn(self, one_off: bool) -> bool:
        return not any(e.action == "spawn" for e in self.log)


def test_a_task_waits_for_a_parked_process_rather_than_a_warming_server() -> None:
    runtime = WarmingRuntime(default=Behaviour(load=ok(0.0), train=ok(AUTO_REUSE_BELOW / 10)))
    policy = Policy(max_loaded=4, **process_reuse("auto"))
    records = Scheduler(policy, Inventory([], cores=4), runtime).run([T(f"t{i}") for i in range(6)])
    assert all(r.ok for r in records)
    assert sum(1 for e in runtime.log if e.action == "spawn") == 1  # the one process took every task in turn
    assert runtime.live() == []
