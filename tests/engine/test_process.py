"""The engine with real processes: crashes of every kind, retries, timeouts, placement, shutdown, records.

Every ``Supervisor.run`` here starts a real fork server (about 2 s), so related checks share a run where
that keeps each test readable. Nothing sleeps to synchronise: tasks that must be caught at a known moment
announce themselves on a FIFO (see ``toys.announce``), and a process's end is awaited through its pipe or
a pidfd. ``pytest.mark.timeout`` marks are deadlock detectors only.
"""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import subprocess
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest
import toys
from fakes import max_overlap

import fedsup
from fedsup import FaultPlan, Supervisor, TaskRecord, TaskStatus
from fedsup.engine import launch
from fedsup.engine.devices import cpu_cores
from fedsup.engine.faults import FAULT_KINDS
from fedsup.engine.states import allowed

S = TaskStatus
GiB = 1024**3
MiB = 1024**2
HERE = Path(__file__).resolve().parent
CTRL_C_SCRIPT = HERE / "scripts" / "ctrl_c_run.py"
TWO_GPUS = [{"name": "cuda:0", "memory": "16GiB"}, {"name": "cuda:1", "memory": "16GiB"}]

# A helper process standing in for "someone else": it reads one announcement "<task_id> <pid>" from the
# FIFO and SIGKILLs that pid. It is a process, not a thread of the test, because a thread would make the
# supervisor start its fork server with spawn instead of fork (a different code path, and a slow one).
KILLER = r"""
import os, select, signal, sys
fd = os.open(sys.argv[1], os.O_RDWR)
ready, _, _ = select.select([fd], [], [], float(sys.argv[2]))
if not ready:
    sys.exit("killer: no task announced itself")
task_id, pid = os.read(fd, 4096).decode().split()
os.kill(int(pid), signal.SIGKILL)
print(task_id, pid)
"""


# ---------------------------------------------------------------- helpers


def by_id(records: list[TaskRecord]) -> dict[str, TaskRecord]:
    return {r.task_id: r for r in records}


