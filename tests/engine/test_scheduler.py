"""The scheduler driven by a fake runtime: placement, bounds, retries, timeouts, shutdown. No processes."""

from __future__ import annotations

import json
import signal

import pytest
from fakes import (
    Behaviour,
    Deadlock,
    FakeRuntime,
    GiB,
    MiB,
    die,
    fail,
    hang,
    max_overlap,
    max_weighted_overlap,
    ok,
)

from fedsup.engine.devices import Device, Inventory
from fedsup.engine.errors import ConfigError
from fedsup.engine.faults import FaultPlan
from fedsup.engine.launch import ExitInfo
from fedsup.engine.messages import Exit, Load, PhaseDone, Train
from fedsup.engine.records import PhaseRecord
from fedsup.engine.rundir import RunDir
from fedsup.engine.runtime import Exited, Message, Signalled
from fedsup.engine.scheduler import _KILL_WAIT, Policy, Scheduler
from fedsup.engine.states import OUTCOMES, TaskStatus
from fedsup.engine.task import Task

S = TaskStatus


class T(Task):
    """A task that is never run for real: the fake runtime plays its process."""

    def load(self) -> None:  # pragma: no cover - never called
        pass

    def train(self, device: str):  # pragma: no cover - never called
        return None


def gpus(*sizes: str, cores: int = 64) -> Inventory:
    return Inventory.from_spec([{"name": f"cuda:{i}", "memory": s} for i, s in enumerate(sizes)], cores=cores)


def make(inventory: Inventory | None = None, scripts=None, default=Behaviour(), host_memory=None, run_dir=None,
         **policy) -> tuple[Scheduler, FakeRuntime]:
    policy.setdefault("max_loaded", 4)
    rt = FakeRuntime(scripts, default)
    inv = inventory if inventory is not None else Inventory([], cores=4)
    return Scheduler(Policy(**policy), inv, rt, run_dir=run_dir, host_memory=host_memory), rt


def check_clean(sched: Scheduler, rt: FakeRuntime) -> None:
    """What must hold after every run: every process reaped, every reservation given back, every task done."""
    assert rt.live() == [], f"processes left behind: {rt.live()}"
    assert not sched.procs and not sched.ready and not sched.waiting
    assert sched.training == 0
    for device in sched.inventory.devices:
        assert device.reservations == {}, device
        assert device.pids == {}, device
    assert sched.inventory.cpu.used_cores == 0
    assert all(h.status in OUTCOMES for h in sched.handles)


def run(tasks, **kw):
    sched, rt = make(**kw)
    records = sched.run(tasks)
    check_clean(sched, rt)
    assert [r.task_id for r in records] == [t.task_id for t in tasks], "records come back in input order"
    return {r.task_id: r for r in records}, rt, sched


def statuses(record) -> list[TaskStatus]:
    return [a.status for a in record.history]


# ====================================================================== placement


def test_two_16gib_devices_hold_at_most_two_6gib_tasks_each():
    tasks = [T(f"t{i}", estimate_cuda_memory="6GiB") for i in range(10)]
    # uneven training times, so the schedule is not lock-step
    records, rt, _ = run(tasks, inventory=gpus("16GiB", "16GiB"), max_loaded=10,
                         default=lambda tid, attempt: Behaviour(train=ok(1.0 + int(tid[1:]) % 3)))
    assert all(r.status is S.FINISHED and r.attempts == 1 for r in records.values())
    for name in ("cuda:0", "cuda:1"):
        spans = [(i.start, i.end) for i in rt.intervals if i.device == name]
        assert max_overlap(spans) == 2, name       # never more than 2, and the room was used
    assert rt.max_training_per_device == {"cuda:0": 2, "cuda:1": 2}
    assert max_overlap([(i.start, i.end) for i in rt.intervals]) == 4
    assert len(rt.sends(Train)) == 10
    assert {r.device for r in records.values()} == {"cuda:0", "cuda:1"}


def test_train_command_names_the_device_and_makes_it_cuda_0_in_the_child():
    records, rt, _ = run([T("a", estimate_cuda_memory="1GiB", device="cuda:1")], inventory=gpus("8GiB", "8GiB"))
    (train,) = [e.what for e in rt.sends(Train)]
    assert (train.device, train.local_device, train.cuda_visible) == ("cuda:1", "cuda:0", "1")
    assert records["a"].device == "cuda:1"


def test_the_freest_device_is_chosen():
    inv = Inventory([Device("cuda:0", "cuda", 8 * GiB, index=0, described=True),
                     Device("cuda:1", "cuda", 16 * GiB, index=1, described=True)], cores=8)
    tasks = [T(f"t{i}", estimate_cuda_memory="4GiB") for i in range(3)]
    _, rt, _ = run(tasks, inventory=inv, default=Behaviour(train=ok(10)))
    # room (total - reservations - 256 MiB margin; each task reserves 4 GiB + a 768 MiB context):
    # cuda:1 15.75 -> 11.0 -> 6.25 GiB; cuda:0 7.75 GiB: so cuda:1, cuda:1, then cuda:0
    assert [e.what.device for e in rt.sends(Train)] == ["cuda:1", "cuda:1", "cuda:0"]
    assert len({e.time for e in rt.sends(Train)}) == 1, "all three fit at once"


