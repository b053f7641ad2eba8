"""The small modules: task states and their diagram, byte sizes, fault plans, records."""

from __future__ import annotations

import itertools
import json
import math

import pytest

from fedsup.engine.errors import ConfigError, TaskFailed
from fedsup.engine.faults import FAULT_KINDS, FaultPlan
from fedsup.engine.handle import TaskHandle
from fedsup.engine.records import AttemptRecord, ErrorInfo, PhaseRecord, TaskRecord
from fedsup.engine.states import (
    _ALLOWED,
    ATTEMPT_FAILED,
    LIVE,
    OUTCOMES,
    IllegalTransition,
    TaskStatus,
    allowed,
    check_transition,
)
from fedsup.engine.task import Task
from fedsup.engine.units import format_bytes, parse_bytes

S = TaskStatus
PAIRS = list(itertools.product(TaskStatus, TaskStatus))


class T(Task):
    def load(self) -> None:  # pragma: no cover
        pass

    def train(self, device: str):  # pragma: no cover
        return None


# ====================================================================== states


def test_str_is_the_bare_name():
    for status in TaskStatus:
        assert str(status) == status.name == status.value
        assert f"{status}" == status.name
    assert str(TaskStatus.TRAINING) == "TRAINING"
    assert TaskStatus("FAILED") is S.FAILED


def test_the_diagram_covers_every_status():
    assert set(_ALLOWED) == set(TaskStatus)
    for old, targets in _ALLOWED.items():
        assert targets <= set(TaskStatus)
        assert old not in targets, f"{old} -> {old} is not a change"
        assert allowed(old) == targets


@pytest.mark.parametrize("old", list(TaskStatus), ids=[s.name for s in TaskStatus])
def test_every_transition_is_allowed_exactly_when_the_diagram_says(old):
    """The full matrix, one row per starting status: every edge of ``_ALLOWED`` passes, every other raises."""
    wrong = []
    for new in TaskStatus:
        try:
            check_transition(old, new)
            passed = True
        except IllegalTransition as exc:
            passed = False
            assert str(exc) == f"{old.name} -> {new.name} is not an allowed transition"
        if passed != (new in _ALLOWED[old]):
            wrong.append(new.name)
    assert wrong == [], f"{old.name} -> {wrong}: check_transition disagrees with _ALLOWED"


@pytest.mark.parametrize("old", list(TaskStatus), ids=[s.name for s in TaskStatus])
def test_a_handle_only_moves_along_the_diagram(old):
    for new in TaskStatus:
        seen: list = []
        handle = TaskHandle(T("t"), 0, lambda h, a, b, info, seen=seen: seen.append((a, b, info)))
        handle.status = old
        if new in _ALLOWED[old]:
            handle.transition(new, why="test")
            assert handle.status is new and handle.task.status is new
            assert seen == [(old, new, {"why": "test"})]
        else:
            with pytest.raises(IllegalTransition):
                handle.transition(new)
            assert handle.status is old, "a refused transition changes nothing"
            assert seen == []


def test_the_matrix_has_both_kinds_of_pairs():
    allowed_pairs = sum(len(t) for t in _ALLOWED.values())
    assert 0 < allowed_pairs < len(PAIRS)


def test_outcomes_failed_and_cancelled_are_final():
    assert _ALLOWED[S.FAILED] == frozenset() and _ALLOWED[S.CANCELLED] == frozenset()
    assert OUTCOMES == {S.FINISHED, S.FAILED, S.CANCELLED}


def test_failed_attempts_requeue_fail_or_cancel():
    for status in ATTEMPT_FAILED:
        assert {S.INIT, S.FAILED, S.CANCELLED} <= _ALLOWED[status]


def test_the_main_path_and_the_failure_edges():
    path = [S.INIT, S.AVAILABLE, S.LOADING, S.WAITING, S.TRAINING, S.FINISHED]
    for a, b in zip(path, path[1:], strict=False):
        check_transition(a, b)
    check_transition(S.FINISHED, S.TRAINING)                      # the next federated round
    for live in (S.LOADING, S.TRAINING):
        for bad in (S.EXCEPTION, S.INTERRUPT, S.CRASHED, S.TIMEOUT, S.CANCELLED):
            check_transition(live, bad)
    for live in LIVE:
        check_transition(live, S.CRASHED)
        check_transition(live, S.CANCELLED)
    # a task that never ran cannot have finished, a finished one cannot fail
    for old, new in ((S.INIT, S.FINISHED), (S.INIT, S.TRAINING), (S.FINISHED, S.FAILED), (S.FAILED, S.INIT),
                     (S.CANCELLED, S.INIT), (S.WAITING, S.TIMEOUT), (S.WAITING, S.FINISHED)):
        with pytest.raises(IllegalTransition):
            check_transition(old, new)


