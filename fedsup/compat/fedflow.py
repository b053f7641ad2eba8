"""fedflow's API (``Task``, ``TaskStatus``, ``TaskGroup``, ``FedFlow``, ``Config``) on the fedsup engine.

A fedflow script runs here once its imports change: ``import fedflow`` becomes ``from fedsup.compat import
fedflow``, ``from fedflow import ...`` and ``from fedflow.config import Config`` become ``from
fedsup.compat.fedflow import ...``. The names, signatures and semantics are fedflow 0.2.1's; docs/migrating.md
lists what behaves differently.

Each group runs as one ``fedsup.Supervisor(...).run(...)``: a process per task, fedsup's retries and crash
classification, and a fedsup run directory. The group's directory (``<workdir>/<group name>``, fedflow's own
layout) is that run directory, so a task works in ``<workdir>/<group name>/tasks/<task id>``, beside its
``record.json`` and logs. When the group is done, each task's ``status``, ``result``, items and
``fedsup_record`` are filled in in this process, where the next group's tasks (an aggregate task holding the
trained ones) read them.

Importing this module does not import torch: the engine is imported when the first group runs.
"""

from __future__ import annotations

import copy
import difflib
import enum
import functools
import json
import logging
import os
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from fedsup.engine.errors import ConfigError
from fedsup.engine.states import TaskStatus as FedsupStatus
from fedsup.engine.task import Task as FedsupTask
from fedsup.engine.units import parse_bytes

if TYPE_CHECKING:
    from fedsup.engine.records import PhaseRecord, TaskRecord

__all__ = ["Config", "FedFlow", "Task", "TaskGroup", "TaskStatus", "supervisor_options"]

log = logging.getLogger(__name__)

TaskId = int | str
Size = int | str | None

# fedflow 0.2.1's resources/config.yaml: the keys it knows and their defaults.
DEFAULTS: dict[str, Any] = {
    "workdir": "res",
    "debug": False,
    "gpu-priority": {"stratety": "TOTAL-MEM", "reverse": False},  # sic: fedflow's spelling
    "utilization-limit": {"cpu": 0.8, "memory": 0.8, "cuda-memory": 0.8},
    "remain-limit": {"memory": "4GB", "cuda-memory": "2GB"},
    "task": {"directory-grouping": True, "allow-duplicate-id": True},
    "scheduler": {
        "default-memory": "2GB", "default-cuda-memory": "2GB", "auto-adjust": False, "max-waiting": 10,
        "max-process": 20, "interval": 60, "load-nretry": 3, "train-nretry": 3,
    },
    "smtp": {
        "enable": False, "server-host": "smtp.example.com", "server-port": 25, "user": "user@smtp.example.com",
        "password": "******", "receiver": "user@smtp.example.com", "min-interval": 3600, "max-numbers": 10,
    },
}

#: The section that takes any ``fedsup.Supervisor`` option by its own name (``fedsup.max_retries``).
FEDSUP_SECTION = "fedsup"

# Keys this module acts on itself rather than passing to the Supervisor.
_HANDLED_HERE = frozenset({"workdir", "task.directory-grouping", "task.allow-duplicate-id",
                           "scheduler.default-memory", "scheduler.default-cuda-memory"})
# Keys translated into Supervisor options (see supervisor_options).
_TRANSLATED = frozenset({"scheduler.max-process", "scheduler.load-nretry", "scheduler.train-nretry",
                         "remain-limit.cuda-memory", "utilization-limit.cpu"})


