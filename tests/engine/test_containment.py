"""Containment and the fork server's failures, through real processes.

* Nothing a task starts outlives its task, its fork server or a SIGKILL of the supervisor: a helper left
  running (``subprocess.Popen``) and a daemon that double-forked into a session of its own (``setsid()``).
* A stopped fork server is killed and replaced within its deadline, and SIGTERM or two SIGINTs end a run
  whose fork server is stopped.
* Fork-server deaths spend the run's infrastructure budget, not the tasks' ``max_retries``.
* SIGHUP stops a run in order, as SIGTERM does: records consistent, the same exit status, resumable.

Nothing sleeps to synchronise: tasks announce themselves on a FIFO or in files, processes are awaited through
pidfds, and every timeout is a deadlock detector.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import toys
import yaml

import fedsup
from fedsup import Supervisor, TaskStatus
from fedsup.engine import launch
from fedsup.engine.containment import Cgroups, _own_cgroup
from fedsup.engine.runtime import Exited, ProcessRuntime
from fedsup.engine.worker import ChildSpec

S = TaskStatus
HERE = Path(__file__).resolve().parent
TESTS = HERE.parent
CTRL_C_SCRIPT = HERE / "scripts" / "ctrl_c_run.py"
HELPERS_SCRIPT = HERE / "scripts" / "helpers_run.py"


def gone(pids: list[int], timeout: float) -> list[int]:
    """Wait (pidfds, no polling) up to ``timeout`` in all for these processes to end; return those that did
    not, after killing them so that the test leaves nothing behind."""
    deadline = time.monotonic() + timeout
    left = []
    for pid in pids:
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            continue
        try:
            ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        finally:
            os.close(fd)
        if not ready:
            left.append(pid)
            os.kill(pid, signal.SIGKILL)
    return left


def no_cgroups() -> str | None:
    """Why this machine gives fedsup no cgroup for task processes, or None where it does."""
    probe = Cgroups()
    probe.close()
    return probe.reason


def pids_of(folder: str, task_id: str) -> list[int]:
    return [int(p) for p in Path(folder, f"{task_id}.pids").read_text().split()]


@pytest.fixture(params=[True, False], ids=["with-cgroups", "subreapers-only"])
def cgroups(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[bool]:
    """Each containment test runs with cgroups (where this machine has them) and with them turned off: the
    subreapers and process groups must hold on their own."""
    reason = no_cgroups() if request.param else None
    if reason is not None:
        pytest.skip(f"no cgroup for task processes here: {reason}")
    monkeypatch.setattr(launch, "CGROUPS", request.param)
    yield request.param


def _no_cgroup_left() -> None:
    base = _own_cgroup()
    if base is not None:
        assert not list(base.glob(f"fedsup-{os.getpid()}-*")), "cgroup folders left behind by the run"


def _memory_cgroup_parent() -> Path | None:
    """Where this process may make a memory cgroup: its own, in cgroup v1's memory hierarchy or in v2's."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controllers == "memory" and Path("/sys/fs/cgroup/memory").is_dir():
            return Path("/sys/fs/cgroup/memory") / path.lstrip("/")
        if controllers == "" and Path("/sys/fs/cgroup/cgroup.controllers").exists():
            own = Path("/sys/fs/cgroup") / path.lstrip("/")
            if "memory" in (own / "cgroup.subtree_control").read_text().split():
                return own
    return None


@pytest.fixture
def memory_cgroup() -> Iterator[Path]:
    """A memory cgroup of 64 MiB, no swap, for a task process to join; removed after the test."""
    parent = _memory_cgroup_parent()
    if parent is None:
        pytest.skip("no memory cgroup controller this process can use")
    folder = parent / f"fedsup-test-oom-{os.getpid()}"
    try:
        folder.mkdir()
    except OSError as exc:
        pytest.skip(f"cannot make a memory cgroup under {parent}: {exc.strerror}")
    try:
        v1 = (folder / "memory.limit_in_bytes").exists()
        limits = ["memory.limit_in_bytes", "memory.memsw.limit_in_bytes"] if v1 else ["memory.max", "memory.swap.max"]
        for name in limits:
            if (folder / name).exists():
                (folder / name).write_text(str(64 << 20) if "swap" not in name else "0")
        yield folder
    finally:
        folder.rmdir()  # the OOM-killed process has left it: a test that leaves one in it fails here


