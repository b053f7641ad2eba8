"""Grouped records (records/<group>.jsonl, what a federated run writes): written a line at a time, a torn
line from a kill skipped and closed off, the older layout's record files still found, and empty logs
removed when the run closes."""

from __future__ import annotations

from pathlib import Path

from fedsup.engine.records import TaskRecord
from fedsup.engine.rundir import RunDir, read_record_lines, read_records
from fedsup.engine.states import TaskStatus


def record(task_id: str, status: TaskStatus = TaskStatus.FINISHED, attempts: int = 1) -> TaskRecord:
    return TaskRecord(task_id=task_id, status=status, attempts=attempts, cpu_time=0.5)


def test_records_of_a_group_are_lines_of_one_file_and_the_last_of_a_task_counts(tmp_path: Path) -> None:
    run_dir = RunDir(tmp_path)
    run_dir.use_records("round-1")
    run_dir.write_record(record("round-1.client-0"))
    run_dir.write_record(record("round-1.client-1"))
    run_dir.write_record(record("round-1.client-1", TaskStatus.FAILED, 2))  # e.g. an update found broken
    run_dir.use_records("round-2")
    run_dir.write_record(record("round-2.client-0"))
    assert run_dir.read_record("round-1.client-0") is None  # another round's: not this group's
    run_dir.close()
    assert sorted(p.name for p in (tmp_path / "records").iterdir()) == ["round-1.jsonl", "round-2.jsonl"]
    assert not (tmp_path / "tasks").exists()  # no folder per job, and none left empty
    found, bad = read_record_lines(tmp_path / "records" / "round-1.jsonl")
    assert bad == 0 and found["round-1.client-1"].status is TaskStatus.FAILED and len(found) == 2
    assert sorted(r.task_id for r in read_records(tmp_path)) == ["round-1.client-0", "round-1.client-1",
                                                                  "round-2.client-0"]


def test_a_torn_line_is_a_record_never_written_and_the_next_starts_a_line_of_its_own(tmp_path: Path) -> None:
    run_dir = RunDir(tmp_path)
    run_dir.use_records("round-3")
    run_dir.write_record(record("round-3.client-0"))
    run_dir.close()
    path = tmp_path / "records" / "round-3.jsonl"
    with open(path, "a") as f:  # a supervisor killed in the middle of the next record
        f.write(record("round-3.client-1").model_dump_json()[:40])
    again = RunDir(tmp_path)
    again.use_records("round-3")
    assert again.read_record("round-3.client-1") is None  # so that job runs again
    assert again.read_record("round-3.client-0") is not None
    again.write_record(record("round-3.client-2"))
    again.close()
    found, bad = read_record_lines(path)
    assert sorted(found) == ["round-3.client-0", "round-3.client-2"] and bad == 1


def test_the_older_layouts_record_files_are_still_found(tmp_path: Path) -> None:
    folder = tmp_path / "tasks" / "round-4.client-7"
    folder.mkdir(parents=True)
    (folder / "record.json").write_text(record("round-4.client-7").model_dump_json(indent=2))
    run_dir = RunDir(tmp_path)
    run_dir.use_records("round-4")
    found = run_dir.read_record("round-4.client-7")
    assert found is not None and found.ok
    run_dir.close()
    assert (folder / "record.json").exists()  # a folder that holds a record is never removed


def test_only_logs_a_task_wrote_to_are_kept(tmp_path: Path) -> None:
    for name, text in (("client-0", ""), ("client-1", "hello\n"), ("client-2", "")):
        (tmp_path / "tasks" / name).mkdir(parents=True)
        (tmp_path / "tasks" / name / "stdout.log").write_text(text)
        (tmp_path / "tasks" / name / "stderr.log").write_text("")
    (tmp_path / "tasks" / "client-2" / "weights.bin").write_bytes(b"x")  # the task's own output, in its folder
    run_dir = RunDir(tmp_path)
    run_dir.use_records("round-1")
    run_dir.close()
    assert sorted(p.name for p in (tmp_path / "tasks").iterdir()) == ["client-1", "client-2"]
    assert sorted(p.name for p in (tmp_path / "tasks" / "client-1").iterdir()) == ["stdout.log"]
    assert sorted(p.name for p in (tmp_path / "tasks" / "client-2").iterdir()) == ["weights.bin"]
    plain = tmp_path / "plain"
    (plain / "tasks" / "t").mkdir(parents=True)
    (plain / "tasks" / "t" / "stdout.log").write_text("")
    RunDir(plain).close()  # a plain run (no groups) keeps its layout as it was
    assert (plain / "tasks" / "t" / "stdout.log").exists()