def read_events(run_dir: Path) -> list[dict[str, Any]]:
    lines = (run_dir / "events.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]  # every line is one JSON object


def check_event_chains(events: list[dict[str, Any]], records: list[TaskRecord]) -> None:
    """One event per transition: each task's events chain from INIT, edge by allowed edge, to its outcome."""
    for record in records:
        mine = [e for e in events if e["task"] == record.task_id]
        previous = "INIT"
        for event in mine:
            assert event["previous"] == previous, (record.task_id, mine)
            assert S(event["status"]) in allowed(S(previous)), (record.task_id, event)
            previous = event["status"]
        assert previous == record.status.value, (record.task_id, mine)
        assert sum(e["status"] == "AVAILABLE" for e in mine) == record.attempts, (record.task_id, mine)
    times = [e["time"] for e in events]
    assert times == sorted(times)


def check_phase(phase: fedsup.PhaseRecord | None, name: str, since: float, until: float) -> None:
    assert phase is not None and phase.phase == name
    assert since <= phase.started <= until
    assert phase.duration >= 0
    assert phase.cpu_time >= 0
    assert phase.peak_memory is not None and phase.peak_memory > 0
    assert phase.peak_gpu_memory is None  # nothing here uses CUDA


def pidfd_wait(pid: int, timeout: float) -> None:
    """Wait, without polling, for a process that is not our child to end."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        ready, _, _ = select.select([fd], [], [], timeout)
        assert ready, f"process {pid} still alive after {timeout} s"
    finally:
        os.close(fd)


def _children(proc: psutil.Process) -> list[psutil.Process]:
    """A process's children; none once it has gone (a retiring cold server exits when its last task has)."""
    try:
        return proc.children()
    except psutil.NoSuchProcess:
        return []


def _helpers_end(fifo: Any, n: int) -> dict[str, int]:
    """Read the helpers' pids the tasks announced; return those still alive 5 s after the run (and kill
    them, so that no test leaves a process behind)."""
    helpers = {task: int(pid) for task, pid in (line.split() for line in fifo.lines(n, timeout=10))}
    alive = {}
    deadline = time.monotonic() + 5
    for task, pid in helpers.items():
        try:
            pidfd_wait(pid, timeout=max(0.0, deadline - time.monotonic()))
        except AssertionError:
            alive[task] = pid
            os.kill(pid, signal.SIGKILL)
    return alive


# ---------------------------------------------------------------- the crash matrix


def _expect(status: TaskStatus, attempts: int, kind: str, attempt_status: TaskStatus, phase: str = "train",
            says: tuple[str, ...] = (), **fields: Any) -> dict[str, Any]:
    return dict(status=status, attempts=attempts, kind=kind, attempt_status=attempt_status, phase=phase,
                says=says, fields=fields)


# max_retries=1: the always-failing ones fail twice. A SIGKILL fedsup did not send is classed host_oom (the
# kernel's OOM killer, most likely) and spends max_interrupts=2 instead: three attempts. Its attempt status
# is CRASHED (the process died unannounced), unlike an in-process MemoryError, which is INTERRUPT.
MAX_RETRIES, MAX_INTERRUPTS = 1, 2
CRASHES: dict[str, tuple[Callable[[str, str, str], fedsup.Task], dict[str, Any]]] = {
    "raise_in_load": (lambda n, f, m: toys.RaiseInLoad(n), _expect(
        S.FAILED, 2, "exception", S.EXCEPTION, phase="load", says=("boom in load",), type="ValueError")),
    "raise_in_train": (lambda n, f, m: toys.RaiseInTrain(n), _expect(
        S.FAILED, 2, "exception", S.EXCEPTION, says=("boom in train",), type="RuntimeError", device="cpu")),
    "sys_exit_2": (lambda n, f, m: toys.SysExit(n), _expect(
        S.FAILED, 2, "exit", S.EXCEPTION, says=("sys.exit(2)",), type="SystemExit")),
    "os_exit_3": (lambda n, f, m: toys.OsExit(n), _expect(
        S.FAILED, 2, "crash", S.CRASHED, says=("code 3",), exit_code=3, signal=None)),
    "segfault": (lambda n, f, m: toys.Segfault(n), _expect(
        S.FAILED, 2, "crash", S.CRASHED, says=("SIGSEGV",), exit_code=None, signal="SIGSEGV")),
    "self_sigkill": (lambda n, f, m: toys.SelfKill(n), _expect(
        S.FAILED, MAX_INTERRUPTS + 1, "host_oom", S.CRASHED, says=("SIGKILL",), signal="SIGKILL")),
    "unpicklable_result": (lambda n, f, m: toys.Unpicklable(n), _expect(
        S.FAILED, 2, "unpicklable", S.EXCEPTION, says=("pickle",))),
    # killed once from outside while training, then it succeeds on its retry
    "external_sigkill": (lambda n, f, m: toys.KilledOnce(n, f, m), _expect(
        S.FINISHED, 2, "host_oom", S.CRASHED, says=("SIGKILL",), signal="SIGKILL")),
    "ok": (lambda n, f, m: toys.Ok(n), _expect(S.FINISHED, 1, "", S.FINISHED)),
}


@pytest.fixture(scope="module")
def crash_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Every crash of the matrix, side by side in one run: none may disturb another."""
    base = tmp_path_factory.mktemp("crashes")
    fifo, markers = base / "announce.fifo", base / "markers"
    os.mkfifo(fifo)
    markers.mkdir()
    tasks = [make(name, str(fifo), str(markers)) for name, (make, _) in CRASHES.items()]
    killer = subprocess.Popen([sys.executable, "-c", KILLER, str(fifo), "120"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        started = time.time()
        records = Supervisor("cpu", max_retries=MAX_RETRIES, max_interrupts=MAX_INTERRUPTS, retry_backoff=0,
                             run_dir=base / "run").run(tasks)
        ended = time.time()
    except BaseException:
        killer.kill()
        raise
    finally:
        out, err = killer.communicate(timeout=150)
    assert killer.returncode == 0, err
    killed_task, killed_pid = out.split()
    return dict(records=by_id(records), killed=(killed_task, int(killed_pid)), started=started, ended=ended,
                run_dir=base / "run")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", list(CRASHES))
def test_crash_matrix(crash_run: dict[str, Any], name: str) -> None:
    expect = CRASHES[name][1]
    record = crash_run["records"][name]
    assert record.status is expect["status"], record.error
    assert record.attempts == expect["attempts"] == len(record.history)
    assert [a.attempt for a in record.history] == list(range(1, record.attempts + 1))
    # each attempt was its own process, started after the previous one ended
    for earlier, later in zip(record.history, record.history[1:], strict=False):
        assert earlier.ended is not None and earlier.ended <= later.started

    if name == "ok":
        assert record.error is None and record.result["pid"] != os.getpid()
        assert record.result["loaded_in"] == record.result["pid"]  # load and train ran in one process
        return

    failed = record.history if record.status is S.FAILED else record.history[:-1]
    for attempt in failed:
        assert attempt.status is expect["attempt_status"]
        error = attempt.error
        assert error is not None and error.kind == expect["kind"], error
        assert error.phase == expect["phase"]
        for text in expect["says"]:
            assert text in error.message, error.message
        for field, value in expect["fields"].items():
            assert getattr(error, field) == value, (field, error)
    if record.status is S.FAILED:
        assert record.error == record.history[-1].error  # the root cause is the last attempt's error
        assert record.result is None
        with pytest.raises(fedsup.TaskFailed, match=name):
            record.raise_for_status()
    else:
        assert record.error is None
        assert record.history[-1].status is S.FINISHED


@pytest.mark.timeout(120)
def test_external_sigkill_is_retried_in_a_new_process(crash_run: dict[str, Any]) -> None:
    record = crash_run["records"]["external_sigkill"]
    killed_task, killed_pid = crash_run["killed"]
    assert killed_task == "external_sigkill"
    assert record.status is S.FINISHED and record.result["pid"] != killed_pid
    assert not psutil.pid_exists(killed_pid) or psutil.Process(killed_pid).create_time() > crash_run["started"]


@pytest.mark.timeout(120)
def test_crash_matrix_records_on_disk(crash_run: dict[str, Any]) -> None:
    records = list(crash_run["records"].values())
    for record in records:
        on_disk = TaskRecord.model_validate_json((crash_run["run_dir"] / "tasks" / record.task_id / "record.json")
                                                 .read_text())
        assert on_disk.status is record.status and on_disk.attempts == record.attempts
        assert on_disk.error == record.error
    check_event_chains(read_events(crash_run["run_dir"]), records)


@pytest.mark.timeout(120)
def test_crash_during_train_names_the_device(crash_run: dict[str, Any]) -> None:
    for name in ("os_exit_3", "segfault", "self_sigkill"):
        record = crash_run["records"][name]
        assert record.error.device == "cpu", (name, record.error)
        assert record.history[0].device == "cpu", (name, record.history[0])


@pytest.mark.timeout(120)
def test_attempt_records_name_their_process(crash_run: dict[str, Any]) -> None:
    record = crash_run["records"]["external_sigkill"]
    assert record.history[0].pid == crash_run["killed"][1]
    assert record.history[1].pid == record.result["pid"]


# ---------------------------------------------------------------- retries and budgets


@pytest.mark.timeout(120)
def test_always_failing_task_fails_alone(run_dir: Path) -> None:
    tasks = [toys.Ok("ok-0"), toys.AlwaysFail("always"), toys.Ok("ok-1"), toys.Ok("ok-2"), toys.Ok("ok-3")]
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    records = Supervisor("cpu", max_retries=2, retry_backoff=0, run_dir=run_dir).run(tasks)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers  # restored
    assert [r.task_id for r in records] == [t.task_id for t in tasks]  # input order
    failing = records[1]
    assert failing.status is S.FAILED
    assert failing.attempts == 2 + 1
    assert [a.status for a in failing.history] == [S.EXCEPTION] * 3
    assert failing.error.kind == "exception" and failing.error.type == "RuntimeError"
    assert "boom in train" in failing.error.traceback
    others = [r for r in records if r.task_id != "always"]
    assert all(r.status is S.FINISHED and r.attempts == 1 for r in others), [r.error for r in others]
    pids = {r.result["pid"] for r in others}
    assert os.getpid() not in pids  # never in ours
    for attempt in failing.history:  # nor in a process after a failure there
        assert all(r.history[-1].started < attempt.started for r in others if r.result["pid"] == attempt.pid)


@pytest.mark.timeout(120)
def test_out_of_memory_is_retried_on_the_interrupt_budget(markers: str) -> None:
    tasks = [toys.CudaOomOnce("oom-once", markers, estimate_cuda_memory="2GiB"),
             toys.CudaOomAlways("oom-always", estimate_cuda_memory="12GiB"),
             toys.SelfKill("host-oom")]
    # max_retries=0: out of memory spends max_interrupts, never the failure budget
    backoff = 0.2
    records = by_id(Supervisor([{"name": "cuda:0", "memory": "16GiB"}], max_retries=0, max_interrupts=3,
                               retry_backoff=backoff).run(tasks))

    once = records["oom-once"]
    assert once.status is S.FINISHED, once.error
    assert once.attempts == 2
    first = once.history[0]
    assert first.status is S.INTERRUPT
    assert first.error.kind == "cuda_oom" and first.error.phase == "train"
    assert first.error.estimate_cuda_memory == 2 * GiB  # the estimate it failed with
    assert once.estimate_cuda_memory > 2 * GiB          # the estimate it was retried (and finished) with
    assert once.device == "cuda:0" and once.result["device"] == "cuda:0"

    # the estimate grows, capped at what the device can give, and then the task is given up
    always = records["oom-always"]
    assert always.status is S.FAILED
    assert always.attempts == 2  # fewer than max_interrupts + 1: the cap ended it
    assert always.error.kind == "cuda_oom"
    assert 12 * GiB < always.estimate_cuda_memory < 16 * GiB

    # a SIGKILL fedsup did not send (host memory, most likely) is retried after a doubling back-off
    host = records["host-oom"]
    assert host.status is S.FAILED
    assert host.attempts == 3 + 1
    assert all(a.error.kind == "host_oom" and a.error.signal == "SIGKILL" for a in host.history)
    for n, (earlier, later) in enumerate(zip(host.history, host.history[1:], strict=False)):
        assert later.started - earlier.ended >= backoff * 2**n - 0.01, (n, earlier, later)


@pytest.mark.timeout(120)
def test_unpicklable_task_fails_alone() -> None:
    ok, bad = Supervisor("cpu", max_retries=0).run([toys.Ok("ok"), toys.UnpicklableTask("bad")])
    assert ok.status is S.FINISHED
    assert bad.status is S.FAILED and bad.error.kind == "unpicklable" and "pickle" in bad.error.message


# ---------------------------------------------------------------- timeouts


@pytest.mark.timeout(120)
def test_hang_past_train_timeout_is_killed_and_requeued(markers: str) -> None:
    timeout = 1.0
    tasks = [toys.Hang("hang-once", "train", marker_dir=markers), toys.Ok("ok")]
    records = by_id(Supervisor("cpu", max_retries=1, train_timeout=timeout, retry_backoff=0).run(tasks))
    record = records["hang-once"]
    assert record.status is S.FINISHED, record.error
    assert record.attempts == 2
    first = record.history[0]
    assert first.status is S.TIMEOUT
    assert first.error.kind == "timeout" and first.error.phase == "train"
    assert first.error.signal == "SIGKILL" and "timeout" in first.error.message
    assert first.ended - first.started >= timeout
    assert record.history[1].status is S.FINISHED
    assert records["ok"].status is S.FINISHED and records["ok"].attempts == 1


@pytest.mark.timeout(120)
def test_always_hanging_task_fails_with_timeout(run_dir: Path, fifo: Any) -> None:
    tasks = [toys.Hang("hang", "train"), toys.WithHelper("hang-with-helper", fifo.path, "hang")]
    records = Supervisor("cpu", max_retries=0, train_timeout=1.0, run_dir=run_dir).run(tasks)
    for record in records:
        assert record.status is S.FAILED
        assert record.attempts == 1
        assert record.history[0].status is S.TIMEOUT
        assert record.error.kind == "timeout" and record.error.phase == "train"
        assert record.error.signal == "SIGKILL" and "train()" in record.error.message
    check_event_chains(read_events(run_dir), records)
    # the timeout's kill took the task's whole process group: the helper it started is gone too
    assert _helpers_end(fifo, 1) == {}


@pytest.mark.timeout(120)
def test_load_timeout_does_not_count_the_fork_server_start() -> None:
    record = Supervisor("cpu", max_retries=0, load_timeout=0.5).run([toys.Ok("quick-load")])[0]
    assert record.status is S.FINISHED, record.error
    assert record.attempts == 1
    assert record.load.duration < 0.5


@pytest.mark.timeout(120)
def test_first_tasks_start_from_a_cold_server_while_the_warm_one_gets_ready() -> None:
    # With a fresh process per task, the first spawns go to the cold server (one fewer than the cores), every
    # later one waits for the warm server: so the first tasks have one parent, the rest another, and nothing
    # is left running at the end.
    cold = max(1, cpu_cores() - 1)
    tasks = [toys.Ok(f"task-{i}") for i in range(cold + 2)]
    records = Supervisor("cpu", max_retries=0, max_loaded=len(tasks), tasks_per_process=1).run(tasks)
    assert all(r.status is TaskStatus.FINISHED for r in records), [r.error for r in records]
    parents = [r.result["ppid"] for r in records]
    assert len(set(parents[:cold])) == 1 and len(set(parents[cold:])) == 1, parents
    assert parents[0] != parents[-1]
    # the warm server warmed up in a thread at nice 19: its children have neither that priority nor a thread
    # more than the cold server's children (each has the worker's own parent watcher)
    assert {r.result["nice"] for r in records} == {os.getpriority(os.PRIO_PROCESS, 0)}
    assert len({r.result["threads"] for r in records}) == 1, [r.result["threads"] for r in records]


@pytest.mark.parametrize("user_value", [None, "0"])
def test_task_processes_see_the_user_s_own_cuda_check_setting(monkeypatch: pytest.MonkeyPatch,
                                                               user_value: str | None) -> None:
    # Fork servers keep torch's CUDA checks on NVML (so that no warm-up or import leaves their children unable
    # to use CUDA); a task, from either server, sees the variable as the user set it, or not at all.
    if user_value is None:
        monkeypatch.delenv(launch.NVML_CUDA_CHECK, raising=False)
    else:
        monkeypatch.setenv(launch.NVML_CUDA_CHECK, user_value)
    tasks = [toys.Environ(f"env-{i}", launch.NVML_CUDA_CHECK) for i in range(max(1, cpu_cores() - 1) + 2)]
    records = Supervisor("cpu", max_retries=0, max_loaded=len(tasks), tasks_per_process=1).run(tasks)
    assert all(r.status is TaskStatus.FINISHED for r in records), [r.error for r in records]
    assert len({r.result["ppid"] for r in records}) == 2, "tasks from both fork servers"
    assert {r.result["value"] for r in records} == {user_value}


def test_a_process_that_cannot_fork_for_cuda_starts_its_fork_servers_with_spawn(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    # Once the supervisor's process has asked the CUDA runtime anything, its forked children cannot use CUDA:
    # the servers are started with spawn instead, and say why.
    assert not launch.cuda_initialised_here()
    monkeypatch.setattr(launch, "cuda_initialised_here", lambda: True)
    caplog.set_level(logging.INFO, logger="fedsup.engine.launch")
    record = Supervisor("cpu", max_retries=0).run([toys.Ok("ok")])[0]
    assert record.status is TaskStatus.FINISHED, record.error
    assert any("with spawn" in m and "CUDA driver" in m for m in caplog.messages), caplog.messages


def test_servers_started_with_spawn_are_one_warm_server_whose_children_inherit_its_warm_up(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # A spawned cold server would import torch again, and each of its children would import the optimiser
    # machinery itself: with spawn, every task process comes warmed from the one server.
    monkeypatch.setattr(launch, "cuda_initialised_here", lambda: True)
    tasks = [toys.Warmed(f"w{i}") for i in range(cpu_cores() + 1)]
    records = Supervisor("cpu", max_retries=0, max_loaded=len(tasks), tasks_per_process=1).run(tasks)
    assert all(r.status is TaskStatus.FINISHED for r in records), [r.error for r in records]
    assert len({r.result["ppid"] for r in records}) == 1, "every task from one server"
    assert all(r.result["warmed"] for r in records), [r.result for r in records]


@pytest.mark.parametrize(("where", "runs"), [("ray/_private/workers", False), ("scripts", True)])
def test_a_spawned_server_runs_the_main_script_again_unless_it_is_a_ray_worker_s(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, where: str, runs: bool) -> None:
    # Spawn runs the parent's main script again for the classes pickled from it; a Ray worker's defines none.
    script = tmp_path / where / "default_worker.py"
    script.parent.mkdir(parents=True)
    script.write_text("import os\nopen(os.environ['MAIN_RAN'], 'w').close()\n")
    main = types.ModuleType("__main__")
    main.__file__ = str(script)
    monkeypatch.setitem(sys.modules, "__main__", main)
    monkeypatch.setenv("MAIN_RAN", str(tmp_path / "ran"))
    monkeypatch.setattr(launch, "cuda_initialised_here", lambda: True)
    record = Supervisor("cpu", max_retries=0).run([toys.Ok("ok")])[0]
    assert record.status is TaskStatus.FINISHED, record.error
    assert (tmp_path / "ran").exists() is runs
    assert sys.modules["__main__"] is main


def test_a_spawned_warm_server_whose_warm_up_initialised_cuda_gives_way_to_a_cold_one(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    import warmup_cuda_toy

    monkeypatch.setattr(launch, "cuda_initialised_here", lambda: True)
    monkeypatch.setenv(warmup_cuda_toy.WARMUP_CUDA, str(os.getpid()))
    caplog.set_level(logging.WARNING, logger="fedsup.engine.launch")
    tasks = [warmup_cuda_toy.Reports(f"r{i}") for i in range(3)]
    records = Supervisor("cpu", max_retries=0, max_loaded=len(tasks), tasks_per_process=1).run(tasks)
    assert all(r.status is TaskStatus.FINISHED for r in records), [r.error for r in records]
    assert len({r.result["ppid"] for r in records}) == 1, "every task from the cold server"
    assert not any(r.result["warmed"] for r in records), "a task came from the warm server"
    assert any("from a cold fork server instead" in m for m in caplog.messages), caplog.messages


def test_a_warm_server_whose_warm_up_initialised_cuda_is_stopped_and_the_cold_one_serves(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    # The servers are forked from this process, so they carry these stand-ins: only the warm server, once
    # warmed, reports that CUDA was initialised in it. None of its children could use CUDA, so it forks none.
    warmed = {"done": False}
    warm_torch = launch.warm_torch

    def warm_and_mark() -> None:
        warm_torch()
        warmed["done"] = True

    monkeypatch.setattr(launch, "warm_torch", warm_and_mark)
    monkeypatch.setattr(launch, "cuda_problem", lambda: "CUDA initialised in the warm-up" if warmed["done"] else None)
    caplog.set_level(logging.WARNING, logger="fedsup.engine.launch")
    tasks = [toys.Ok(f"t{i}") for i in range(max(1, cpu_cores() - 1) + 2)]
    records = Supervisor("cpu", max_retries=0, max_loaded=len(tasks), tasks_per_process=1).run(tasks)
    assert all(r.status is TaskStatus.FINISHED for r in records), [r.error for r in records]
    assert len({r.result["ppid"] for r in records}) == 1, "every task from the cold server"
    assert any("from a cold fork server instead" in m for m in caplog.messages), caplog.messages


@pytest.mark.timeout(120)
@pytest.mark.skipif(cpu_cores() < 2, reason="on one core every pool has one thread anyway")
def test_native_thread_pools_are_held_to_the_task_s_cpus() -> None:
    # numpy's OpenBLAS was loaded here (the supervisor) and sized itself from the cores; a task with one CPU,
    # whether its process came from the cold server or the warm one, must not use more.
    from threadpoolctl import threadpool_info

    assert any(i["internal_api"] == "openblas" and i["num_threads"] > 1 for i in threadpool_info())
    tasks = [toys.Threads(f"one-{i}", cpus=1) for i in range(3)]
    records = Supervisor("cpu", max_retries=0, tasks_per_process=1).run(tasks)
    assert all(r.status is TaskStatus.FINISHED for r in records), [r.error for r in records]
    assert len({r.result["ppid"] for r in records}) == 2, "tasks from both fork servers"
    for r in records:
        assert r.result["torch"] == 1 and r.result["pools"].get("openblas") == 1, r.result


@pytest.mark.timeout(120)
def test_ended_task_leaves_no_process_of_its_own(fifo: Any) -> None:
    tasks = [toys.WithHelper("crashes", fifo.path, "exit"), toys.WithHelper("returns", fifo.path, "return")]
    crashed, returned = Supervisor("cpu", max_retries=0).run(tasks)
    assert crashed.status is S.FAILED and crashed.error.exit_code == 3
    assert returned.status is S.FINISHED
    assert _helpers_end(fifo, 2) == {}


@pytest.mark.timeout(120)
def test_a_reused_process_ends_the_last_task_s_helpers(fifo: Any) -> None:
    tasks = [toys.WithHelper("returns", fifo.path, "return"), toys.Descendants("next")]
    first, second = Supervisor("cpu", cpus=1, max_loaded=1, max_retries=0).run(tasks)
    assert first.status is S.FINISHED and second.status is S.FINISHED
    assert second.result["pid"] == first.result["pid"]  # the process went on to the next task
    assert second.result["descendants"] == []
    assert _helpers_end(fifo, 1) == {}


@pytest.mark.timeout(120)
def test_a_reused_process_gives_back_the_last_task_s_memory_limit() -> None:
    import resource

    tasks = [toys.Limits("limited", estimate_memory="1GiB"), toys.Limits("free")]
    limited, free = Supervisor("cpu", cpus=1, max_loaded=1, max_retries=0, enforce_memory=True).run(tasks)
    assert free.result["pid"] == limited.result["pid"]  # the process went on to the next task
    assert limited.result["as_limit"][0] != resource.RLIM_INFINITY
    assert tuple(free.result["as_limit"]) == resource.getrlimit(resource.RLIMIT_AS)


# ---------------------------------------------------------------- placement


@pytest.mark.timeout(120)
def test_memory_ledger_caps_tasks_per_device() -> None:
    """Two 16 GiB devices, tasks of 6 GiB (plus a CUDA context): two fit on a device, a third does not,
    although 8 cores and max_loaded=10 would let all 10 run at once."""
    tasks = [toys.Timed(f"t{i}", 0.3, estimate_cuda_memory="6GiB", cpus=1) for i in range(10)]
    # a fresh process each: reused ones would stay on their GPU, and two cold processes could run all ten
    # before the warm server is ready, one per device, which would leave the cap untested
    records = Supervisor(TWO_GPUS, cpus=8, max_loaded=10, tasks_per_process=1).run(tasks)
    assert all(r.status is S.FINISHED and r.attempts == 1 for r in records), [r.error for r in records]
    spans: dict[str, list[tuple[float, float]]] = {}
    for r in records:
        assert r.device == r.train.device
        assert r.result["device"] == "cuda:0"  # in the child, its one visible GPU is always cuda:0
        spans.setdefault(r.device, []).append((r.train.started, r.train.started + r.train.duration))
    assert set(spans) == {"cuda:0", "cuda:1"}  # both devices used
    most = {device: max_overlap(s) for device, s in spans.items()}
    assert all(n <= 2 for n in most.values()), most
    assert max(most.values()) == 2, most  # the cap was reached, so the check above was not vacuous


# ---------------------------------------------------------------- records


@pytest.mark.timeout(120)
def test_run_dir_records(run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # pytest's output capture replaces sys.stdout/sys.stderr with objects that do not write to fds 1 and 2,
    # and forked task processes inherit them (see test_prints_reach_logs_when_sys_stdout_is_replaced):
    # give the run the real streams, as a script would have.
    monkeypatch.setattr(sys, "stdout", sys.__stdout__)
    monkeypatch.setattr(sys, "stderr", sys.__stderr__)
    tasks = [toys.Noisy("talker", allocate=64 * MiB), toys.Noisy("failer", fail=True, lines=30)]
    started = time.time()
    records = Supervisor("cpu", max_retries=1, retry_backoff=0, run_dir=run_dir).run(tasks)
    ended = time.time()
    talker, failer = records

    # events.jsonl: valid JSON per line, one line per transition
    check_event_chains(read_events(run_dir), records)

    # record.json: a TaskRecord equal to what run() returned
    for record in records:
        task_dir = run_dir / "tasks" / record.task_id
        on_disk = TaskRecord.model_validate_json((task_dir / "record.json").read_text())
        assert on_disk.model_dump(mode="json") == record.model_dump(mode="json")
        # each task ran in tasks/<task_id>/: that is where its attempts.txt is
        assert (task_dir / "attempts.txt").read_text() == "x" * record.attempts

    assert talker.status is S.FINISHED and talker.attempts == 1
    assert talker.result["attempt"] == 1
    out = (run_dir / "tasks" / "talker" / "stdout.log").read_text().splitlines()
    assert out == ["talker: stdout from load, attempt 1", "talker: stdout from train, attempt 1"]
    err = (run_dir / "tasks" / "talker" / "stderr.log").read_text().splitlines()
    assert err == ["talker: stderr from load, attempt 1"] + [f"talker: err 1 {i}" for i in range(3)]

    # the failing task: stderr.log keeps every attempt; each error's tail holds that attempt's last lines
    assert failer.status is S.FAILED and failer.attempts == 2
    err = (run_dir / "tasks" / "failer" / "stderr.log").read_text()
    assert "failer: err 1 29" in err and "failer: err 2 29" in err
    for number, attempt in enumerate(failer.history, start=1):
        tail = attempt.error.stderr_tail
        assert tail and tail[-1] == f"failer: err {number} 29", tail
        assert all(f"err {number} " in line or f"attempt {number}" in line for line in tail), tail
        assert len(tail) < 31  # a tail, not the whole log
    assert failer.error.stderr_tail == failer.history[-1].error.stderr_tail

    # phase records, measured in the child
    for record in records:
        for attempt in record.history:
            check_phase(attempt.load, "load", started, ended)
            check_phase(attempt.train, "train", started, ended)
            assert attempt.load.device is None and attempt.train.device == "cpu"
            assert attempt.load.started + attempt.load.duration <= attempt.train.started
        assert record.load == record.history[-1].load and record.train == record.history[-1].train
        assert record.cpu_time >= 0
        assert record.duration is not None and 0 <= record.duration <= ended - started
        assert record.peak_memory == max(p.peak_memory for a in record.history for p in (a.load, a.train))
    # the peak is per phase: the 64 MiB that load() touched and freed is not in train's peak
    assert talker.load.peak_memory >= talker.train.peak_memory + 48 * MiB


@pytest.mark.timeout(120)
def test_prints_reach_logs_when_sys_stdout_is_replaced(run_dir: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    with open(tmp_path / "parent-stdout.txt", "w") as out, open(tmp_path / "parent-stderr.txt", "w") as err:
        monkeypatch.setattr(sys, "stdout", out)
        monkeypatch.setattr(sys, "stderr", err)
        records = Supervisor("cpu", run_dir=run_dir).run([toys.Noisy("talker")])
    assert records[0].status is S.FINISHED
    assert "stdout from train" in (run_dir / "tasks" / "talker" / "stdout.log").read_text()
    assert "stderr from load" in (run_dir / "tasks" / "talker" / "stderr.log").read_text()
    assert "talker" not in (tmp_path / "parent-stdout.txt").read_text()


# ---------------------------------------------------------------- spawn


@pytest.mark.timeout(180)
def test_spawn_start_method() -> None:
    tasks = [toys.Ok("spawned-ok"), toys.OsExit("spawned-exit")]
    ok, crashed = Supervisor("cpu", start_method="spawn", max_retries=0).run(tasks)
    assert ok.status is S.FINISHED, ok.error
    assert ok.result["pid"] == ok.result["loaded_in"] != os.getpid()
    assert crashed.status is S.FAILED and crashed.attempts == 1
    assert crashed.error.kind == "crash" and crashed.error.exit_code == 3 and "code 3" in crashed.error.message


# ---------------------------------------------------------------- fault injection

# what each injected fault looks like in the record
FAULT_OUTCOME = {
    "exception": ("exception", S.EXCEPTION),
    "exit": ("crash", S.CRASHED),
    "sigkill": ("host_oom", S.CRASHED),
    "cuda_oom": ("cuda_oom", S.INTERRUPT),
    "hang": ("timeout", S.TIMEOUT),
}


def _one_task_per_fault(plan: FaultPlan, phase: str) -> list[str]:
    """Task ids for which the plan's first fault is of each kind, one id per kind."""
    chosen: dict[str, str] = {}
    for i in range(500):
        task_id = f"{phase}-{i}"
        kind = plan.pick(task_id, 1, phase, 0)  # type: ignore[arg-type]
        chosen.setdefault(kind, task_id)
    assert set(chosen) == set(plan.kinds)
    return list(chosen.values())


@pytest.mark.timeout(120)
@pytest.mark.parametrize("phase", ["load", "train"])
def test_fault_injection_every_task_recovers(phase: str) -> None:
    # "hang" only ends through a phase timeout; load_timeout is not usable in tests (see
    # test_load_timeout_does_not_count_the_fork_server_start), so hangs are injected in train only.
    kinds = FAULT_KINDS if phase == "train" else tuple(k for k in FAULT_KINDS if k != "hang")
    plan = FaultPlan(probability=1.0, seed=1234, kinds=kinds, phases=(phase,), max_per_task=1)
    tasks = [toys.Ok(task_id) for task_id in _one_task_per_fault(plan, phase)]
    records = Supervisor("cpu", faults=plan, max_retries=1, max_interrupts=1, retry_backoff=0,
                         train_timeout=2.0).run(tasks)
    seen = set()
    for record in records:
        assert record.status is S.FINISHED, (record.task_id, record.error)
        assert record.attempts == 2
        first, second = record.history
        fault = plan.pick(record.task_id, first.attempt, phase, 0)  # type: ignore[arg-type]
        kind, status = FAULT_OUTCOME[fault]
        assert first.status is status and first.error.kind == kind, (fault, first)
        assert first.error.phase == phase
        assert second.status is S.FINISHED and second.error is None
        seen.add(fault)
    assert seen == set(kinds)


# ---------------------------------------------------------------- Ctrl-C and SIGTERM


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("sig", "twice"), [(signal.SIGINT, False), (signal.SIGTERM, False), (signal.SIGINT, True)],
                         ids=["ctrl-c", "sigterm", "ctrl-c-twice"])