def test_equal_devices_take_turns():
    _, rt, _ = run([T(f"t{i}", estimate_cuda_memory="1GiB") for i in range(4)], inventory=gpus("16GiB", "16GiB"),
                   default=Behaviour(train=ok(5)))
    assert [e.what.device for e in rt.sends(Train)] == ["cuda:0", "cuda:1", "cuda:0", "cuda:1"]


def test_a_task_larger_than_every_device_fails_at_once_without_a_process():
    inv = gpus("8GiB", "16GiB")
    records, rt, _ = run([T("big", estimate_cuda_memory="20GiB"), T("small", estimate_cuda_memory="1GiB")],
                         inventory=inv)
    big = records["big"]
    assert big.status is S.FAILED
    assert big.attempts == 0 and big.history == []
    assert big.error is not None and big.error.kind == "placement" and big.error.type == "PlacementError"
    for part in ("20.0 GiB", "cuda:1", "16.0 GiB", "15.0 GiB"):   # 16 GiB - 256 MiB margin - 768 MiB context
        assert part in big.error.message, (part, big.error.message)
    assert big.estimate_cuda_memory == 20 * GiB
    assert rt.entries("spawn", "big") == [] and rt.entries("send", "big") == []
    assert records["small"].status is S.FINISHED


def test_placement_boundary_is_the_capacity():
    inv = gpus("16GiB")
    cap = inv.capacity(inv.gpus[0])
    assert cap == 16 * GiB - 256 * MiB - 768 * MiB
    records, rt, _ = run([T("fits", estimate_cuda_memory=cap), T("over", estimate_cuda_memory=cap + 1)],
                         inventory=inv)
    assert records["fits"].status is S.FINISHED
    assert records["over"].status is S.FAILED and records["over"].error.kind == "placement"
    assert rt.spawn_times("over") == []


def test_a_task_larger_than_host_memory_fails_at_once():
    records, rt, _ = run([T("big", estimate_memory="64GiB")], host_memory=8 * GiB)
    assert records["big"].status is S.FAILED
    assert records["big"].error.kind == "placement"
    assert "64.0 GiB" in records["big"].error.message and "8.0 GiB" in records["big"].error.message
    assert rt.log == []


def test_a_pinned_task_goes_only_to_its_device():
    tasks = [T(f"p{i}", estimate_cuda_memory="6GiB", device="cuda:1") for i in range(5)]
    records, rt, _ = run(tasks, inventory=gpus("16GiB", "16GiB"), max_loaded=5)
    assert {e.what.device for e in rt.sends(Train)} == {"cuda:1"}
    assert {e.what.cuda_visible for e in rt.sends(Train)} == {"1"}
    assert rt.max_training_per_device == {"cuda:1": 2}, "the idle cuda:0 is not used, cuda:1 stays bounded"
    assert all(r.status is S.FINISHED and r.device == "cuda:1" for r in records.values())


def test_a_task_pinned_to_the_cpu_trains_on_the_cpu_of_a_gpu_machine():
    _, rt, _ = run([T("c", device="cpu", estimate_cuda_memory="1GiB")], inventory=gpus("16GiB"))
    (train,) = [e.what for e in rt.sends(Train)]
    assert (train.device, train.local_device, train.cuda_visible) == ("cpu", "cpu", None)


def test_an_unknown_pin_is_a_config_error_before_anything_starts():
    sched, rt = make(inventory=gpus("16GiB", "16GiB"))
    with pytest.raises(ConfigError) as info:
        sched.run([T("ok"), T("x", device="cuda:7")])
    assert "'cuda:7'" in str(info.value) and "cuda:0" in str(info.value) and "cuda:1" in str(info.value)
    assert rt.log == []


def test_duplicate_ids_and_non_tasks_are_refused():
    sched, _ = make()
    with pytest.raises(ValueError, match="'a' appears more than once"):
        sched.run([T("a"), T("a")])
    sched, _ = make()
    with pytest.raises(TypeError, match="expected fedsup.Task"):
        sched.run(["not a task"])


def test_cpu_tasks_never_use_more_cores_than_there_are():
    cpus = [1, 2, 3, 1, 2, 4, 1, 1, 3, 2, 1, 2]
    tasks = [T(f"c{i}", cpus=n) for i, n in enumerate(cpus)]
    records, rt, _ = run(tasks, inventory=Inventory([], cores=4), max_loaded=8,
                         default=lambda tid, attempt: Behaviour(train=ok(0.5 + int(tid[1:]) % 4)))
    assert all(r.status is S.FINISHED for r in records.values())
    used = max_weighted_overlap([(i.start, i.end, i.cpus) for i in rt.intervals])
    assert used == 4                      # full, never over
    assert rt.max_cpus_training == 4
    assert {i.device for i in rt.intervals} == {"cpu"}


