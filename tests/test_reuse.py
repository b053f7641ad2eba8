"""tasks_per_process: a process that finished a task may load the next one, up to a limit; never after a
failure; each task still gets its own folder and logs."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest

import fedsup


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
def test_one_process_per_task_is_the_default(tmp_path: Path) -> None:
    records = fedsup.Supervisor(devices="cpu", max_loaded=1).run([Echo(f"t{i}") for i in range(3)])
    assert len({r.result["pid"] for r in records}) == 3