def test_interrupted_run_stops_in_order(run_dir: Path, fifo: Any, sig: int, twice: bool) -> None:
    # With one signal, the tasks that ignore EXIT get SIGTERM after a short grace period. With two, the
    # grace period is longer than this test's timeout: only the second signal's kill can end the run in time.
    grace = 60.0 if twice else 0.5
    tree: list[psutil.Process] = []
    proc = subprocess.Popen([sys.executable, str(CTRL_C_SCRIPT), str(run_dir), fifo.path, str(grace)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        # one task training on cuda:0 and "gpu1" training on cuda:1, so "quick" has finished
        announced = dict(line.split() for line in fifo.lines(2, timeout=90, watch=[proc.stdout]))
        assert "gpu1" in announced and len(announced.keys() & {"gpu0-a", "gpu0-b"}) == 1, announced
        supervisor = psutil.Process(proc.pid)
        tree = [supervisor, *supervisor.children(recursive=True)]
        pids = {p.pid for p in tree}
        assert {int(pid) for pid in announced.values()} <= pids
        # the supervisor, its fork servers (the warm one, and the cold one while a task it started lives), and
        # three task processes (two training, one loaded and waiting)
        servers = supervisor.children()
        tasks = [p for s in servers for p in _children(s)]
        waiting = [p for p in tasks if str(p.pid) not in announced.values()]
        assert len(tree) == 1 + len(servers) + len(tasks), [(p.pid, p.cmdline()) for p in tree]
        assert len(servers) in (1, 2) and len(tasks) == 3 and len(waiting) == 1

        os.killpg(proc.pid, sig)  # as a terminal does: the foreground process group (the tasks have their own)
        if twice:
            pidfd_wait(waiting[0].pid, timeout=30)  # the first signal was handled: the waiting task was told to EXIT
            os.killpg(proc.pid, sig)
        out, err = proc.communicate(timeout=45)
    finally:
        if proc.poll() is None:  # the test failed midway: leave nothing behind
            for p in tree:
                try:
                    p.kill()
                except psutil.NoSuchProcess:
                    pass
            proc.kill()
            proc.communicate()

    assert proc.returncode == 128 + sig, (proc.returncode, err)
    assert "Traceback" not in err, err
    # nothing of the tree is left: not the fork server, not a task process (checked by pid and start time)
    left = [p for p in tree if p.is_running()]
    assert not left, [(p.pid, p.status()) for p in left]

    report = json.loads(out.splitlines()[-1])
    assert report["signum"] == sig
    records = [TaskRecord.model_validate(r) for r in report["records"]]
    status = {r.task_id: r.status for r in records}
    assert status == {"quick": S.FINISHED, "gpu0-a": S.CANCELLED, "gpu0-b": S.CANCELLED, "gpu1": S.CANCELLED,
                      "queued": S.CANCELLED}
    rec = by_id(records)
    assert rec["queued"].attempts == 0  # never started
    waiting_id = ({"gpu0-a", "gpu0-b"} - announced.keys()).pop()
    assert rec[waiting_id].history[0].load is not None and rec[waiting_id].history[0].train is None
    assert rec["quick"].result["device"] == "cpu"

    # the run directory has every task's record, as returned, and an event chain ending in it
    for record in records:
        on_disk = TaskRecord.model_validate_json((run_dir / "tasks" / record.task_id / "record.json").read_text())
        assert on_disk.status is record.status and on_disk.attempts == record.attempts
    check_event_chains(read_events(run_dir), records)