def test_gpu_tasks_count_their_cpus_too():
    tasks = [T(f"g{i}", cpus=2, estimate_cuda_memory="1GiB") for i in range(6)]
    _, rt, _ = run(tasks, inventory=gpus("16GiB", "16GiB", cores=4), max_loaded=6)
    assert max_overlap([(i.start, i.end) for i in rt.intervals]) == 2
    assert rt.max_cpus_training == 4


def test_max_training_bounds_training():
    tasks = [T(f"c{i}") for i in range(8)]
    _, rt, _ = run(tasks, inventory=Inventory([], cores=16), max_loaded=8, max_training=3)
    assert max_overlap([(i.start, i.end) for i in rt.intervals]) == 3
    assert rt.max_training == 3


def test_loading_overlaps_training():
    tasks = [T(f"t{i}") for i in range(4)]
    _, rt, _ = run(tasks, inventory=Inventory([], cores=16), max_loaded=4, max_training=1,
                   default=Behaviour(load=ok(0.5), train=ok(2.0)))
    loads = sorted(e.time for e in rt.sends(Load))
    trains = sorted(e.time for e in rt.sends(Train))
    assert loads == [0.0] * 4, "all four load at once"
    assert trains == [0.5, 2.5, 4.5, 6.5], "one trains at a time, each as soon as the last one is done"


def test_max_loaded_bounds_live_processes_at_every_moment():
    # failures make processes exit late (a detached process still counts until it is gone)
    def script(tid: str, attempt: int) -> Behaviour:
        n = int(tid[1:])
        if n % 3 == 0 and attempt == 1:
            return Behaviour(train=fail(duration=0.25), exit=ok(1.5))
        return Behaviour(load=ok(0.25 * (n % 4)), train=ok(1.0 + n % 2), exit=ok(0.75))

    tasks = [T(f"t{i}") for i in range(12)]
    records, rt, _ = run(tasks, inventory=Inventory([], cores=2), max_loaded=3, default=script)
    assert all(r.status is S.FINISHED for r in records.values())
    assert max_overlap(rt.live_intervals()) == 3
    assert rt.max_live == 3
    assert len(rt.entries("spawn")) == 12 + 4


def test_host_memory_bounds_what_is_loaded():
    tasks = [T(f"t{i}", estimate_memory="3GiB") for i in range(4)]
    _, rt, sched = run(tasks, inventory=Inventory([], cores=8), max_loaded=8, host_memory=7 * GiB,
                       default=Behaviour(train=ok(1.0)))
    first = rt.spawn_times("t0") + rt.spawn_times("t1")
    assert first == [0.0, 0.0]
    assert rt.spawn_times("t2")[0] > 0.0, "a third 3 GiB process does not fit in 7 GiB"


def test_host_memory_is_given_back_when_a_finished_task_exits():
    tasks = [T(f"t{i}", estimate_memory="4GiB") for i in range(6)]
    sched, rt = make(inventory=Inventory([], cores=8), max_loaded=6, host_memory=8 * GiB,
                     default=Behaviour(load=ok(0.5), train=ok(1.0)))
    sched.run(tasks)
    # two 4 GiB tasks fit in 8 GiB: they should go two by two, three rounds
    assert [rt.spawn_times(f"t{i}")[0] for i in range(6)] == [0.0, 0.0, 1.5, 1.5, 3.0, 3.0]
    assert sched.host_reserved == 0


# ====================================================================== retries


def test_an_exception_spends_max_retries_then_fails():
    records, rt, _ = run([T("t")], max_retries=2, default=Behaviour(train=fail("exception", message="boom")))
    r = records["t"]
    assert r.status is S.FAILED
    assert r.attempts == 3 == rt.attempts["t"]
    assert statuses(r) == [S.EXCEPTION] * 3
    assert r.error.kind == "exception" and r.error.message == "boom" and r.error.phase == "train"
    assert r.error.traceback is not None
    assert [a.attempt for a in r.history] == [1, 2, 3]
    assert all(a.error is not None and a.error.kind == "exception" for a in r.history)


def test_max_retries_zero_means_one_attempt():
    records, _, _ = run([T("t")], max_retries=0, default=Behaviour(load=fail()))
    assert records["t"].status is S.FAILED and records["t"].attempts == 1


def test_fails_first_succeeds_second():
    records, rt, _ = run([T("t")], max_retries=1,
                         scripts={"t": [Behaviour(train=fail()), Behaviour(train=ok(result={"acc": 0.9}))]})
    r = records["t"]
    assert r.status is S.FINISHED and r.attempts == 2
    assert statuses(r) == [S.EXCEPTION, S.FINISHED]
    assert r.error is None and r.result == {"acc": 0.9}
    assert r.history[0].error.kind == "exception"
    # the failed process was told to exit; the next attempt is a new process
    assert [type(e.what) for e in rt.entries("send", "t") if e.attempt == 1] == [Load, Train, Exit]
    assert rt.attempts["t"] == 2