def oom_kills(folder: Path) -> int:
    """How many processes the kernel's OOM killer ended in this memory cgroup (v1 or v2)."""
    for name in ("memory.events", "memory.oom_control"):
        if (folder / name).exists():
            fields = dict(line.split() for line in (folder / name).read_text().splitlines())
            return int(fields.get("oom_kill", 0))
    return 0


# ---------------------------------------------------------------- nothing a task starts outlives it


@pytest.mark.timeout(120)
def test_a_task_s_helper_and_setsid_daemon_end_with_its_process(markers: str, cgroups: bool) -> None:
    # one process per task, one at a time: "check" starts only once the process of "daemons" has gone
    tasks = [toys.Daemons("daemons", markers), toys.StillAlive("check", markers, "daemons")]
    first, check = Supervisor("cpu", cpus=1, max_loaded=1, max_retries=0, tasks_per_process=1).run(tasks)
    left = gone(pids_of(markers, "daemons"), timeout=10)  # first: a failing test leaves nothing behind either
    assert first.status is S.FINISHED and check.status is S.FINISHED, (first.error, check.error)
    assert check.result["pid"] != first.result["pid"]
    assert check.result["alive"] == [], "the task's helper or daemon outlived its process"
    assert left == []
    _no_cgroup_left()


@pytest.mark.timeout(120)
def test_a_reused_process_ends_the_last_task_s_setsid_daemon(markers: str, cgroups: bool) -> None:
    tasks = [toys.Daemons("daemons", markers), toys.StillAlive("check", markers, "daemons")]
    first, check = Supervisor("cpu", cpus=1, max_loaded=1, max_retries=0, tasks_per_process=2).run(tasks)
    left = gone(pids_of(markers, "daemons"), timeout=10)
    assert first.status is S.FINISHED and check.status is S.FINISHED, (first.error, check.error)
    assert check.result["pid"] == first.result["pid"]  # the process went on to the next task
    assert check.result["alive"] == [], "the last task's helper or daemon outlived it"
    assert left == []


@pytest.mark.timeout(120)
def test_a_setsid_daemon_is_gone_after_a_successful_federated_run(tmp_path: Path, markers: str,
                                                                    cgroups: bool) -> None:
    # kept loaded between rounds (the daemons live with their loaded client), ended with the run
    data = {"name": "daemons", "seed": 1, "task": {"class": "toys:DaemonClient", "args": {"folder": markers}},
            "federation": {"clients": 2, "rounds": 2},
            "supervisor": {"devices": "cpu", "max_loaded": 2, "max_retries": 0}, "output": str(tmp_path / "run")}
    summary = fedsup.run(data)
    assert summary["rounds_completed"] == 2
    pids = [p for path in Path(markers).glob("*.pids") for p in map(int, path.read_text().split())]
    assert len(pids) == 2 * 2 * 2  # a helper and a daemon per client and round
    assert gone(pids, timeout=10) == [], "helpers or daemons of the clients outlived the run"