def _leaves(section: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for name, value in section.items():
        if isinstance(value, dict) and value:
            yield from _leaves(value, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", value


_DEFAULT_LEAVES: dict[str, Any] = dict(_leaves(DEFAULTS))
_SECTIONS = frozenset(name for name, value in DEFAULTS.items() if isinstance(value, dict))
_WARNED: set[str] = set()  # ignored keys already named in a warning, so that each is named once


@functools.cache
def _supervisor_option_names() -> frozenset[str]:
    import inspect

    from fedsup.engine.supervisor import Supervisor

    names = inspect.signature(Supervisor.__init__).parameters
    return frozenset(names) - {"self", "run_dir"}  # the run directory is the group's, set here


# ---------------------------------------------------------------- Config


def _unknown_key(key: str, where: str) -> ConfigError:
    known = [*_DEFAULT_LEAVES, *_SECTIONS, *(f"{FEDSUP_SECTION}.{n}" for n in sorted(_supervisor_option_names()))]
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"{where}unknown config key {key!r}{hint}; fedflow's keys are {', '.join(_DEFAULT_LEAVES)}, "
                       f"and fedsup.Supervisor options go under '{FEDSUP_SECTION}.' by their own names")


def _check(key: str, value: Any, where: str = "") -> None:
    """Raise ConfigError naming ``key`` unless fedflow or this module knows it."""
    if key == FEDSUP_SECTION or key in _SECTIONS:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}{key}: expected a mapping of keys, got {value!r}")
        for name, sub in value.items():
            _check(f"{key}.{name}", sub, where)
        return
    if key.startswith(f"{FEDSUP_SECTION}."):
        if key.removeprefix(f"{FEDSUP_SECTION}.") not in _supervisor_option_names():
            raise _unknown_key(key, where)
        return
    if key not in _DEFAULT_LEAVES:
        raise _unknown_key(key, where)


def _split(key: str) -> list[str]:
    if key is None or key.strip() == "":
        raise ValueError("key cannot be none or empty.")
    return key.split(".")


def _lookup(props: dict[str, Any], key: str) -> tuple[bool, Any]:
    value: Any = props
    for part in _split(key):
        if not isinstance(value, dict) or part not in value:
            return False, None
        value = value[part]
    return True, value


class Config:
    """fedflow's configuration: dotted keys (``scheduler.max-process``) over fedflow's defaults.

    As in fedflow, ``load(path)`` and ``set_config(d)`` replace what was set, ``set_property`` sets one key, and
    ``get_property`` reads what was set, else the default. Unlike fedflow, an unknown key is a ConfigError
    naming it; ``fedsup.<option>`` sets a ``fedsup.Supervisor`` option directly.
    """

    _props: dict[str, Any] = {}
    _readonly_props: dict[str, Any] = copy.deepcopy(DEFAULTS)

    @classmethod
    def load(cls, path: str | None = None) -> None:
        """Without ``path``, restore the defaults; with it, replace what was set by the YAML file's keys."""
        if path is None:
            cls._readonly_props = copy.deepcopy(DEFAULTS)
        else:
            props = _read_yaml(path)
            _check_all(props, where=f"{path}: ")
            cls._props = props
        workdir = cls.get_property("workdir")
        if workdir is not None:  # as fedflow: a relative workdir is fixed against the current directory now
            cls.set_property("workdir", os.path.abspath(workdir))

    @classmethod
    def generate_config(cls, path: str | None = None) -> None:
        """Write the defaults as YAML to ``path`` (default ``config.yaml``)."""
        import yaml

        with open(path or "config.yaml", "w", encoding="utf-8") as f:
            yaml.safe_dump(DEFAULTS, f, sort_keys=False)

    @classmethod
    def set_config(cls, d: dict[str, Any]) -> None:
        """Replace every key set so far by those of ``d``."""
        _check_all(d)
        cls._props = copy.deepcopy(d)

    @classmethod
    def get_property(cls, key: str, default: Any = None) -> Any:
        found, value = _lookup(cls._props, key)
        if found:
            return value
        found, value = _lookup(cls._readonly_props, key)
        return value if found else default

    @classmethod
    def set_property(cls, key: str, value: Any) -> None:
        parts = _split(key)
        _check(key, value)
        section = cls._props
        for part in parts[:-1]:
            section = section.setdefault(part, {})
        section[parts[-1]] = value

    @classmethod
    def _user_property(cls, key: str) -> tuple[bool, Any]:
        """``(True, value)`` where the key was set (by load, set_config or set_property), else ``(False, None)``."""
        return _lookup(cls._props, key)