def test_a_load_failure_never_trains():
    records, rt, _ = run([T("t")], max_retries=1, scripts={"t": [Behaviour(load=fail()), Behaviour()]})
    assert statuses(records["t"]) == [S.EXCEPTION, S.FINISHED]
    assert records["t"].history[0].error.phase == "load"
    assert [type(e.what) for e in rt.entries("send", "t") if e.attempt == 1] == [Load, Exit]


def test_records_sum_cpu_time_and_keep_the_peak():
    scripts = {"t": [Behaviour(load=ok(0.5, peak_memory=100), train=fail(duration=1.0)),
                     Behaviour(load=ok(0.5, peak_memory=300), train=ok(2.0, peak_memory=200))]}
    records, _, _ = run([T("t")], scripts=scripts)
    r = records["t"]
    assert r.cpu_time == pytest.approx((0.5 + 1.0 + 0.5 + 2.0) / 2)   # the fake's cpu_time is half the wall time
    assert r.peak_memory == 300
    assert r.load.duration == 0.5 and r.train.duration == 2.0        # the last attempt's phases
    assert r.history[0].train.phase == "train"


def _snapshot_reservations(sched: Scheduler, rt: FakeRuntime) -> list[int]:
    seen: list[int] = []

    def hook(entry):
        if isinstance(entry.what, Train):
            seen.append(sum(sum(d.reservations.values()) for d in sched.inventory.gpus))
    rt.on_send = hook
    return seen


def test_cuda_oom_grows_the_estimate_up_to_the_largest_capacity_then_fails(tmp_path):
    inv = gpus("16GiB")
    cap = inv.capacity(inv.gpus[0])
    run_dir = RunDir(tmp_path / "run")
    sched, rt = make(inventory=inv, max_retries=0, max_interrupts=10, run_dir=run_dir,
                     default=Behaviour(train=fail("cuda_oom")))
    reserved = _snapshot_reservations(sched, rt)
    (r,) = sched.run([T("t", estimate_cuda_memory="4GiB")])
    check_clean(sched, rt)
    run_dir.close()
    estimates = [4 * GiB, 6 * GiB, 9 * GiB, int(13.5 * GiB), cap]
    assert r.status is S.FAILED
    assert r.attempts == 5, "the OOMs did not spend max_retries=0; the cap ended it"
    assert statuses(r) == [S.INTERRUPT] * 5
    assert [a.error.estimate_cuda_memory for a in r.history] == estimates
    assert r.estimate_cuda_memory == cap
    assert reserved == [e + inv.context_memory for e in estimates], "each attempt reserves its grown estimate"
    events = [json.loads(line) for line in (run_dir.path / "events.jsonl").read_text().splitlines()]
    failed = [e for e in events if e["status"] == "FAILED"]
    assert len(failed) == 1
    assert "already at the largest device's capacity" in failed[0]["reason"]
    assert "15.0 GiB" in failed[0]["reason"]
    assert run_dir.read_record("t").status is S.FAILED


def test_cuda_oom_grows_by_at_least_256_mib():
    for start, grown in ((100 * MiB, 356 * MiB), (0, 256 * MiB), (GiB, 1536 * MiB)):
        records, _, _ = run([T("t", estimate_cuda_memory=start)], inventory=gpus("16GiB"), max_retries=0,
                            scripts={"t": [Behaviour(train=fail("cuda_oom")), Behaviour()]})
        r = records["t"]
        assert statuses(r) == [S.INTERRUPT, S.FINISHED]
        assert r.history[0].error.estimate_cuda_memory == start
        assert r.estimate_cuda_memory == grown


def test_enforced_memory_caps_a_gpu_task_at_its_current_estimate():
    # With enforce_memory, each TRAIN on a GPU carries the estimate the attempt was placed with (raised after
    # an OOM); on the CPU, and without enforce_memory, there is no cap.
    tasks = [T("g", estimate_cuda_memory="1GiB"), T("c", device="cpu", estimate_cuda_memory="1GiB")]
    _, rt, _ = run(tasks, inventory=gpus("16GiB"), enforce_memory=True,
                   scripts={"g": [Behaviour(train=fail("cuda_oom")), Behaviour()]})
    assert [e.what.cuda_limit for e in rt.sends(Train, "g")] == [GiB, 1536 * MiB]
    assert [e.what.cuda_limit for e in rt.sends(Train, "c")] == [None]
    _, rt, _ = run([T("g", estimate_cuda_memory="1GiB")], inventory=gpus("16GiB"))
    assert [e.what.cuda_limit for e in rt.sends(Train)] == [None]


def test_cuda_oom_growth_factor_is_the_policy_s():
    records, _, _ = run([T("t", estimate_cuda_memory="2GiB")], inventory=gpus("16GiB"), oom_growth=2.0,
                        scripts={"t": [Behaviour(train=fail("cuda_oom")), Behaviour()]})
    assert records["t"].estimate_cuda_memory == 4 * GiB