def test_illegal_transition_is_a_runtime_error():
    assert issubclass(IllegalTransition, RuntimeError)


# ====================================================================== units


@pytest.mark.parametrize("value, expected", [
    ("512MiB", 512 * 1024**2),
    ("2GiB", 2 * 1024**3),
    ("1.5GB", 1_500_000_000),
    (1024, 1024),
    (" 3 kb ", 3000),
    ("3KB", 3000),
    ("1.5 GiB", 3 * 1024**3 // 2),
    ("0.5KiB", 512),
    (".5 KiB", 512),
    ("10", 10),
    ("10b", 10),
    ("7 B", 7),
    ("1TiB", 1024**4),
    ("2tb", 2 * 1000**4),
    ("4 mib", 4 * 1024**2),
    ("1k", 1000),
    ("0", 0),
    (0, 0),
    (1.9, 1),
    (None, 0),
])
def test_parse_bytes(value, expected):
    assert parse_bytes(value) == expected
    assert isinstance(parse_bytes(value), int)


@pytest.mark.parametrize("value", ["12 parsecs", "-1", True, False, [], "GiB", "", "  ", "1..5GB", "1 2 GB", -1, -0.5,
                                   {"memory": 1}, "5 GiBs", "1e3"])
def test_parse_bytes_errors_name_the_field_and_value(value):
    with pytest.raises(ConfigError) as info:
        parse_bytes(value, "estimate_memory")
    message = str(info.value)
    assert message.startswith("estimate_memory: "), message
    assert repr(value) in message, message


def test_parse_bytes_error_suggests_the_units():
    with pytest.raises(ConfigError, match=r"512MiB, 2GiB or 1.5GB \(units B, KB, MB, GB, TB, KiB, MiB, GiB, TiB\)"):
        parse_bytes("12 parsecs")


def test_parse_bytes_default_field_name():
    with pytest.raises(ConfigError, match="^size: "):
        parse_bytes("GiB")


def test_task_sizes_go_through_parse_bytes():
    t = T("t", estimate_memory="2GiB", estimate_cuda_memory="512MiB")
    assert (t.estimate_memory, t.estimate_cuda_memory) == (2 * 1024**3, 512 * 1024**2)
    with pytest.raises(ConfigError, match="^estimate_cuda_memory: .*'12 parsecs'"):
        T("t", estimate_cuda_memory="12 parsecs")
    with pytest.raises(ConfigError, match="^estimate_memory: .*True"):
        T("t", estimate_memory=True)


def test_parse_bytes_decimal_is_exact():
    assert parse_bytes("1.001KB") == 1001
    assert parse_bytes("1.001MB") == 1_001_000


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_parse_bytes_non_finite_is_a_config_error(value):
    with pytest.raises(ConfigError, match="^estimate_memory: "):
        parse_bytes(value, "estimate_memory")


@pytest.mark.parametrize("n, text", [
    (None, "-"), (0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (1536, "1.5 KiB"),
    (512 * 1024**2, "512.0 MiB"), (16 * 1024**3, "16.0 GiB"), (3 * 1024**4, "3.0 TiB"), (2048 * 1024**4, "2048.0 TiB"),
])
def test_format_bytes(n, text):
    assert format_bytes(n) == text


def test_format_then_parse_round_trips_whole_units():
    for n in (1024, 512 * 1024**2, 16 * 1024**3):
        assert parse_bytes(format_bytes(n).replace(" ", "")) == n


# ====================================================================== faults


def test_fault_pick_is_deterministic():
    plan = FaultPlan(probability=0.5, seed=3, kinds=FAULT_KINDS)
    picks = [plan.pick(f"t{i}", a, p, 0) for i in range(50) for a in (1, 2) for p in ("load", "train")]
    again = [FaultPlan(probability=0.5, seed=3, kinds=FAULT_KINDS).pick(f"t{i}", a, p, 0)
             for i in range(50) for a in (1, 2) for p in ("load", "train")]
    assert picks == again
    assert set(picks) - {None} <= set(FAULT_KINDS)
    assert len(set(picks)) > 2, "varied: several kinds and some None"


def test_fault_pick_depends_on_the_seed_task_attempt_phase_and_round():
    plan = FaultPlan(probability=0.5, seed=1, kinds=FAULT_KINDS)
    base = [plan.pick(f"t{i}", 1, "load", 0) for i in range(64)]
    assert base != [FaultPlan(probability=0.5, seed=2, kinds=FAULT_KINDS).pick(f"t{i}", 1, "load", 0)
                    for i in range(64)]
    assert base != [plan.pick(f"t{i}", 2, "load", 0) for i in range(64)]
    assert base != [plan.pick(f"t{i}", 1, "train", 0) for i in range(64)]
    assert base != [plan.pick(f"t{i}", 1, "load", 0, round_=1) for i in range(64)]


def test_fault_probability_is_roughly_respected():
    plan = FaultPlan(probability=0.3, seed=11)
    hits = sum(plan.pick(f"t{i}", 1, "train", 0) is not None for i in range(2000))
    assert 0.25 * 2000 < hits < 0.35 * 2000


def test_fault_probability_zero_and_one():
    never = FaultPlan(probability=0.0)
    always = FaultPlan(probability=1.0, kinds=("exit", "hang"))
    for i in range(200):
        assert never.pick(f"t{i}", 1, "load", 0) is None
        assert always.pick(f"t{i}", 1, "load", 0) in ("exit", "hang")


def test_fault_max_per_task():
    plan = FaultPlan(probability=1.0, max_per_task=2)
    assert plan.pick("t", 1, "load", 0) is not None
    assert plan.pick("t", 2, "train", 1) is not None
    assert plan.pick("t", 3, "load", 2) is None
    assert plan.pick("t", 3, "load", 7) is None
    assert FaultPlan(probability=1.0, max_per_task=0).pick("t", 1, "load", 0) is None


def test_fault_phases():
    plan = FaultPlan(probability=1.0, phases=("train",))
    assert plan.pick("t", 1, "load", 0) is None
    assert plan.pick("t", 1, "train", 0) is not None


def test_fault_defaults_leave_hang_out():
    plan = FaultPlan()
    assert "hang" not in plan.kinds and set(plan.kinds) < set(FAULT_KINDS)
    assert plan.phases == ("load", "train") and plan.max_per_task == 1 and 0 < plan.probability < 1


@pytest.mark.parametrize("kwargs, field", [
    ({"probability": -0.1}, "faults.probability"),
    ({"probability": 1.5}, "faults.probability"),
    ({"kinds": ("boom",)}, "faults.kinds"),
    ({"kinds": ("exception", "boom")}, "faults.kinds"),
    ({"kinds": ()}, "faults.kinds"),
    ({"phases": ("eval",)}, "faults.phases"),
    ({"max_per_task": -1}, "faults.max_per_task"),
])
def test_fault_plan_validates(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field}: "):
        FaultPlan(**kwargs)


def test_fault_plan_is_frozen():
    import dataclasses

    with pytest.raises(dataclasses.FrozenInstanceError):
        FaultPlan().probability = 1.0  # type: ignore[misc]


# ====================================================================== records


def _record(**kw) -> TaskRecord:
    load = PhaseRecord(phase="load", started=1000.0, duration=0.5, cpu_time=0.4, peak_memory=100)
    train = PhaseRecord(phase="train", device="cuda:1", started=1000.5, duration=2.0, cpu_time=1.9,
                        peak_memory=300, peak_gpu_memory=4096)
    error = ErrorInfo(kind="cuda_oom", type="torch.OutOfMemoryError", message="CUDA out of memory",
                      traceback="Traceback ...", phase="train", device="cuda:1", estimate_cuda_memory=1024,
                      stderr_tail=["line 1", "line 2"])
    history = [
        AttemptRecord(attempt=1, pid=11, device="cuda:1", status=S.INTERRUPT, started=1000.0, ended=1002.5,
                      load=load, train=train, error=error),
        AttemptRecord(attempt=2, pid=12, device="cuda:0", status=S.FINISHED, started=1003.0, ended=1005.0,
                      load=load, train=train.model_copy(update={"device": "cuda:0"})),
    ]
    fields = dict(task_id="client-7", status=S.FINISHED, attempts=2, device="cuda:0", result={"acc": 0.93, "n": 5},
                  duration=5.0, cpu_time=4.6, peak_memory=300, peak_gpu_memory=4096, estimate_memory=2048,
                  estimate_cuda_memory=1536, load=load, train=history[1].train, history=history)
    fields.update(kw)
    return TaskRecord(**fields)


def test_task_record_json_round_trip():
    record = _record()
    text = record.model_dump_json()
    back = TaskRecord.model_validate_json(text)
    assert back == record
    assert back.history[0].error.kind == "cuda_oom" and back.history[0].error.stderr_tail == ["line 1", "line 2"]
    assert back.status is S.FINISHED and back.history[0].status is S.INTERRUPT
    data = json.loads(text)
    assert data["status"] == "FINISHED" and data["history"][0]["status"] == "INTERRUPT"
    assert back.ok


def test_task_record_with_a_tensor_result_serialises_it_as_a_description():
    torch = pytest.importorskip("torch")
    record = _record(result={"weights": torch.zeros(3, 4), "loss": torch.tensor(0.25), "steps": [torch.ones(2)],
                             "bad": float("nan"), "tup": (1, 2)})
    data = json.loads(record.model_dump_json())
    assert data["result"] == {"weights": "<Tensor shape=[3, 4] dtype=torch.float32>", "loss": 0.25,
                              "steps": ["<Tensor shape=[2] dtype=torch.float32>"], "bad": "nan", "tup": [1, 2]}
    back = TaskRecord.model_validate_json(record.model_dump_json())
    assert back.result["weights"] == "<Tensor shape=[3, 4] dtype=torch.float32>"
    assert record.model_dump(mode="json")["result"]["loss"] == 0.25


def test_task_record_other_objects_serialise_by_repr():
    class Thing:
        def __repr__(self) -> str:
            return "<a thing>"

    data = json.loads(_record(result={1: Thing(), "inf": float("inf")}).model_dump_json())
    assert data["result"] == {"1": "<a thing>", "inf": "inf"}


def test_task_record_ignores_unknown_fields_when_read():
    data = json.loads(_record().model_dump_json())
    data["from_a_newer_version"] = 1
    assert TaskRecord.model_validate(data) == _record()


def test_raise_for_status():
    _record().raise_for_status()
    failed = _record(status=S.FAILED, error=ErrorInfo(kind="exception", type="ValueError", message="bad input",
                                                      traceback="Traceback (most recent call last):\nValueError"))
    assert not failed.ok
    with pytest.raises(TaskFailed) as info:
        failed.raise_for_status()
    assert "'client-7' failed after 2 attempt(s): ValueError: bad input" in str(info.value)
    assert info.value.record is failed
    assert "ValueError" in str(info.value.__cause__)


def test_a_record_written_with_the_kind_s_old_name_reads_as_contract():
    old = {"kind": "bad_result", "type": "fedsup.TaskContractError", "message": "key 'w' has shape [5]"}
    assert ErrorInfo.model_validate(old).kind == "contract"
    with pytest.raises(ValueError):
        ErrorInfo.model_validate({**old, "kind": "bad_results"})


def test_handle_to_record_aggregates_attempts():
    handle = TaskHandle(T("t", estimate_memory="1GiB", estimate_cuda_memory="2GiB"), 0)
    handle.transition(S.AVAILABLE)
    handle.begin_attempt(pid=5)
    handle.note_phase(PhaseRecord(phase="load", started=1.0, duration=1.0, cpu_time=0.5, peak_memory=10))
    handle.note_phase(PhaseRecord(phase="train", device="cuda:0", started=2.0, duration=1.0, cpu_time=0.75,
                                  peak_memory=30, peak_gpu_memory=99))
    handle.end_attempt(S.EXCEPTION, ErrorInfo(kind="exception", type="E", message="m"))
    handle.begin_attempt(pid=6)
    handle.note_phase(PhaseRecord(phase="load", started=3.0, duration=1.0, cpu_time=0.25, peak_memory=20))
    handle.end_attempt(S.FINISHED)
    record = handle.to_record()
    assert record.attempts == 2 and [a.attempt for a in record.history] == [1, 2]
    assert record.cpu_time == pytest.approx(1.5)
    assert record.peak_memory == 30 and record.peak_gpu_memory == 99
    assert record.device is None                                 # the last attempt never got a device
    assert record.history[0].device == "cuda:0" and record.history[0].status is S.EXCEPTION
    assert record.load.started == 3.0 and record.train is None   # the last attempt's phases
    assert record.estimate_memory == 1024**3 and record.estimate_cuda_memory == 2 * 1024**3
    assert record.duration is not None and record.duration >= 0
    # the record is a copy: later changes to the handle do not leak into it
    handle.history[0].status = S.CRASHED
    assert record.history[0].status is S.EXCEPTION
