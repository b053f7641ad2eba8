"""fedflow's API on the fedsup engine (``fedsup.compat.fedflow``), through real task processes on the CPU."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fedflow_toys as toys
import pytest

import fedsup
from fedsup.compat import fedflow
from fedsup.compat.fedflow import Config, FedFlow, Task, TaskGroup, TaskStatus


@pytest.fixture(autouse=True)
def session(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A workdir of the test's own, on the CPU, and fedflow's class-level state as a fresh import leaves it."""
    monkeypatch.chdir(tmp_path)  # FedFlow.start() leaves the process in the workdir, as fedflow did
    workdir = tmp_path / "res"
    Config.set_config({"workdir": str(workdir), "fedsup": {"devices": "cpu", "retry_backoff": 0}})
    FedFlow.groups.clear()
    TaskGroup.global_ids.clear()
    monkeypatch.setattr(fedflow, "_WARNED", set())
    yield workdir
    Config.set_config({})
    Config.load()
    FedFlow.groups.clear()


def direct_main(rounds: int, clients: int) -> tuple[list[list[dict[str, Any]]], list[dict[str, Any]]]:
    """``fedflow_main``'s work, written for fedsup directly: the trained results and each round's average."""
    trained, averages = [], []
    init = None
    for _ in range(rounds):
        records = fedsup.Supervisor("cpu").run([toys.DirectTrain(f"client-{i}", i, init) for i in range(clients)])
        results = [record.result for record in records]
        init = fedsup.Supervisor("cpu").run([toys.DirectAggregate("aggregate", results)])[0].result
        trained.append(results)
        averages.append(init)
    return trained, averages


def test_fedflow_script_gives_fedsup_results(session: Path) -> None:
    aggregates = toys.fedflow_main(rounds=2, clients=2)
    trained, averages = direct_main(rounds=2, clients=2)

    assert [a.status for a in aggregates] == [TaskStatus.FINISHED] * 2
    assert [a.result for a in aggregates] == averages  # exactly: the same floats
    for aggregate, results in zip(aggregates, trained, strict=True):
        assert [t.result for t in aggregate.tasks] == results
        assert all(t.status is TaskStatus.FINISHED and t.fedsup_record.attempts == 1 for t in aggregate.tasks)
    assert averages[1] != averages[0]  # round 2 trained from round 1's average
    # each group's directory is a fedsup run directory, each task working in its own folder of it
    first = aggregates[0].tasks[0]
    assert first.workdir == str((session / "train-1" / "tasks" / "0").resolve())
    assert (Path(first.workdir) / "weights.json").is_file()
    assert (Path(first.workdir) / "record.json").is_file()
    assert (session / "aggregate-2" / "events.jsonl").is_file()
    assert os.getcwd() == str(session)  # start() stays in the workdir, as fedflow's did
    assert FedFlow.groups == []


def test_context_manager_form(session: Path, tmp_path: Path) -> None:
    Config.set_property("scheduler.default-memory", "32MiB")
    with pytest.raises(ValueError, match="with FedFlow"):
        FedFlow().execute(TaskGroup("early"))
    first = toys.TrainTask(0)
    group = TaskGroup("mine", estimate_memory="64MiB", device="cpu")
    defaulted, own = toys.WhereAmI("defaulted", earlier=first), toys.WhereAmI("own", estimate_memory="16MiB")
    group.add_task(defaulted)
    group.add_task(own)

    with FedFlow() as flow:
        assert os.getcwd() == str(session)
        flow.execute_task(first)
        flow.execute(group)
    assert os.getcwd() == str(tmp_path)

    assert first.workdir == str((session / "default" / "tasks" / "0").resolve())
    assert first.fedsup_record.estimate_memory == 32 * 1024**2  # neither task nor group: the config's default
    assert defaulted.fedsup_record.estimate_memory == 64 * 1024**2  # the group's
    assert own.fedsup_record.estimate_memory == 16 * 1024**2  # its own
    assert defaulted.device == "cpu"  # the group's pin, given at add_task as in fedflow
    assert defaulted.result["cwd"] == defaulted.workdir
    assert defaulted.result["device"] == defaulted.result["self_device"] == "cpu"
    assert defaulted.result["found"] == first.result["weight"]  # a file an earlier task left in its workdir
    assert group.workdir == str((session / "mine").resolve())
    assert (group.success_number, group.failed_number, group.finished()) == (2, 0, True)
    assert group.result["own"]["type"] == "success"
    assert set(group.tasks[TaskStatus.FINISHED]) == {"defaulted", "own"}