def test_cuda_oom_cap_is_the_largest_device_among_the_candidates():
    inv = gpus("8GiB", "32GiB")
    records, _, _ = run([T("t", estimate_cuda_memory="6GiB", device="cuda:0")], inventory=inv, max_interrupts=10,
                        default=Behaviour(train=fail("cuda_oom")))
    r = records["t"]
    assert r.status is S.FAILED
    assert r.estimate_cuda_memory == inv.capacity(inv.gpus[0]), "a pinned task's cap is its device"
    assert r.attempts == 2


def test_cuda_oom_at_the_cap_fails_at_once():
    inv = gpus("16GiB")
    records, _, _ = run([T("t", estimate_cuda_memory=inv.capacity(inv.gpus[0]))], inventory=inv,
                        default=Behaviour(train=fail("cuda_oom")))
    r = records["t"]
    assert r.status is S.FAILED and r.attempts == 1 and r.error.kind == "cuda_oom"


def test_max_interrupts_is_enforced_for_gpu_oom():
    records, _, _ = run([T("t", estimate_cuda_memory="1GiB")], inventory=gpus("80GiB"), max_interrupts=2,
                        max_retries=0, default=Behaviour(train=fail("cuda_oom")))
    r = records["t"]
    assert r.status is S.FAILED and r.attempts == 3
    assert statuses(r) == [S.INTERRUPT] * 3


def test_max_interrupts_is_enforced_for_host_oom():
    records, _, _ = run([T("t")], max_interrupts=1, max_retries=5, backoff=0.0,
                        default=Behaviour(load=fail("host_oom")))
    assert records["t"].status is S.FAILED and records["t"].attempts == 2
    assert records["t"].error.kind == "host_oom"


def test_host_oom_backs_off_doubling():
    scripts = {"t": [Behaviour(train=fail("host_oom"))] * 3 + [Behaviour()]}
    records, rt, _ = run([T("t")], scripts=scripts, backoff=1.0, max_retries=0, max_loaded=1)
    r = records["t"]
    assert statuses(r) == [S.INTERRUPT] * 3 + [S.FINISHED]
    failed_at = [e.time for e in rt.entries("message", "t") if type(e.what).__name__ == "PhaseFailed"]
    spawned = rt.spawn_times("t")
    assert failed_at == [1.5, 4.0, 7.5]                 # load 0.5 + train 1.0 after each spawn
    assert spawned == [0.0, 2.5, 6.0, 11.5]               # +1, +2, +4 seconds after each failure
    assert [s - f for f, s in zip(failed_at, spawned[1:], strict=True)] == [1.0, 2.0, 4.0]


def test_host_oom_backoff_is_capped():
    scripts = {"t": [Behaviour(load=fail("host_oom", duration=0.0))] * 4 + [Behaviour()]}
    _, rt, _ = run([T("t")], scripts=scripts, backoff=1.0, backoff_max=3.0, max_loaded=1)
    spawned = rt.spawn_times("t")
    assert [b - a for a, b in zip(spawned, spawned[1:], strict=False)] == [1.0, 2.0, 3.0, 3.0]


def test_a_backing_off_task_does_not_hold_up_the_others():
    scripts = {"a": [Behaviour(train=fail("host_oom")), Behaviour()]}
    _, rt, _ = run([T("a"), T("b")], scripts=scripts, backoff=10.0, max_loaded=1,
                   default=Behaviour(train=ok(1.0)))
    assert rt.spawn_times("b") == [1.5]
    assert rt.spawn_times("a") == [0.0, 11.5]


def test_a_sigkill_fedsup_did_not_send_is_host_oom():
    scripts = {"t": [Behaviour(train=die(signal=signal.SIGKILL, duration=0.25)), Behaviour()]}
    records, rt, _ = run([T("t")], scripts=scripts, max_retries=0, backoff=2.0)
    r = records["t"]
    assert statuses(r) == [S.CRASHED, S.FINISHED], "retried although max_retries=0: an interrupt"
    err = r.history[0].error
    assert err.kind == "host_oom" and err.signal == "SIGKILL" and err.phase == "train"
    assert err.exit_code is None and err.type == "ProcessCrashed"
    assert "did not send" in err.message
    assert rt.kills() == [], "fedsup sent no signal"
    assert rt.spawn_times("t") == [0.0, 0.75 + 2.0]       # died at 0.75, then the back-off


def test_sigsegv_is_a_crash():
    records, _, _ = run([T("t")], max_retries=1, default=Behaviour(train=die(signal=signal.SIGSEGV)))
    r = records["t"]
    assert r.status is S.FAILED and r.attempts == 2
    assert statuses(r) == [S.CRASHED, S.CRASHED]
    assert r.error.kind == "crash" and r.error.signal == "SIGSEGV" and r.error.exit_code is None
    assert "segmentation fault" in r.error.message and "during train()" in r.error.message


