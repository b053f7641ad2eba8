"""Speculative copies of stragglers (``Supervisor(speculative={"after": 2.0})``), through real processes."""

from __future__ import annotations

from pathlib import Path

import pytest
import toys

from fedsup import Supervisor, TaskStatus

S = TaskStatus


def _run(tasks: list, tmp_path: Path | None = None) -> dict:
    supervisor = Supervisor("cpu", cpus=4, max_loaded=8, max_retries=0, speculative={"after": 2.0},
                            run_dir=tmp_path)
    return {r.task_id: r for r in supervisor.run(tasks)}


@pytest.mark.timeout(120)
def test_a_straggler_s_copy_finishes_first_and_the_straggler_is_ended(tmp_path: Path) -> None:
    quick = [toys.Straggler(f"quick-{i}", str(tmp_path), 0.1, 0.1, idempotent=True) for i in range(4)]
    slow = toys.Straggler("slow", str(tmp_path), 60.0, 0.1, idempotent=True)
    records = _run([*quick, slow], tmp_path / "run")
    record = records["slow"]
    assert record.status is S.FINISHED, record.error
    original, copy = record.history
    assert (original.attempt, copy.attempt) == (1, 2)
    assert original.status is S.CANCELLED and original.error.kind == "superseded"
    assert "its speculative copy finished first" in original.error.message
    assert copy.status is S.FINISHED and record.result["pid"] == copy.pid != original.pid
    assert record.train == copy.train and record.attempts == 2
    assert all(r.attempts == 1 for r in (records[t.task_id] for t in quick)), "no copy of a task that was on time"
    assert (tmp_path / "run" / "tasks" / "slow.speculative").is_dir(), "the copy works in a folder of its own"


@pytest.mark.timeout(120)
def test_when_the_original_finishes_first_its_copy_is_ended(tmp_path: Path) -> None:
    quick = [toys.Straggler(f"quick-{i}", str(tmp_path), 0.1, 0.1, idempotent=True) for i in range(4)]
    slow = toys.Straggler("slow", str(tmp_path), 1.5, 60.0, idempotent=True)
    record = _run([*quick, slow])["slow"]
    assert record.status is S.FINISHED, record.error
    original, copy = record.history
    assert original.status is S.FINISHED and record.result["pid"] == original.pid
    assert copy.status is S.CANCELLED and copy.error.kind == "superseded"
    assert "its original finished first" in copy.error.message
    assert record.train == original.train


@pytest.mark.timeout(120)
def test_a_task_that_is_not_idempotent_is_never_copied(tmp_path: Path) -> None:
    quick = [toys.Straggler(f"quick-{i}", str(tmp_path), 0.1, 0.1) for i in range(4)]
    slow = toys.Straggler("slow", str(tmp_path), 1.5, 0.1)  # plain tasks are not idempotent unless they say so
    record = _run([*quick, slow])["slow"]
    assert record.status is S.FINISHED and record.attempts == 1


@pytest.mark.parametrize("speculative, message", [
    ({"after": 0}, "speculative.after: expected a number > 0"),
    ({"afer": 2.0}, "speculative: expected"),
])
def test_bad_speculative_options_are_refused(speculative: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Supervisor("cpu", speculative=speculative)