def _read_yaml(path: str) -> dict[str, Any]:
    from pathlib import Path

    from fedsup.engine.yamlbounds import YamlBoundsError, read_bounded, safe_load_bounded

    try:
        data = safe_load_bounded(read_bounded(Path(path)).decode("utf-8"))
    except YamlBoundsError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys, got {type(data).__name__}")
    return data


def _check_all(props: dict[str, Any], where: str = "") -> None:
    if not isinstance(props, dict):
        raise ConfigError(f"{where}expected a mapping of config keys, got {type(props).__name__}")
    for name, value in props.items():
        _check(str(name), value, where)


# ---------------------------------------------------------------- config -> Supervisor options


def _whole(key: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{key}: expected a whole number >= {minimum}, got {value!r}")
    return value


def _fraction(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ConfigError(f"{key}: expected a fraction in (0, 1], got {value!r}")
    return float(value)


def _translated() -> dict[str, Any]:
    """The Supervisor options that the fedflow keys set by the user ask for."""
    from fedsup.engine.devices import cpu_cores

    options: dict[str, Any] = {}
    found, value = Config._user_property("scheduler.max-process")
    if found and _whole("scheduler.max-process", value, 0) > 0:  # 0: no limit in fedflow; fedsup's default here
        options["max_loaded"] = value
    found, value = Config._user_property("remain-limit.cuda-memory")
    if found:
        options["memory_margin"] = parse_bytes(value, "remain-limit.cuda-memory")
    found, value = Config._user_property("utilization-limit.cpu")
    if found:  # fedflow held measured CPU use under the fraction; fedsup counts the cores its tasks may use
        options["cpus"] = max(1, int(_fraction("utilization-limit.cpu", value) * cpu_cores()))
    tries = []
    for key in ("scheduler.load-nretry", "scheduler.train-nretry"):
        found, value = Config._user_property(key)
        if found:
            tries.append(_whole(key, value, 0))
    if tries:  # fedflow's n counts attempts per phase; fedsup's one budget counts retries after the first
        options["max_interrupts"] = max(max(tries) - 1, 0)
    return options


def _warn_ignored() -> None:
    """Name, once, each key set to other than fedflow's default that has no counterpart in fedsup."""
    ignored = []
    for key, default in _DEFAULT_LEAVES.items():
        found, value = Config._user_property(key)
        if found and value != default and key not in _HANDLED_HERE | _TRANSLATED and key not in _WARNED:
            ignored.append(key)
    if ignored:
        _WARNED.update(ignored)
        log.warning("fedflow config keys with no counterpart in fedsup, ignored: %s (docs/migrating.md)",
                    ", ".join(ignored))


def supervisor_options() -> dict[str, Any]:
    """The ``fedsup.Supervisor`` options (all but ``run_dir``) that the current ``Config`` asks for: fedflow's
    keys that have a counterpart, then the ``fedsup.`` section, which wins where both set an option."""
    options = _translated()
    _warn_ignored()
    found, section = Config._user_property(FEDSUP_SECTION)
    if found:
        _check(FEDSUP_SECTION, section)
        options.update(section)
    return options


def _default_size(key: str) -> Size:
    """fedflow's per-task default for a task and group that set none; only where the user set it: otherwise
    fedsup's own default (no reservation) applies, not fedflow's 2GB."""
    found, value = Config._user_property(key)
    return value if found else None


# ---------------------------------------------------------------- TaskStatus


class TaskStatus(enum.Enum):
    """fedflow's task statuses, with fedflow's values, then the outcomes fedsup adds.

    Every name but UNKNOWN is also a ``fedsup.TaskStatus``: ``TaskStatus.from_fedsup(s)`` and ``status.fedsup``
    map between the two by name. After a group has run, a task's status is its fedsup outcome: FINISHED,
    FAILED or CANCELLED (fedflow left a finished task at EXITED and a failed one at EXCEPTION).
    """

    UNKNOWN = 0     # the error status
    INIT = 1        # constructed, not scheduled yet
    AVAILABLE = 2   # its process started
    LOADING = 3
    WAITING = 4     # loaded, waiting for a device
    TRAINING = 5
    FINISHED = 6    # trained
    EXITED = 7      # its process exited
    EXCEPTION = 8   # load() or train() raised
    INTERRUPT = 9   # out of memory (host or CUDA)
    # fedsup's, which fedflow did not have
    CRASHED = 10    # the process died without a word
    TIMEOUT = 11    # a phase ran past its deadline
    FAILED = 12     # retries spent
    CANCELLED = 13  # the run stopped first

    @classmethod
    def from_fedsup(cls, status: FedsupStatus) -> TaskStatus:
        return cls[status.name]

    @property
    def fedsup(self) -> FedsupStatus | None:
        """The same status in fedsup's enum; None for UNKNOWN, which fedsup does not have."""
        return None if self is TaskStatus.UNKNOWN else FedsupStatus[self.name]


def _as_status(value: Any) -> TaskStatus:
    """fedflow's status setter: a TaskStatus, its value or its name; anything else is UNKNOWN."""
    if isinstance(value, TaskStatus):
        return value
    try:
        if isinstance(value, str):  # fedsup's statuses are str enums named as ours
            return TaskStatus[str(getattr(value, "name", value))]
        if isinstance(value, int):
            return TaskStatus(value)
    except (KeyError, ValueError):
        pass
    return TaskStatus.UNKNOWN


# ---------------------------------------------------------------- Task


class Task:
    """The base class of a fedflow task: override ``load()`` and ``train(device)``.

    ``load()`` runs in the task's own process before it holds a device; ``train(device)`` once it has one
    (``self.device`` is set to it too) and returns a dict, which becomes ``result`` in the main process (any
    other value becomes ``{}``, as in fedflow). Both run in ``workdir``, the task's own directory.

    ``set_item(key, value)``, only in the task's process, keeps a value that ``get_item(key)`` reads, in the task's
    process and, once the task has finished, in the main process, as in fedflow. Items are not written to the
    workdir; a later task reads them from a task object it holds. Unlike fedflow, an attempt that fails brings
    back neither its result nor its items.

    Beyond fedflow: ``fedsup_record`` is the task's ``fedsup.TaskRecord`` once it has run (``attempts``,
    ``error``, ``history``, measured ``load`` and ``train`` phases), None before.
    """

    main_logger = logging.getLogger(f"{__name__}.task.main")
    sub_logger = logging.getLogger(f"{__name__}.task.sub")

    def __init__(self, task_id: TaskId | None = None, *, estimate_memory: Size = None,
                 estimate_cuda_memory: Size = None, device: str | int | None = None) -> None:
        self.task_id: TaskId = task_id if task_id is not None else str(uuid.uuid4())
        self.estimate_memory = estimate_memory
        self.estimate_cuda_memory = estimate_cuda_memory
        self.device = device
        self.load_numbers = 0   # attempts that loaded
        self.train_numbers = 0  # attempts that trained
        self.load_time = -1     # ms, the last attempt's load; -1 when unknown
        self.train_time = -1
        self.items: dict[Any, Any] = {}
        self.result: dict[str, Any] = {}
        self.fedsup_record: TaskRecord | None = None
        self._workdir: str | None = None
        self._status = TaskStatus.INIT
        self._main_pid = os.getpid()  # set_item belongs to the task's process, never to the one that built it

    @property
    def workdir(self) -> str:
        """The task's directory: set when its group starts running."""
        if self._workdir is None:
            raise ValueError("The workdir field is not available.")
        return self._workdir

    @property
    def status(self) -> TaskStatus:
        return self._status

    @status.setter
    def status(self, value: TaskStatus | int | str) -> None:
        self._status = _as_status(value)

    def get_item(self, key: Any) -> Any:
        return self.items.get(key)

    def set_item(self, key: Any, value: Any) -> None:
        if os.getpid() == self._main_pid:
            raise ValueError("You cannot call this method in main process.")
        self.items[key] = value

    def load(self) -> None:
        """Read data, build the model: in the task's process, before it holds a device."""
        raise NotImplementedError()

    def train(self, device: str) -> dict[str, Any] | None:
        """Do the work on ``device`` (``"cpu"`` or ``"cuda:0"``); return a dict of results."""
        raise NotImplementedError()


# ---------------------------------------------------------------- TaskGroup


class TaskGroup:
    """Tasks that run together, in no set order, with no dependencies between them.

    ``estimate_memory``, ``estimate_cuda_memory`` and ``device`` apply to the tasks that set none. After the
    group has run: ``success_number``, ``failed_number``, and ``result``, a report per task id in fedflow's form
    (``{"type": "success" | "fail", "data": {...}}``).
    """

    global_ids: set[TaskId] = set()

    def __init__(self, group_name: str | None = None, *, estimate_memory: Size = None,
                 estimate_cuda_memory: Size = None, device: str | int | None = None) -> None:
        self.index = -1
        self._group_name = group_name
        self.estimate_memory = estimate_memory
        self.estimate_cuda_memory = estimate_cuda_memory
        self._device = device
        auto = bool(Config.get_property("scheduler.auto-adjust"))
        self.auto_adjust_memory = auto and estimate_memory is None
        self.auto_adjust_cuda_memory = auto and estimate_cuda_memory is None
        self.task_ids: set[TaskId] = set()
        self.tasks: dict[TaskStatus, dict[TaskId, Task]] = {status: {} for status in TaskStatus}
        self.task_number = 0
        self.success_number = 0
        self.failed_number = 0
        self.result: dict[TaskId, dict[str, Any]] = {}
        self.workdir: str | None = None
        self._members: list[Task] = []  # in the order added: the order records come back in

    @property
    def device(self) -> str | int | None:
        return self._device

    @property
    def group_name(self) -> str:
        """The group's directory name: the name given, else ``group-<index>``."""
        if self._group_name is not None:
            return self._group_name
        return f"group-{self.index}"

    def add_task(self, task: Task) -> None:
        if task.device is None:
            task.device = self.device
        if not Config.get_property("task.allow-duplicate-id") and task.task_id in TaskGroup.global_ids:
            raise ValueError(f"Duplicate id[{task.task_id}] in global.")
        TaskGroup.global_ids.add(task.task_id)
        # fedsup names tasks (and their folders) by str(task_id): 1 and "1" would share one
        if any(str(t.task_id) == str(task.task_id) for t in self._members):
            raise ValueError(f"Duplicate id[{task.task_id}] in group.")
        self.task_ids.add(task.task_id)
        self.tasks[task.status][task.task_id] = task
        self._members.append(task)
        self.task_number += 1

    def get_task(self, task_id: TaskId) -> Task | None:
        return next((t for t in self._members if t.task_id == task_id), None)

    def finished(self) -> bool:
        return self.success_number + self.failed_number >= self.task_number

    def _refile(self) -> None:
        """Put each task in the bucket of its status, as fedflow's scheduler did while it ran."""
        self.tasks = {status: {} for status in TaskStatus}
        for task in self._members:
            self.tasks[task.status][task.task_id] = task


# ---------------------------------------------------------------- running a group on the engine


def _device_name(device: str | int | None) -> str | None:
    """fedflow pinned a GPU as ``cuda:N``, ``N`` or N; fedsup names devices ``cuda:N`` and ``cpu``."""
    if isinstance(device, bool) or device is None:
        return None
    if isinstance(device, int) or (isinstance(device, str) and device.isdigit()):
        return f"cuda:{device}"
    return device


class _Adapter(FedsupTask):
    """The fedsup task that runs a fedflow task in its process. The fedflow task travels inside it, with the
    results of earlier groups that it holds (an aggregate task's trained tasks)."""

    def __init__(self, task: Task, group: TaskGroup) -> None:
        super().__init__(
            str(task.task_id),
            estimate_memory=_estimate(task, group, "estimate_memory", "scheduler.default-memory"),
            estimate_cuda_memory=_estimate(task, group, "estimate_cuda_memory", "scheduler.default-cuda-memory"),
            device=_device_name(task.device),
        )
        self.fedflow_task = task

    def load(self) -> None:
        self.fedflow_task.load()

    def train(self, device: str) -> dict[str, Any]:
        self.fedflow_task.device = device  # fedflow's tasks read self.device as often as the argument
        result = self.fedflow_task.train(device)
        if not isinstance(result, dict):
            log.warning("task %r: train() returned %s, not a dict; its result is {}", self.fedflow_task.task_id,
                        type(result).__name__)
            result = {}
        # the items come back with the result: the main process has only what the task's process sends back
        return {"result": result, "items": dict(self.fedflow_task.items)}


def _estimate(task: Task, group: TaskGroup, field: str, default_key: str) -> int:
    """The task's own estimate, else its group's, else the config's default; in bytes, an error naming where
    the size came from."""
    own, shared = getattr(task, field), getattr(group, field)
    if own is not None:
        return parse_bytes(own, f"task {task.task_id!r}: {field}")
    if shared is not None:
        return parse_bytes(shared, f"group {group.group_name!r}: {field}")
    return parse_bytes(_default_size(default_key), default_key)


def _ms(phase: PhaseRecord | None) -> int:
    return int(phase.duration * 1000) if phase is not None else -1


def _take_record(task: Task, record: TaskRecord) -> None:
    """Fill the task in from its fedsup record, in the main process."""
    task.fedsup_record = record
    task.status = TaskStatus.from_fedsup(record.status)
    task.load_numbers = len(record.history)
    task.train_numbers = sum(1 for a in record.history
                             if a.train is not None or (a.error is not None and a.error.phase == "train"))
    task.load_time, task.train_time = _ms(record.load), _ms(record.train)
    if record.ok and isinstance(record.result, dict):
        task.result = record.result.get("result") or {}
        task.items.update(record.result.get("items") or {})


def _percent(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "-"
    return f"{100 * value:.2f}%"


def _clock(ms: int) -> str:
    """fedflow's report format for a duration: HH:MM:SS.mmm."""
    if ms < 0:
        return "--:--:--.---"
    seconds, millis = divmod(ms, 1000)
    minutes, seconds = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours:02d}:{minutes:02d}:{seconds:02d}.{millis:03d}"


def _report(task: Task, record: TaskRecord) -> dict[str, Any]:
    """A task's entry in ``TaskGroup.result``, in fedflow's form."""
    if record.ok:
        data = record.model_dump(mode="json")["result"]["result"]  # tensors described, as in the record's file
        return {"type": "success", "data": {
            "train_acc": _percent(task.result.get("train_acc")), "val_acc": _percent(task.result.get("val_acc")),
            "data": json.dumps(data), "load_time": _clock(task.load_time), "train_time": _clock(task.train_time)}}
    error = record.error
    message = (error.traceback or error.summary()) if error is not None else (record.reason or str(record.status))
    return {"type": "fail", "data": {"stage": (error.phase if error is not None else None) or "-",
                                     "message": message}}


def _take_records(group: TaskGroup, tasks: list[Task], records: list[TaskRecord]) -> None:
    for task, record in zip(tasks, records, strict=True):
        _take_record(task, record)
        group.result[task.task_id] = _report(task, record)
        if record.ok:
            group.success_number += 1
        elif record.status in (FedsupStatus.FAILED, FedsupStatus.CANCELLED):
            group.failed_number += 1
            log.error("task %r of group %r ended %s after %d attempt(s): %s", task.task_id, group.group_name,
                      record.status, record.attempts, record.error.summary() if record.error else record.reason)
    group._refile()


def run_group(group: TaskGroup, run_dir: str) -> None:
    """Run the group's tasks that have not run yet, with ``run_dir`` as the fedsup run directory."""
    from fedsup.engine.errors import RunInterrupted
    from fedsup.engine.rundir import safe_name
    from fedsup.engine.supervisor import Supervisor

    tasks = [t for t in group._members if t.status is TaskStatus.INIT]
    if not tasks:
        return
    supervisor = Supervisor(**supervisor_options(), run_dir=run_dir)
    for task in tasks:  # before the tasks are pickled: their process reads it, and so do later tasks
        task._workdir = os.path.join(run_dir, "tasks", safe_name(str(task.task_id)))
    adapters = [_Adapter(t, group) for t in tasks]
    try:
        records = supervisor.run(adapters)
    except RunInterrupted as stop:
        _take_records(group, tasks, stop.records)
        raise
    _take_records(group, tasks, records)


def _run(group: TaskGroup, grouped: bool) -> None:
    """fedflow's layout, from the current directory (the workdir): a directory per group, or one for all."""
    if grouped:
        os.makedirs(group.group_name, exist_ok=True)
        group.workdir = os.path.realpath(group.group_name)
        run_group(group, group.workdir)
    else:
        run_group(group, os.path.realpath(os.curdir))


def _workdir() -> str:
    return os.path.abspath(Config.get_property("workdir") or os.curdir)


# ---------------------------------------------------------------- FedFlow


class FedFlow:
    """fedflow's entry point, in its two forms.

    ``with FedFlow() as flow: flow.execute(group)`` (or ``flow.execute_task(task)``) runs a group at once, in
    the workdir, which is the current directory inside the block. ``FedFlow.add_group(group)`` then
    ``FedFlow.start()`` runs the groups added, in order; as in fedflow, the current directory stays the
    workdir afterwards. Unlike fedflow, ``start()`` forgets the groups it ran.
    """

    groups: list[TaskGroup] = []

    def __init__(self) -> None:
        self.in_working = False
        self._pre_workdir: str | None = None

    def __enter__(self) -> FedFlow:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self) -> None:
        workdir = _workdir()
        os.makedirs(workdir, exist_ok=True)
        self._pre_workdir = os.getcwd()
        os.chdir(workdir)
        self.in_working = True

    def close(self) -> None:
        if self._pre_workdir is not None:
            os.chdir(self._pre_workdir)
            self._pre_workdir = None
        self.in_working = False

    def execute(self, group: TaskGroup) -> None:
        self._check_open()
        _run(group, grouped=bool(Config.get_property("task.directory-grouping")))

    def execute_task(self, task: Task) -> None:
        """Run one task, as the only task of a group named ``default``."""
        self._check_open()
        group = TaskGroup("default")
        group.add_task(task)
        _run(group, grouped=True)

    def _check_open(self) -> None:
        if not self.in_working:
            raise ValueError("Please use 'with FedFlow()'")

    @classmethod
    def add_group(cls, group: TaskGroup) -> None:
        cls.groups.append(group)
        group.index = len(cls.groups)

    @classmethod
    def start(cls) -> None:
        workdir = _workdir()
        os.makedirs(workdir, exist_ok=True)
        os.chdir(workdir)
        groups, cls.groups = cls.groups, []
        for group in groups:
            _run(group, grouped=bool(Config.get_property("task.directory-grouping")))


def _load_at_import() -> None:
    """fedflow reads its defaults, then ./config.yaml where there is one, when it is imported. A config.yaml that
    is not fedflow's (a fedsup run's, say) must not make the import fail: it is left unread, with a warning."""
    Config.load()
    if not os.path.exists("config.yaml"):
        return
    try:
        Config.load("config.yaml")
    except (ConfigError, OSError, ValueError) as exc:
        log.warning("config.yaml here was not loaded as a fedflow config (%s); Config.load('config.yaml') "
                    "raises the same", exc)
        Config.load()


_load_at_import()