def test_exit_code_3_is_a_crash():
    records, _, _ = run([T("t")], max_retries=0, default=Behaviour(load=die(code=3)))
    r = records["t"]
    assert r.status is S.FAILED and r.attempts == 1
    assert r.error.kind == "crash" and r.error.exit_code == 3 and r.error.signal is None
    assert r.error.phase == "load" and "code 3" in r.error.message


def test_an_unasked_exit_0_is_a_crash():
    records, _, _ = run([T("t")], max_retries=0, default=Behaviour(train=die(code=0)))
    assert records["t"].error.kind == "crash" and records["t"].error.exit_code == 0
    assert "without being told to" in records["t"].error.message


def test_other_signals_are_crashes_that_name_the_signal():
    records, _, _ = run([T("t")], max_retries=0, default=Behaviour(train=die(signal=signal.SIGABRT)))
    assert records["t"].error.kind == "crash" and records["t"].error.signal == "SIGABRT"
    assert "SIGABRT" in records["t"].error.message


def test_load_timeout_kills_with_sigkill_and_ends_the_attempt_timeout():
    records, rt, _ = run([T("t")], load_timeout=5.0, max_retries=1, default=Behaviour(load=hang()))
    r = records["t"]
    assert r.status is S.FAILED and r.attempts == 2
    assert statuses(r) == [S.TIMEOUT, S.TIMEOUT]
    assert rt.kills("t") == [(5.0, signal.SIGKILL), (10.0, signal.SIGKILL)]
    assert rt.spawn_times("t") == [0.0, 5.0]
    assert r.error.kind == "timeout" and r.error.type == "Timeout" and r.error.phase == "load"
    assert r.error.signal == "SIGKILL"
    assert "load() ran past its 5 s timeout" in r.error.message


def test_train_timeout_counts_from_the_train_command():
    scripts = {"t": [Behaviour(load=ok(2.0), train=hang()), Behaviour()]}
    records, rt, _ = run([T("t")], scripts=scripts, train_timeout=3.0, load_timeout=2.5)
    r = records["t"]
    assert statuses(r) == [S.TIMEOUT, S.FINISHED]
    assert rt.kills("t") == [(5.0, signal.SIGKILL)]
    assert "train() ran past its 3 s timeout" in r.history[0].error.message


def test_a_phase_that_ends_in_time_is_not_killed():
    records, rt, _ = run([T("t")], load_timeout=1.0, train_timeout=3.0,
                         default=Behaviour(load=ok(1.0), train=ok(2.75)))
    assert records["t"].status is S.FINISHED and rt.kills() == []


def test_load_done_racing_its_timeout_kill():
    sched, rt = make(load_timeout=5.0, default=Behaviour(load=hang()))
    sched.submit([T("t")])
    sched.admit()
    (child,) = rt.children
    for event in rt.wait(list(sched.procs), 0):  # the child's "began": the load deadline counts from here
        sched.handle_event(event)
    rt.clock = 5.0
    sched.check_deadlines()
    assert rt.kills() == [(5.0, signal.SIGKILL)]
    # the child finished its load just as the SIGKILL landed: the message is read before the exit
    record = PhaseRecord(phase="load", started=0.0, duration=5.0, cpu_time=1.0)
    sched.handle_event(Message(child, PhaseDone("load", record)))
    sched.handle_event(Exited(child, ExitInfo(None, signal.SIGKILL)))
    handle = sched.handles[0]
    assert handle.history[0].status is S.TIMEOUT
    assert handle.status is S.INIT and handle in sched.ready


def test_load_done_racing_its_timeout_kill_across_two_waits():
    sched, rt = make(load_timeout=5.0, default=Behaviour(load=hang()))
    sched.submit([T("t")])
    sched.admit()
    (child,) = rt.children
    for event in rt.wait(list(sched.procs), 0):  # the child's "began": the load deadline counts from here
        sched.handle_event(event)
    rt.clock = 5.0
    sched.check_deadlines()
    record = PhaseRecord(phase="load", started=0.0, duration=5.0, cpu_time=1.0)
    sched.handle_event(Message(child, PhaseDone("load", record)))   # first wait(): the message alone
    sched.dispatch()                                                # the next pass places it
    sched.handle_event(Exited(child, ExitInfo(None, signal.SIGKILL)))  # second wait(): the exit
    attempt = sched.handles[0].history[0]
    assert attempt.status is S.TIMEOUT and attempt.error.phase == "load"


# ====================================================================== faults


def test_injected_faults_are_staged_once_per_task_and_recovered_from():
    plan = FaultPlan(probability=1.0, kinds=("exception",), max_per_task=1)
    tasks = [T(f"t{i}") for i in range(4)]
    records, rt, _ = run(tasks, faults=plan, max_retries=1)
    for t in tasks:
        r = records[t.task_id]
        assert statuses(r) == [S.EXCEPTION, S.FINISHED]
        assert "fault injected" in r.history[0].error.message
        assert [e.what.fault for e in rt.sends(Load, t.task_id)] == ["exception", None]
        assert [e.what.fault for e in rt.sends(Train, t.task_id)] == [None]


