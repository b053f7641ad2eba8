"""Concurrency limits by label (``Task(labels=...)``, ``Supervisor(limits=...)``), through real processes."""

from __future__ import annotations

import pytest
import toys
from fakes import max_overlap

from fedsup import ConfigError, Supervisor, TaskRecord, TaskStatus


def _held(record: TaskRecord) -> tuple[float, float]:
    """From the start of its load to the end of its training: the time a task counts against its labels."""
    assert record.load is not None and record.train is not None
    return record.load.started, record.train.started + record.train.duration


def test_a_label_limit_is_never_exceeded_and_holds_up_no_other_task() -> None:
    downloads = [toys.Timed(f"download-{i}", 0.3, labels=["download"]) for i in range(10)]
    others = [toys.Timed(f"other-{i}", 0.3) for i in range(10)]
    tasks = [t for pair in zip(downloads, others, strict=True) for t in pair]
    records = Supervisor("cpu", cpus=8, max_loaded=8, limits={"download": 2}, tasks_per_process=1).run(tasks)
    assert all(r.status is TaskStatus.FINISHED for r in records), [r.error for r in records]
    labelled = [_held(r) for r in records if r.task_id.startswith("download")]
    assert max_overlap(labelled) == 2, "at the limit, never past it"
    assert max_overlap(_held(r) for r in records if r.task_id.startswith("other")) > 2, "the others are not capped"
    first_other_done = min(e for s, e in (_held(r) for r in records if r.task_id.startswith("other")))
    last_download_start = max(s for s, _ in labelled)
    assert first_other_done < last_download_start, "tasks behind a capped one were not held up behind it"


def test_a_limit_on_a_label_no_task_holds_is_an_error_before_anything_starts() -> None:
    with pytest.raises(ConfigError, match=r"limits: 'downlaod' is held by no task \(the tasks' labels: download\)"):
        Supervisor("cpu", limits={"downlaod": 2}).run([toys.Ok("a", labels=["download"])])


@pytest.mark.parametrize("limits, message", [
    ({"download": 0}, r"limits\['download'\]: expected a whole number >= 1, got 0"),
    ([("download", 2)], "limits: expected a mapping of label to count"),
])
def test_bad_limits_are_refused(limits: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Supervisor("cpu", limits=limits)  # type: ignore[arg-type]


def test_labels_must_be_names() -> None:
    with pytest.raises(ValueError, match="labels: expected a list of non-empty names"):
        toys.Ok("a", labels="download")