@pytest.mark.timeout(180)
def test_nothing_outlives_a_sigkill_of_the_supervisor(tmp_path: Path, fifo: Any) -> None:
    folder = tmp_path / "pids"
    folder.mkdir()
    proc = subprocess.Popen([sys.executable, str(HELPERS_SCRIPT), str(folder), fifo.path],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    family: list[psutil.Process] = []
    try:
        _, task, helper, daemon = fifo.lines(1, timeout=120, watch=[proc.stdout])[0].split()
        family = psutil.Process(proc.pid).children(recursive=True)  # the fork servers, the task process
        pids = [p.pid for p in family] + [int(task), int(helper), int(daemon)]
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        assert gone(pids, timeout=30) == [], "processes outlived the SIGKILLed supervisor"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for p in family:
            if p.is_running():
                p.kill()
        assert proc.stdout is not None and proc.stderr is not None
        proc.stdout.close()
        proc.stderr.close()


@pytest.mark.timeout(180)
def test_a_fork_server_killed_from_outside_takes_its_tasks_setsid_daemons_with_it(markers: str) -> None:
    """The subreaper dies with the server here: only the cgroup still holds the task's daemon."""
    reason = no_cgroups()
    if reason is not None:
        pytest.skip(f"no cgroup for task processes here: {reason}")
    [record] = Supervisor("cpu", max_retries=0).run([toys.Daemons("kills", markers, then="kill_server")])
    left = gone(pids_of(markers, "kills"), timeout=10)
    assert record.status is S.FINISHED and record.attempts == 2, record
    assert left == []


# ---------------------------------------------------------------- a stopped task, an OOM-killed one


@pytest.mark.timeout(120)
def test_a_task_that_stops_itself_is_killed_at_its_train_deadline_and_retried(markers: str) -> None:
    supervisor = Supervisor("cpu", cpus=1, max_loaded=2, max_retries=1, tasks_per_process=1, train_timeout=2)
    records = {r.task_id: r for r in supervisor.run([toys.StopsItself("stops", markers), toys.Ok("beside")])}
    assert all(r.status is S.FINISHED for r in records.values()), [(r.task_id, r.error) for r in records.values()]
    stopped = records["stops"].history[0]
    assert records["stops"].attempts == 2 and stopped.error is not None and stopped.error.kind == "timeout"
    assert stopped.pid is not None and not toys.alive(stopped.pid)
    assert records["beside"].attempts == 1


@pytest.mark.timeout(120)
def test_a_client_oom_killed_in_a_memory_cgroup_is_an_interrupt_not_a_failure(markers: str,
                                                                               memory_cgroup: Path) -> None:
    hog = toys.OutgrowsCgroup("hog", markers, str(memory_cgroup / "cgroup.procs"), 256 << 20)
    supervisor = Supervisor("cpu", cpus=1, max_loaded=2, max_retries=0, tasks_per_process=1)
    records = {r.task_id: r for r in supervisor.run([hog, toys.Ok("beside")])}
    assert oom_kills(memory_cgroup) == 1  # the kernel's OOM killer did it, not a test's kill
    assert all(r.status is S.FINISHED for r in records.values()), [(r.task_id, r.error) for r in records.values()]
    killed = records["hog"].history[0]
    assert killed.error is not None and killed.error.kind == "host_oom" and killed.error.signal == "SIGKILL"
    assert records["hog"].attempts == 2  # max_retries=0: an interrupt is requeued on its own budget


# ---------------------------------------------------------------- a stopped or dying fork server


@pytest.mark.timeout(180)
def test_a_stopped_fork_server_is_killed_and_replaced_and_the_run_finishes(markers: str) -> None:
    tasks = [toys.Ok("first"), toys.StopsServer("stops", markers), *(toys.Ok(f"after-{i}") for i in range(4))]
    supervisor = Supervisor("cpu", cpus=1, max_loaded=2, max_retries=0, tasks_per_process=1, load_timeout=2,
                            train_timeout=5, server_timeout=2)
    started = time.monotonic()
    records = supervisor.run(tasks)
    elapsed = time.monotonic() - started
    assert all(r.status is S.FINISHED for r in records), [(r.task_id, r.error) for r in records]
    stopped = next(r for r in records if r.task_id == "stops").result["stopped"]
    assert not toys.alive(stopped), "the stopped fork server is still there"
    later = [r.result["ppid"] for r in records if r.task_id.startswith("after-")]
    assert stopped not in later[-1:], "the last task should have come from a server that answers"
    # the server owed an answer 2 s after the stop; a warm-up of its replacement, the tasks themselves
    assert elapsed < 60, f"the run took {elapsed:.1f} s"


@pytest.mark.timeout(180)
def test_fork_servers_that_never_start_are_killed_and_replaced_on_their_own_budget(
        markers: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    serve = launch.server_main
    hung: list[int] = []

    def hangs_the_first_time(sock: Any, preload: list[str], parent: int, warm: bool = True,
                             root: str | None = None) -> None:
        # The first warm and the first cold server hang before they serve, as a deadlocked import would.
        if toys.first_time(markers, f"server-{'warm' if warm else 'cold'}"):
            launch.die_with_parent(parent)
            with open(os.path.join(markers, f"hung-{os.getpid()}"), "w"):
                pass
            while True:
                signal.pause()
        serve(sock, preload, parent, warm, root)

    monkeypatch.setattr(launch, "server_main", hangs_the_first_time)  # forked servers inherit it
    # the replacements must start within the same 2 s on a loaded machine: no warm-up to pay
    monkeypatch.setattr(launch, "warm_up", lambda preload: None)
    tasks = [toys.Ok(f"task-{i}") for i in range(3)]
    supervisor = Supervisor("cpu", cpus=1, max_loaded=2, max_retries=0, tasks_per_process=1,
                            server_start_timeout=2, max_infra_failures=2)
    with caplog.at_level("WARNING", logger="fedsup"):
        records = supervisor.run(tasks)
    # max_retries=0: a task asked of a server that never started is run again on the infrastructure's budget
    assert all(r.status is S.FINISHED for r in records), [(r.task_id, r.error) for r in records]
    lost = [a.error for r in records for a in r.history if a.error is not None]
    assert lost and all("did not start within 2 s" in e.message for e in lost), lost
    hung = [int(name.split("-")[1]) for name in os.listdir(markers) if name.startswith("hung-")]
    assert len(hung) == 2, os.listdir(markers)
    assert not [pid for pid in hung if toys.alive(pid)], "a fork server that never started is still there"
    assert not {r.result["ppid"] for r in records} & set(hung)
    assert sum("did not start within 2 s" in m for m in caplog.messages) == 2, caplog.messages


@pytest.mark.timeout(180)
@pytest.mark.parametrize(("sig", "twice"), [(signal.SIGTERM, False), (signal.SIGINT, True)],
                         ids=["sigterm", "ctrl-c-twice"])
def test_a_signal_ends_a_run_whose_fork_server_is_stopped(run_dir: Path, fifo: Any, sig: int, twice: bool) -> None:
    grace = 60.0 if twice else 0.5  # twice: only the second signal's kill ends it within the test's bound
    proc = subprocess.Popen([sys.executable, str(CTRL_C_SCRIPT), str(run_dir), fifo.path, str(grace)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    tree: list[psutil.Process] = []
    try:
        announced = dict(line.split() for line in fifo.lines(2, timeout=90, watch=[proc.stdout]))
        supervisor = psutil.Process(proc.pid)
        tree = [supervisor, *supervisor.children(recursive=True)]
        server = psutil.Process(int(next(iter(announced.values())))).ppid()
        os.kill(server, signal.SIGSTOP)
        started = time.monotonic()
        os.killpg(proc.pid, sig)
        if twice:
            os.killpg(proc.pid, sig)
        out, err = proc.communicate(timeout=90)
        elapsed = time.monotonic() - started
    finally:
        if proc.poll() is None:
            for p in tree:
                try:
                    p.kill()
                except psutil.NoSuchProcess:
                    pass
            proc.kill()
            proc.communicate()
    assert proc.returncode == 128 + sig, (proc.returncode, err[-3000:])
    assert "Traceback" not in err, err
    # grace, SIGTERM to SIGKILL (2 s), then the stopped server's reply deadline (10 s by default)
    assert elapsed < 45, f"the run took {elapsed:.1f} s to stop"
    assert not [p for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    report = json.loads(out.splitlines()[-1])
    assert {r["status"] for r in report["records"]} <= {"FINISHED", "CANCELLED"}


@pytest.mark.timeout(300)
def test_fork_server_deaths_spend_their_own_budget_not_max_retries(run_dir: Path, markers: str) -> None:
    [record] = Supervisor("cpu", max_retries=1, run_dir=run_dir).run([toys.KillsServer("client", markers, 7)])
    assert record.status is S.FINISHED, (record.reason, record.error)
    assert record.attempts == 8 and record.result["attempt"] == 8
    lost = record.history[:-1]
    assert all(a.status is S.CRASHED and a.error is not None and a.error.type == "InfrastructureDeath"
               for a in lost), [a.error for a in lost]
    assert "not charged to the task" in lost[0].error.message  # type: ignore[union-attr]
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    requeued = [e for e in events if e.get("task") == "client" and e["status"] == "INIT"]
    assert [e.get("infrastructure") for e in requeued] == list(range(1, 8))


@pytest.mark.timeout(300)
def test_an_exhausted_infrastructure_budget_fails_the_task_clearly(markers: str) -> None:
    [record] = Supervisor("cpu", max_retries=5, max_infra_failures=2).run([toys.KillsServer("client", markers, 7)])
    assert record.status is S.FAILED and record.attempts == 3
    assert record.reason is not None and "max_infra_failures=2" in record.reason, record.reason
    assert "infrastructure death 3" in record.reason


def test_the_infrastructure_budget_is_checked() -> None:
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="max_infra_failures"):
            Supervisor("cpu", max_infra_failures=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="server_timeout"):
        Supervisor("cpu", server_timeout=0)


# ---------------------------------------------------------------- SIGHUP


def _events(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines() if line.strip()]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["sigterm", "sighup"])
def test_sighup_stops_in_order_like_sigterm_and_the_run_resumes(tmp_path: Path, fifo: Any, sig: int) -> None:
    from fedsup.engine.rundir import read_record_lines

    go = tmp_path / "go"
    os.mkfifo(go)
    run = tmp_path / "run"
    data = {"name": "hangup", "seed": 3,
            "task": {"class": "fed_toys:HoldingClient",
                     "args": {"announce": fifo.path, "go": str(go), "hold_round": 2, "hold_client": 0}},
            "federation": {"clients": 3, "rounds": 3},
            "supervisor": {"devices": "cpu", "max_loaded": 3, "max_retries": 0, "grace_period": 0.5},
            "output": str(run)}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "fedsup", "run", str(path)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    family: list[psutil.Process] = []
    try:
        fifo.lines(1, timeout=120, watch=[proc.stdout])  # client 0 is training in round 2 and waits there
        family = psutil.Process(proc.pid).children(recursive=True)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, (proc.returncode, err[-3000:])  # interrupted, as for SIGTERM
    assert "Traceback" not in err, err
    assert gone([p.pid for p in family], timeout=30) == []
    # every record is where its task's last event says it is
    last: dict[str, str] = {}
    for event in _events(run):
        if "task" in event:
            last[event["task"]] = event["status"]
    records = {k: v for f in (run / "records").glob("*.jsonl") for k, v in read_record_lines(f)[0].items()}
    assert records and all(last[task] == r.status.value for task, r in records.items()), (last, records)
    assert "CANCELLED" in last.values()
    resumed = subprocess.run([*cmd, "--resume"], env=env, capture_output=True, text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((run / "summary.json").read_text())["rounds_completed"] == 3


@pytest.mark.timeout(120)
def test_sighup_interrupts_a_run_unless_it_is_ignored_as_under_nohup() -> None:
    task = toys.SignalsSupervisor("hangs-up", os.getpid(), signal.SIGHUP, block=True)  # only the stop ends it
    with pytest.raises(fedsup.RunInterrupted) as interrupted:
        Supervisor("cpu", max_retries=0, grace_period=0.5).run([task])
    assert interrupted.value.signum == signal.SIGHUP
    assert interrupted.value.records[0].status is S.CANCELLED
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        [record] = Supervisor("cpu", max_retries=0).run([toys.SignalsSupervisor("nohup", os.getpid(), signal.SIGHUP)])
    finally:
        signal.signal(signal.SIGHUP, previous)
    assert record.status is S.FINISHED


# ---------------------------------------------------------------- a spawn that finds its fork server dead


def _pidfd_wait(pid: int, timeout: float) -> None:
    fd = os.pidfd_open(pid)
    try:
        ready, _, _ = select.select([fd], [], [], timeout)
        assert ready, f"process {pid} still alive after {timeout} s"
    finally:
        os.close(fd)


@pytest.mark.timeout(120)
def test_children_lost_with_a_server_found_dead_at_spawn_are_reported_not_waited_on() -> None:
    """A spawn that finds its fork servers dead (killed from outside since the last wait) reports their
    children lost; the next wait must hand back those exits and never wait on the pipes it has just closed
    ("handle is closed", which once ended a run under chaos)."""
    launcher = launch.ForkServerLauncher()
    runtime = ProcessRuntime(launcher)
    launcher.start([])
    try:
        while not (launcher._warm is not None and launcher._warm.ready):  # then the warm server takes both
            runtime.wait([], timeout=60)
        first = runtime.spawn(ChildSpec("first"))
        assert first.server is launcher._warm
        os.kill(first.server.pid, signal.SIGKILL)
        _pidfd_wait(first.server.pid, timeout=30)
        second = runtime.spawn(ChildSpec("second"))
        events = runtime.wait([first, second], timeout=30)
        assert [(e.child, e.exit.cause) for e in events if isinstance(e, Exited)] == [
            (first, "the fork server died, and its task processes with it")]
        runtime.kill(second, signal.SIGKILL)
        while not any(isinstance(e, Exited) for e in runtime.wait([second], timeout=30)):
            pass
    finally:
        launcher.close()
        runtime.close()
    assert launcher.deaths == 1 and launcher.restarts == 1