def test_injected_faults_follow_the_plan():
    plan = FaultPlan(probability=0.5, seed=7, kinds=("exception", "sigkill", "exit", "cuda_oom"), max_per_task=2)
    tasks = [T(f"t{i}") for i in range(20)]
    _, rt, _ = run(tasks, faults=plan, max_retries=10, max_interrupts=10, backoff=0.0, inventory=gpus("16GiB"))
    for t in tasks:
        injected = 0
        for attempt in range(1, rt.attempts[t.task_id] + 1):
            for phase, kind in (("load", Load), ("train", Train)):
                sent = [e.what for e in rt.sends(kind, t.task_id) if e.attempt == attempt]
                if sent:
                    expected = plan.pick(t.task_id, attempt, phase, injected)
                    assert sent[0].fault == expected, (t.task_id, attempt, phase)
                    injected += expected is not None
        assert injected <= 2


def test_injected_sigkill_is_an_interrupt_and_hang_a_timeout():
    records, rt, _ = run([T("k"), T("h")], load_timeout=4.0, backoff=0.0,
                         faults=FaultPlan(probability=1.0, kinds=("sigkill",), phases=("train",)),
                         scripts={"h": Behaviour(load=hang())})
    assert statuses(records["k"]) == [S.CRASHED, S.FINISHED]
    assert records["k"].history[0].error.kind == "host_oom"
    assert records["h"].status is S.FAILED and records["h"].error.kind == "timeout"


# ====================================================================== shutdown


def test_a_signal_cancels_the_queue_exits_the_live_and_escalates_to_sigterm():
    sched, rt = make(max_loaded=2, grace_period=5.0, default=Behaviour(train=ok(10.0)))
    rt.signal_at(1.0, signal.SIGINT)
    records = {r.task_id: r for r in sched.run([T(f"t{i}") for i in range(5)])}
    check_clean(sched, rt)
    assert sched.stop_signal == signal.SIGINT
    assert all(r.status is S.CANCELLED for r in records.values())
    for tid in ("t2", "t3", "t4"):
        assert records[tid].attempts == 0 and rt.spawn_times(tid) == []
    for tid in ("t0", "t1"):
        assert [e.time for e in rt.sends(Exit, tid)] == [1.0]
        assert rt.kills(tid) == [(6.0, signal.SIGTERM)], "SIGTERM after the grace period; it worked"
        assert statuses(records[tid]) == [S.CANCELLED]
    assert all(e.time <= 1.0 for e in rt.entries("spawn"))


def test_a_process_that_ignores_sigterm_gets_sigkill():
    sched, rt = make(max_loaded=2, grace_period=5.0, default=Behaviour(train=ok(100.0), ignore_sigterm=True))
    rt.signal_at(1.0, signal.SIGTERM)
    records = sched.run([T("a"), T("b")])
    check_clean(sched, rt)
    for tid in ("a", "b"):
        assert rt.kills(tid) == [(6.0, signal.SIGTERM), (6.0 + _KILL_WAIT, signal.SIGKILL)]
    assert all(r.status is S.CANCELLED for r in records)


def test_a_task_finishing_during_the_grace_period_keeps_finished():
    sched, rt = make(max_loaded=2, grace_period=5.0,
                     scripts={"quick": Behaviour(train=ok(2.0, result={"n": 1})), "slow": Behaviour(train=ok(50.0))})
    rt.signal_at(1.0, signal.SIGINT)
    records = {r.task_id: r for r in sched.run([T("quick"), T("slow")])}
    check_clean(sched, rt)
    assert records["quick"].status is S.FINISHED and records["quick"].result == {"n": 1}
    assert rt.kills("quick") == [], "it exited on the EXIT it was sent"
    assert records["slow"].status is S.CANCELLED
    assert rt.kills("slow") == [(6.0, signal.SIGTERM)]


def test_waiting_and_loading_tasks_are_cancelled_when_they_exit():
    scripts = {"a": Behaviour(train=ok(20.0)), "b": Behaviour(), "c": Behaviour(load=ok(3.0))}
    sched, rt = make(max_loaded=3, max_training=1, grace_period=5.0, scripts=scripts)
    rt.signal_at(1.0)
    records = {r.task_id: r for r in sched.run([T("a"), T("b"), T("c")])}
    check_clean(sched, rt)
    assert {k: r.status for k, r in records.items()} == {k: S.CANCELLED for k in "abc"}
    assert rt.kills("b") == [] and rt.kills("c") == [], "they exited when told"
    assert rt.sends(Train, "b") == [] and rt.sends(Train, "c") == []