def test_failures_are_retried_classified_and_reported(session: Path, markers: str) -> None:
    Config.set_property("fedsup.max_retries", 1)
    flaky, crash, bad = toys.FlakyOnce("flaky", markers), toys.CrashOnce("crash", markers), toys.AlwaysFails("bad")
    fine = toys.TrainTask(3)
    group = TaskGroup("failures")
    for task in (flaky, crash, bad, fine):
        group.add_task(task)
    with FedFlow() as flow:
        flow.execute(group)  # as in fedflow, a failed task does not raise here

    assert flaky.status is TaskStatus.FINISHED and flaky.result == {"ok": True}
    assert flaky.fedsup_record.attempts == 2 and flaky.load_numbers == 2 and flaky.train_numbers == 2
    assert flaky.fedsup_record.history[0].error.message == "first attempt fails"
    assert crash.status is TaskStatus.FINISHED and crash.fedsup_record.attempts == 2
    first_try = crash.fedsup_record.history[0]
    assert first_try.status is fedsup.TaskStatus.CRASHED
    assert (first_try.error.kind, first_try.error.exit_code) == ("crash", 7)

    assert bad.status is TaskStatus.FAILED and bad.result == {}
    error = bad.fedsup_record.error
    assert bad.fedsup_record.attempts == 2
    assert (error.type, error.phase) == ("ValueError", "train")
    assert "boom: this task never trains" in error.message and "ValueError" in error.traceback
    assert group.result["bad"]["type"] == "fail"
    assert group.result["bad"]["data"]["stage"] == "train"
    assert "boom" in group.result["bad"]["data"]["message"]
    assert fine.status is TaskStatus.FINISHED  # the failure stayed its own
    assert (group.success_number, group.failed_number) == (3, 1)
    assert set(group.tasks[TaskStatus.FAILED]) == {"bad"}


def test_items_as_fedflow_defines_them(session: Path, markers: str) -> None:
    itemizer, in_load, flaky = toys.Itemizer("items"), toys.SetItemInLoad("in-load"), toys.FlakyOnce("flaky", markers)
    with pytest.raises(ValueError, match="main process"):
        itemizer.set_item("acc", 1.0)  # fedflow: only the task's own process sets items
    assert itemizer.get_item("acc") is None
    group = TaskGroup("items")
    for task in (itemizer, in_load, flaky):
        group.add_task(task)
    reader = toys.ItemReader(itemizer)
    later = TaskGroup("later")
    later.add_task(reader)
    with FedFlow() as flow:
        flow.execute(group)
        flow.execute(later)

    assert itemizer.result == {}  # train() returned None: fedflow's result is then {}
    assert itemizer.get_item("acc") == 0.5
    assert itemizer.get_item("loaded") == itemizer.get_item("pid") != os.getpid()  # kept in load, in its process
    assert itemizer.get_item("missing") is None
    assert in_load.result == {"seen": [1, 2]}
    assert reader.result == {"acc": 0.5, "missing": None}  # a later task reads them from the task it holds
    assert flaky.items == {"second": True}  # a failed attempt brings back nothing, its items neither
    # items live on the task objects, not in files: the workdir holds only fedsup's own
    assert set(os.listdir(itemizer.workdir)) <= {"record.json", "stdout.log", "stderr.log"}