def test_a_second_signal_kills_at_once():
    sched, rt = make(max_loaded=2, grace_period=5.0, default=Behaviour(train=ok(100.0)))
    rt.signal_at(1.0, signal.SIGINT)
    rt.signal_at(2.0, signal.SIGINT)
    records = sched.run([T("a"), T("b")])
    check_clean(sched, rt)
    assert rt.kills() == [(2.0, signal.SIGKILL), (2.0, signal.SIGKILL)]
    assert all(r.status is S.CANCELLED for r in records)


def test_a_task_backing_off_is_cancelled_and_not_started_again():
    sched, rt = make(backoff=30.0, scripts={"t": [Behaviour(train=fail("host_oom")), Behaviour()]})
    rt.signal_at(5.0)
    (r,) = sched.run([T("t")])
    check_clean(sched, rt)
    assert r.status is S.CANCELLED
    assert statuses(r) == [S.INTERRUPT]
    assert rt.spawn_times("t") == [0.0]
    assert rt.clock == 5.0, "the run ends at the signal, not after the back-off"


def test_handle_event_signalled_before_anything_runs():
    sched, rt = make()
    handles = sched.submit([T("a"), T("b")])
    sched.handle_event(Signalled(signal.SIGINT))
    assert all(h.status is S.CANCELLED for h in sched.handles)
    sched.run([])  # a new batch: the scheduler lets go of the handles that reached an outcome
    records = [h.to_record() for h in handles]
    assert [r.status for r in records] == [S.CANCELLED, S.CANCELLED]
    assert all(r.attempts == 0 for r in records)
    assert rt.log == []


def test_handle_event_signalled_mid_run_sends_exit_to_every_live_child():
    sched, rt = make(max_loaded=3, grace_period=2.0, default=Behaviour(train=ok(10.0)))
    sched.submit([T(f"t{i}") for i in range(5)])
    sched.admit()
    assert len(rt.children) == 3
    sched.handle_event(Signalled(signal.SIGTERM))
    assert [(e.task_id, e.time) for e in rt.sends(Exit)] == [("t0", 0.0), ("t1", 0.0), ("t2", 0.0)]
    assert [h.status for h in sched.handles[3:]] == [S.CANCELLED, S.CANCELLED]
    assert sched.stop_deadline == 2.0
    records = sched.run([])
    check_clean(sched, rt)
    # each loads (0.5 s), then handles EXIT: no kill needed
    assert rt.kills() == []
    assert all(r.status is S.CANCELLED for r in records)


# ====================================================================== robustness


def test_the_fake_detects_a_deadlock():
    rt = FakeRuntime()
    with pytest.raises(Deadlock):
        rt.wait([], None)
    assert rt.wait([], 2.5) == [] and rt.now() == 2.5


def test_the_fake_child_handles_commands_in_order_and_dies_for_good():
    from fedsup.engine.worker import ChildSpec

    rt = FakeRuntime(default=Behaviour(load=ok(1.0), train=ok(2.0)))
    child = rt.spawn(ChildSpec("t"))
    assert (child.conn, child.sentinel(), child.poll_exit(), child.attempt) == (None, None, None, 1)
    rt.send(child, Load(None))
    rt.send(child, Exit())                      # queued behind the load, as in a real pipe
    began = rt.wait([child], 10.0)              # the worker says it began before load() runs
    assert [type(e.message).__name__ for e in began] == ["Began"] and rt.now() == 0.0
    events = rt.wait([child], 10.0)
    assert rt.now() == 1.0
    assert [type(e).__name__ for e in events] == ["Message", "Message", "Exited"]
    assert isinstance(events[0].message, PhaseDone) and events[2].exit == ExitInfo(0, None)
    assert child.poll_exit() == ExitInfo(0, None)
    assert rt.send(child, Exit()) is False

    other = rt.spawn(ChildSpec("t"))
    assert other.attempt == 2
    rt.send(other, Load(None))
    other.kill(signal.SIGKILL)                  # "began" was out; the load's reply never comes
    assert [type(e).__name__ for e in rt.wait([other], 10.0)] == ["Message", "Exited"]
    assert other.exit == ExitInfo(None, signal.SIGKILL) and rt.now() == 1.0
    assert rt.kills() == [(1.0, signal.SIGKILL)]


def test_a_process_that_ignores_exit_after_its_task_does_not_block_the_run():
    scripts = {"a": Behaviour(exit=hang()), "b": Behaviour()}
    records, rt, _ = run([T("a"), T("b")], max_loaded=1, grace_period=5.0, scripts=scripts)
    assert records["a"].status is S.FINISHED
    assert records["b"].status is S.FINISHED
    assert rt.kills("a"), "a's process is killed once it outstays a grace period"
    assert rt.spawn_times("b")[0] <= 1.5 + 5.0 + _KILL_WAIT


def test_a_process_that_ignores_exit_is_killed_when_the_run_ends():
    records, rt, _ = run([T("t")], grace_period=5.0, default=Behaviour(exit=hang()))
    assert records["t"].status is S.FINISHED
    assert rt.kills("t") == [(1.5 + 5.0, signal.SIGTERM)]