def test_unknown_config_keys_are_errors_naming_them(tmp_path: Path) -> None:
    with pytest.raises(fedsup.ConfigError, match=r"'scheduler\.intervall' \(did you mean 'scheduler\.interval'\?\)"):
        Config.set_property("scheduler.intervall", 1)
    with pytest.raises(fedsup.ConfigError, match=r"'schedular' \(did you mean 'scheduler'\?\)"):
        Config.set_config({"schedular": {"max-process": 2}})
    with pytest.raises(fedsup.ConfigError, match=r"'fedsup\.max_retrys'.*did you mean 'fedsup\.max_retries'"):
        Config.set_property("fedsup.max_retrys", 1)
    path = tmp_path / "config.yaml"
    path.write_text("workdir: res\nsmtp:\n  hots: example.org\n")
    with pytest.raises(fedsup.ConfigError, match=r"config\.yaml: unknown config key 'smtp\.hots'"):
        Config.load(str(path))


def test_bad_values_name_their_key() -> None:
    group = TaskGroup("sizes")
    group.add_task(toys.WhereAmI("w"))
    Config.set_property("scheduler.default-memory", "lots")
    with FedFlow() as flow, pytest.raises(fedsup.ConfigError, match=r"scheduler\.default-memory: expected a size"):
        flow.execute(group)  # before any process starts
    Config.set_property("scheduler.max-process", "many")
    with pytest.raises(fedsup.ConfigError, match=r"scheduler\.max-process: expected a whole number"):
        fedflow.supervisor_options()


def test_a_config_file_is_read_with_fedsup_s_yaml_bounds(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    # eight levels of ten aliases: a few hundred bytes that yaml.safe_load would expand to over 10**8 values
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(fedsup.ConfigError, match=r"config\.yaml: its aliases expand it by 1,234,567,800 values"):
        Config.load(str(path))


def test_config_keys_map_onto_supervisor_options(caplog: pytest.LogCaptureFixture) -> None:
    Config.set_config({
        "scheduler": {"max-process": 4, "load-nretry": 2, "train-nretry": 3, "interval": 1, "max-waiting": 10},
        "remain-limit": {"cuda-memory": "1GB"},
        "utilization-limit": {"cpu": 1.0},
        "fedsup": {"max_retries": 0, "max_loaded": 6},
    })
    with caplog.at_level(logging.WARNING, logger="fedsup.compat.fedflow"):
        options = fedflow.supervisor_options()
    cores = len(os.sched_getaffinity(0))
    assert options == {"max_loaded": 6, "memory_margin": 10**9, "cpus": cores, "max_interrupts": 2, "max_retries": 0}
    # interval has no counterpart and differs from fedflow's default: named; max-waiting keeps it: not named
    assert "scheduler.interval" in caplog.text and "scheduler.max-waiting" not in caplog.text
    assert Config.get_property("scheduler.interval") == 1
    assert Config.get_property("smtp.server-port") == 25  # fedflow's default
    assert Config.get_property("no.such.key", "fallback") == "fallback"


def test_a_generated_config_loads_and_sets_every_key(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    Config.generate_config(str(path))
    Config.load(str(path))
    assert Config.get_property("workdir") == str(tmp_path / "res")  # fixed against the current directory
    options = fedflow.supervisor_options()
    assert (options["max_loaded"], options["max_interrupts"], options["memory_margin"]) == (20, 2, 2 * 10**9)


def test_status_names_map_onto_fedsup() -> None:
    assert [s.name for s in TaskStatus][:10] == ["UNKNOWN", "INIT", "AVAILABLE", "LOADING", "WAITING", "TRAINING",
                                                 "FINISHED", "EXITED", "EXCEPTION", "INTERRUPT"]
    assert TaskStatus.FINISHED.value == 6 and TaskStatus.EXCEPTION.value == 8  # fedflow's values
    for status in fedsup.TaskStatus:
        assert TaskStatus.from_fedsup(status).fedsup is status
    assert TaskStatus.UNKNOWN.fedsup is None
    task = Task("t")
    for value in (5, "TRAINING", fedsup.TaskStatus.TRAINING, TaskStatus.TRAINING):
        task.status = value
        assert task.status is TaskStatus.TRAINING
    task.status = "nonsense"
    assert task.status is TaskStatus.UNKNOWN
    with pytest.raises(ValueError, match="workdir"):
        _ = task.workdir  # only once its group runs, as in fedflow
