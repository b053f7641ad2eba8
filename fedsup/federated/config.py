"""Run configs: the YAML file that describes a federated run, checked whole before anything starts.

A config has seven sections: ``name``/``seed``/``output`` at the top, ``task`` (the client class and its
arguments), ``federation`` (clients, rounds, sampling, aggregation), ``supervisor`` (the engine's options),
``checkpoints`` (which round checkpoints are kept), and an optional ``faults`` plan. ``load_config`` reads
one (a file, a dict or a ``RunConfig``), applies ``KEY=VALUE`` overrides, checks it against the pydantic
models below and, once the shape is right, imports the task class. Every problem found is reported at
once, in one ``ConfigProblems`` (a ``ConfigError``), one line per problem:
``<key.path>: <what is wrong> (got <value>)``.

YAML is read with ``yaml.safe_load`` only: a config is data, and a tag such as ``!!python/object`` would
run code. Sizes are written as ``512MiB``/``2GiB`` or plain bytes and stored as int bytes.

This module is the schema and the entry points; the wording of problems is ``problems.py``'s, the
``--set`` overrides are ``overrides.py``'s, and ``module:Class`` resolution is ``classes.py``'s.
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    PlainSerializer,
    Tag,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from fedsup.engine import backends
from fedsup.engine.devices import DEFAULT_CONTEXT_MEMORY, DEFAULT_MARGIN
from fedsup.engine.errors import ConfigError
from fedsup.engine.faults import FaultPlan
from fedsup.engine.messages import Fault
from fedsup.engine.task import Task
from fedsup.engine.units import parse_bytes
from fedsup.federated.classes import class_problems, is_file_spec, one_line, resolve_class
from fedsup.federated.heterogeneity import straggler_count
from fedsup.federated.overrides import apply
from fedsup.federated.problems import (
    ConfigProblems,
    Problem,
    did_you_mean,
    problem_lines,
    raise_problems,
    read_file,
    show,
)
from fedsup.federated.registry import BUILTIN, make_strategy, min_clients, options_of
from fedsup.federated.strategies import Strategy
from fedsup.federated.tracking import missing_extra

__all__ = [
    "STRATEGIES",
    "ConfigError",
    "ConfigProblems",
    "DeviceSpec",
    "FaultsConfig",
    "FederationConfig",
    "RunConfig",
    "StragglersConfig",
    "SupervisorConfig",
    "TaskConfig",
    "TimeoutsConfig",
    "apply_overrides",
    "json_schema",
    "load_config",
    "resolve_class",
    "supervisor_kwargs",
    "to_yaml",
]

#: The built-in aggregation strategies and the ``strategy_args`` each accepts.
STRATEGIES: dict[str, tuple[str, ...]] = {name: options_of(name) for name in BUILTIN}

# What fedsup sets on each client itself, so a value in ``task.args`` would clash or be overwritten.
_RESERVED_ARGS = {
    "client_id": "is set by fedsup for each client; remove it from task.args",
    "task_id": "is set by fedsup for each client (client-<id>); remove it from task.args",
    "estimate_memory": "belongs in task.estimate_memory, not task.args",
    "estimate_cuda_memory": "belongs in task.estimate_cuda_memory, not task.args",
    "cpus": "belongs in task.cpus, not task.args",
}


# -- small pieces the models share


_SIZE_HINT = "expected a size such as 512MiB, 2GiB or 1.5GB, or a whole number of bytes"
_BINARY_UNITS = (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024))
_DECIMAL_UNITS = (("TB", 1000**4), ("GB", 1000**3), ("MB", 1000**2), ("KB", 1000))


def _to_bytes(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise PydanticCustomError("size", _SIZE_HINT)
    if isinstance(value, int) and value < 0:
        raise PydanticCustomError("size", "a size cannot be negative")
    try:
        return parse_bytes(value)
    except (ConfigError, OverflowError, ValueError):
        raise PydanticCustomError("size", _SIZE_HINT) from None


def _size_text(value: int) -> str | int:
    """The exact size in the largest unit that divides it, so the resolved YAML stays readable."""
    for unit, factor in (*_BINARY_UNITS, *_DECIMAL_UNITS):
        if value and value % factor == 0:
            return f"{value // factor}{unit}"
    return value


Size = Annotated[
    int,
    BeforeValidator(_to_bytes),
    PlainSerializer(_size_text, when_used="json"),
    WithJsonSchema({
        "anyOf": [{"type": "integer", "minimum": 0}, {"type": "string", "pattern": r"^\s*\d*\.?\d+\s*[a-zA-Z]*\s*$"}],
        "description": "bytes, or a size such as 512MiB, 2GiB, 1.5GB",
    }),
]
Seconds = Annotated[float, Field(gt=0)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True, allow_inf_nan=False)


# -- the models


_CLASS_SPEC = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


def _check_class_spec(spec: str, what: str) -> None:
    target, _, name = spec.rpartition(":")
    if not target or not _CLASS_SPEC.match(name) or not (is_file_spec(target) or _CLASS_SPEC.match(target)):
        raise PydanticCustomError("class_spec", f"expected {what}")


class TaskConfig(_Section):
    """The client: ``Class(client_id=i, **args)`` for each client ``i``."""

    class_: str = Field(alias="class", description="'module:Class' or 'path/to/file.py:Class' (a fedsup.Task)")
    args: dict[str, Any] = Field(default_factory=dict, description="keyword arguments for the class")
    estimate_memory: Size = 0
    estimate_cuda_memory: Size = 0
    cpus: int = Field(default=1, ge=1)
    labels: list[str] = Field(default_factory=list, description="names that supervisor.limits can cap, "
                              "e.g. ['download']")

    @field_validator("class_")
    @classmethod
    def _class_path(cls, value: str, info: ValidationInfo) -> str:
        _check_class_spec(value, "'module:Class' or 'path/to/file.py:Class'")
        base_dir = (info.context or {}).get("base_dir")
        target, _, name = value.rpartition(":")
        # Absolute, so the resolved YAML loads the same file wherever it is saved.
        if base_dir is not None and is_file_spec(target):
            return f"{os.path.abspath(os.path.join(base_dir, target))}:{name}"
        return value

    @field_validator("args")
    @classmethod
    def _own_args(cls, args: dict[str, Any]) -> dict[str, Any]:
        raise_problems([((key,), why, args[key]) for key, why in _RESERVED_ARGS.items() if key in args])
        return args


class StragglersConfig(_Section):
    """Clients that do only part of their local work each round (``partial``: ``self.work_fraction`` < 1), or
    whose updates never arrive in time (``drop``): ``fraction`` of each round's clients, drawn from the seed."""

    fraction: float = Field(ge=0, le=1)
    mode: Literal["partial", "drop"] = "partial"


class FederationConfig(_Section):
    """Clients, rounds and aggregation. ``clients_per_round`` and ``min_clients`` are filled in when omitted."""

    clients: int = Field(ge=1)
    rounds: int = Field(ge=1)
    clients_per_round: int | None = Field(default=None, ge=1, description="default: all clients")
    min_clients: int | None = Field(default=None, ge=1, description="default: clients_per_round")
    strategy: str = Field(default="fedavg", description=f"{' | '.join(BUILTIN)} | 'module:Class'")
    strategy_args: dict[str, Any] = Field(default_factory=dict)
    evaluate: bool = True
    proximal_mu: float = Field(default=0.0, ge=0, description="FedProx: reaches every client as self.proximal_mu")
    stragglers: StragglersConfig | None = None
    dropout: float = Field(default=0.0, ge=0, lt=1, description="chance that a sampled client fails to report")
    reject_nonfinite: bool = Field(default=True, description="fail a client whose update holds NaN or Inf")

    @field_validator("strategy")
    @classmethod
    def _strategy_name(cls, value: str) -> str:
        if value in STRATEGIES:
            return value
        module, _, name = value.rpartition(":")
        # A module name, not a file: strategies are imported by name (fedsup.federated.registry.make_strategy).
        if is_file_spec(module) or not (_CLASS_SPEC.match(module) and _CLASS_SPEC.match(name)):
            hint = did_you_mean(value, list(STRATEGIES))
            raise PydanticCustomError("strategy", f"expected one of {', '.join(STRATEGIES)} or 'module:Class'{hint}")
        return value

    @field_validator("clients_per_round")
    @classmethod
    def _per_round(cls, value: int | None, info: ValidationInfo) -> int | None:
        clients = info.data.get("clients")
        if value is not None and clients is not None and value > clients:
            raise PydanticCustomError("count", f"cannot be more than clients ({clients})")
        return value

    @field_validator("min_clients")
    @classmethod
    def _minimum(cls, value: int | None, info: ValidationInfo) -> int | None:
        if "clients_per_round" not in info.data:
            return value  # clients_per_round itself was wrong; that is reported already
        per_round = info.data["clients_per_round"] or info.data.get("clients")
        if value is not None and per_round is not None and value > per_round:
            raise PydanticCustomError("count", f"cannot be more than clients_per_round ({per_round})")
        return value

    @model_validator(mode="after")
    def _fill_counts(self) -> FederationConfig:
        if self.clients_per_round is None:
            self.clients_per_round = self.clients
        if self.min_clients is None:
            self.min_clients = self.clients_per_round
        return self

    @field_validator("strategy_args")
    @classmethod
    def _known_strategy_args(cls, args: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        raise_problems(_strategy_arg_problems(info.data.get("strategy"), args))
        return args

    @model_validator(mode="after")
    def _rounds_large_enough(self) -> FederationConfig:
        raise_problems(_round_size_problems(self))
        return self


def _strategy_arg_problems(strategy: str | None, args: dict[str, Any]) -> list[Problem]:
    if strategy is None or strategy not in STRATEGIES:
        return []  # a custom strategy takes whatever its class takes
    known = STRATEGIES[strategy]
    valid = f"; its options are {', '.join(known)}" if known else ""
    why = f"{strategy} has no option of that name" if known else f"{strategy} takes no options"
    problems: list[Problem] = [
        ((key,), why + valid + did_you_mean(key, known), value) for key, value in args.items() if key not in known
    ]
    beta = args.get("beta")
    if "beta" in known and "beta" in args and (
        isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0 <= beta < 0.5
    ):
        problems.append((("beta",), "expected the fraction trimmed at each end, from 0 to below 0.5", beta))
    if not problems:
        problems = _option_value_problems(strategy, args)
    return problems


def _option_value_problems(strategy: str, args: dict[str, Any]) -> list[Problem]:
    """The strategy's own check of its option values: its ConfigError names the option first."""
    try:
        make_strategy(strategy, args)
    except ConfigError as exc:
        option, _, what = str(exc).partition(": ")
        if option in args:
            return [((option,), what.rpartition(", got ")[0] or what, args[option])]
        return [((), str(exc), args)]
    return []


def _round_size_problems(fed: FederationConfig) -> list[Problem]:
    """A robust rule needs enough updates for its num_malicious_nodes; a round may aggregate as few as
    min_clients, so that is what has to be large enough. Stragglers dropped leave fewer clients to finish."""
    per_round, smallest = fed.clients_per_round or fed.clients, fed.min_clients or 0
    if fed.stragglers is not None and fed.stragglers.mode == "drop":
        left = per_round - straggler_count(fed.stragglers.fraction, per_round)
        if left < smallest:
            return [(("min_clients",), f"with stragglers dropped ({fed.stragglers.fraction:g} of "
                     f"clients_per_round={per_round}) only {left} client(s) a round can finish; lower min_clients "
                     f"to {left} or fewer", smallest)]
    if fed.strategy not in STRATEGIES or _strategy_arg_problems(fed.strategy, fed.strategy_args):
        return []
    need = min_clients(fed.strategy, fed.strategy_args)
    if smallest >= need:
        return []
    f = fed.strategy_args.get("num_malicious_nodes", 0)
    return [(("min_clients",), f"{fed.strategy} with num_malicious_nodes={f} needs at least {need} client updates "
             f"a round, but a round may end with min_clients={smallest} (clients_per_round={fed.clients_per_round}); "
             f"raise min_clients and clients_per_round to {need} or more, or lower num_malicious_nodes", smallest)]



_DEVICE_NAME = re.compile(r"^cuda:\d+$")
_DEVICES_HINT = ("expected 'auto', 'cpu', a list of GPU indices such as [0, 1], "
                 "or a list such as [{name: cuda:0, memory: 16GiB}]")


class DeviceSpec(_Section):
    """A described GPU: no hardware is probed, the run trusts ``memory``."""

    name: str
    memory: Annotated[Size, Field(gt=0)]
    index: int | None = Field(default=None, ge=0, description="CUDA index; default: the number in name")

    @field_validator("name")
    @classmethod
    def _cuda_name(cls, value: str) -> str:
        if not _DEVICE_NAME.match(value):
            raise PydanticCustomError("device_name", "expected a name such as 'cuda:0'")
        return value


def _devices_kind(value: Any) -> str | None:
    if isinstance(value, str):
        return "word"
    if isinstance(value, list):
        indices = value and all(isinstance(i, int) and not isinstance(i, bool) for i in value)
        return "indices" if indices else "described"
    return None


def _device_word(value: Any) -> Any:
    if value not in ("auto", "cpu"):
        raise PydanticCustomError("devices", _DEVICES_HINT + did_you_mean(value, ["auto", "cpu"]))
    return value


_DEVICE_TAGS = ("word", "indices", "described")
_SHAPES = {"DeviceSpec": "expected a described GPU such as {name: cuda:0, memory: 16GiB}"}
_DeviceWord = Annotated[Literal["auto", "cpu"], BeforeValidator(_device_word), Tag("word")]
_DeviceIndices = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1), Tag("indices")]
_DeviceList = Annotated[list[DeviceSpec], Field(min_length=1), Tag("described")]
Devices = Annotated[
    _DeviceWord | _DeviceIndices | _DeviceList,
    Discriminator(_devices_kind, custom_error_type="devices", custom_error_message=_DEVICES_HINT),
]


def _auto_or_count(field: str) -> Any:
    def check(value: Any) -> Any:
        if value != "auto" and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise PydanticCustomError(field, "expected 'auto' or a whole number >= 1")
        return value

    return BeforeValidator(check)


class TimeoutsConfig(_Section):
    """Seconds a phase may run before its process is killed and the task requeued; null for no limit."""

    load: Seconds | None = None
    train: Seconds | None = None


class SpeculativeConfig(_Section):
    """Speculative copies of stragglers: a second copy of a client's job once it has trained ``after`` times
    the median train time of its round's finished jobs; the first to finish wins."""

    after: float = Field(gt=0)


class SupervisorConfig(_Section):
    """The engine's options; ``supervisor_kwargs`` turns them into ``fedsup.Supervisor`` arguments."""

    devices: Devices = "auto"
    max_loaded: int | None = Field(default=None, ge=1, description="default: the engine's (twice the CPU cores)")
    max_training: Annotated[int | Literal["auto"], _auto_or_count("max_training")] = "auto"
    max_retries: int = Field(default=3, ge=0)
    max_interrupts: int = Field(default=5, ge=0)
    max_infra_failures: int = Field(default=10, ge=0, description="fork-server deaths a run may have; the tasks "
                                    "they take are requeued without spending max_retries")
    server_timeout: Seconds = Field(default=10.0, description="a fork server that does not answer in time is "
                                    "killed and replaced")
    server_start_timeout: Seconds = Field(default=120.0, description="a fork server must be serving this soon "
                                          "after its start")
    retry_backoff: float = Field(default=0.5, ge=0)
    grace_period: Seconds = 5.0
    start_method: Literal["forkserver", "spawn"] = "forkserver"
    memory_margin: Size = DEFAULT_MARGIN
    cuda_context_memory: Size = DEFAULT_CONTEXT_MEMORY
    enforce_memory: bool = False
    tasks_per_process: Annotated[int | Literal["auto"], _auto_or_count("tasks_per_process")] = "auto"
    timeouts: TimeoutsConfig = Field(default_factory=TimeoutsConfig)
    backend: str = Field(default="local", description="'local': this machine; 'ray': every node of a Ray cluster")
    ray_address: str = Field(default="auto", description="backend ray: the cluster; 'auto': the running one, "
                             "else a local Ray started for the run")
    speculative: SpeculativeConfig | None = Field(default=None, description="{after: 2.0}: a copy of a client "
                                                  "training longer than 2x the round's median train time")
    limits: dict[str, Annotated[int, Field(ge=1)]] = Field(
        default_factory=dict, description="label -> at most this many clients holding it (task.labels) loaded or "
        "training at once")

    @field_validator("backend")
    @classmethod
    def _backend_name(cls, value: str) -> str:
        known = backends.names()
        if value not in known:
            raise PydanticCustomError("backend", f"expected one of {', '.join(known)}{did_you_mean(value, known)}")
        return value

    @model_validator(mode="after")
    def _unique_devices(self) -> SupervisorConfig:
        if not isinstance(self.devices, list):
            return self
        keys = [d.name if isinstance(d, DeviceSpec) else d for d in self.devices]
        raise_problems([(("devices", i), "appears twice in devices", key)
                         for i, key in enumerate(keys) if key in keys[:i]])
        return self


FaultPhase = Literal["load", "train"]
_FAULT_PHASES: tuple[FaultPhase, ...] = ("load", "train")


class FaultsConfig(_Section):
    """Fault injection, for demos and tests: see ``fedsup.FaultPlan``."""

    probability: float = Field(default=0.1, ge=0, le=1)
    seed: int = Field(default=0, ge=0)
    kinds: list[Fault] = Field(default_factory=lambda: list(FaultPlan.kinds), min_length=1)
    phases: list[FaultPhase] = Field(default_factory=lambda: list(_FAULT_PHASES), min_length=1)
    max_per_task: int = Field(default=1, ge=0)


def _none_to_empty(value: Any) -> Any:
    return "" if value is None else value


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class CheckpointsConfig(_Section):
    """Which round checkpoints stay on disk. The newest ``keep_last`` complete rounds (what ``--resume``
    starts from) and every ``every``-th round (for analysis) are kept with their strategy state;
    ``initial.pt`` and ``final.pt`` always are. With the defaults a 1,500-round ResNet-18 run (45 MB a
    checkpoint) keeps 35 checkpoints, 1.6 GB, instead of 1,502 (about 65 GB)."""

    keep_last: int | None = Field(default=3, ge=1, description="newest complete rounds kept, each resumable "
                                  "(their client states too); null: every round")
    every: int | None = Field(default=50, ge=1, description="also keep every k-th round's checkpoint; null: none")


class TensorBoardConfig(_Section):
    dir: str | None = Field(default=None, description="the event files' folder; default: <run dir>/tensorboard")


class MlflowConfig(_Section):
    tracking_uri: str = Field(default="mlruns", description="a folder (an sqlite store in it), a .db file, or a "
                              "server's URI")
    experiment: str | None = Field(default=None, description="default: the run's name")


class TrackingConfig(_Section):
    """Experiment trackers (optional extras): per round, train and eval metrics and the round's duration."""

    tensorboard: TensorBoardConfig | None = None
    mlflow: MlflowConfig | None = None


class RunConfig(_Section):
    """One federated run, as a config file describes it."""

    name: str = Field(description="letters, digits, '.', '_' and '-'; names the default output directory")
    seed: int = Field(default=0, ge=0)
    task: TaskConfig
    federation: FederationConfig
    supervisor: SupervisorConfig = Field(default_factory=SupervisorConfig)
    faults: FaultsConfig | None = None
    checkpoints: CheckpointsConfig = Field(default_factory=CheckpointsConfig)
    tracking: TrackingConfig | None = None
    output: Annotated[str, BeforeValidator(_none_to_empty)] = Field(
        default="", description="the run directory, as written (relative to where fedsup runs); default: runs/<name>")

    @field_validator("name")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        if not _NAME.match(value):
            raise PydanticCustomError("name", "expected a name of letters, digits, '.', '_' and '-'")
        return value

    @model_validator(mode="after")
    def _defaults_and_faults(self) -> RunConfig:
        if not self.output:
            self.output = f"runs/{self.name}"
        raise_problems(_hang_problems(self) + _limit_problems(self) + _tracking_problems(self))
        return self


def _tracking_problems(config: RunConfig) -> list[Problem]:
    tracking = config.tracking
    if tracking is None:
        return []
    chosen = [name for name in ("tensorboard", "mlflow") if getattr(tracking, name) is not None]
    problems = [(("tracking", name), missing_extra(name), name) for name in chosen]
    return [(loc, message, value) for loc, message, value in problems if message is not None]


def _limit_problems(config: RunConfig) -> list[Problem]:
    labels = config.task.labels
    return [(("supervisor", "limits", name), f"is not one of task.labels ({', '.join(labels) or 'none given'}); "
             "a limit caps the clients holding that label", name)
            for name in config.supervisor.limits if name not in labels]


def _hang_problems(config: RunConfig) -> list[Problem]:
    # An injected hang only ends through a phase timeout; without one the run would never finish.
    if config.faults is None or "hang" not in config.faults.kinds:
        return []
    timeouts = config.supervisor.timeouts
    untimed = [p for p in config.faults.phases if getattr(timeouts, p) is None]
    if not untimed:
        return []
    needs = " and ".join(f"supervisor.timeouts.{p}" for p in untimed)
    return [(("faults", "kinds"), f"'hang' needs {needs} set (a hang only ends through a timeout)",
             config.faults.kinds)]


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """A copy of ``data`` with each ``"a.b.c=value"`` set; the value is read as YAML (``10``, ``cpu``, ``[0, 1]``)."""
    if isinstance(overrides, str):
        overrides = [overrides]
    result, problems = apply(RunConfig, data, overrides)
    if problems:
        raise ConfigProblems(problems)
    return result


def _import_problems(config: RunConfig) -> list[str]:
    task, fed = config.task, config.federation
    problems = class_problems("task.class", task.class_, Task, "task.args", task.args, {"client_id": 0})
    if fed.strategy not in STRATEGIES:
        problems += class_problems("federation.strategy", fed.strategy, Strategy, "federation.strategy_args",
                                    fed.strategy_args, {})
    return problems


# -- the public entry points


def _source_data(source: Any) -> tuple[Any, Path | None, str | None]:
    """The raw data of ``source``, the directory relative class paths start from, and its name for messages."""
    if isinstance(source, RunConfig):
        return source.model_dump(mode="python", by_alias=True), None, None
    if isinstance(source, dict):
        return copy.deepcopy(source), Path.cwd(), None
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        return read_file(path), path.resolve().parent, str(path)
    raise TypeError(f"load_config: expected a path, a dict or a RunConfig, got {type(source).__name__}")


def load_config(
    source: str | os.PathLike[str] | dict[str, Any] | RunConfig,
    overrides: Sequence[str] = (),
    check_imports: bool = True,
) -> RunConfig:
    """Read, override and check a run config; raise ConfigProblems (a ConfigError) listing every problem.

    ``source`` is a YAML file, a dict as ``yaml.safe_load`` gives, or a RunConfig. ``overrides`` are
    ``"key.path=value"`` strings. With ``check_imports`` the task class (and a custom strategy) is imported
    once the rest is valid.
    """
    data, base_dir, origin = _source_data(source)
    if not isinstance(data, dict):
        kind = type(data).__name__
        raise ConfigProblems([f"{origin or 'config'}: the top level must be a mapping with name, task and "
                              f"federation (got a {kind}: {show(data)})"], origin)
    data, problems = apply(RunConfig, data, [overrides] if isinstance(overrides, str) else overrides)
    try:
        config = RunConfig.model_validate(data, context={"base_dir": base_dir})
    except ValidationError as exc:
        raise ConfigProblems(problems + problem_lines(exc.errors(), RunConfig, union_tags={"devices": _DEVICE_TAGS},
                                                     shapes=_SHAPES), origin) from None
    if not problems and check_imports:
        problems = _import_problems(config)
    if problems:
        raise ConfigProblems(problems, origin)
    return config


def to_yaml(config: RunConfig) -> str:
    """The resolved config (every default filled in) as YAML that ``load_config`` reads back to an equal one."""
    try:
        data = config.model_dump(mode="json", by_alias=True)
        text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True, default_flow_style=False)
        if yaml.safe_load(text) != data:  # characters YAML reads as line breaks (NEL, LS, PS): escape them all
            text = yaml.safe_dump(data, sort_keys=False, allow_unicode=False, default_flow_style=False)
        return text
    except (ValueError, TypeError, yaml.YAMLError) as exc:
        raise ConfigProblems([f"task.args: cannot be written as YAML ({one_line(exc)})"]) from exc


def _devices_arg(devices: Any) -> Any:
    if not isinstance(devices, list) or not devices or not isinstance(devices[0], DeviceSpec):
        return devices
    # Inventory.from_spec reads a missing index from the name, but not an explicit None.
    return [d.model_dump(exclude_none=True) for d in devices]


def supervisor_kwargs(config: RunConfig) -> dict[str, Any]:
    """Keyword arguments for ``fedsup.Supervisor(...)`` (all but ``run_dir``, which the caller decides)."""
    sup = config.supervisor
    faults = config.faults
    return {
        "devices": _devices_arg(sup.devices),
        "max_loaded": sup.max_loaded,
        "max_training": None if sup.max_training == "auto" else sup.max_training,
        "max_retries": sup.max_retries,
        "max_interrupts": sup.max_interrupts,
        "max_infra_failures": sup.max_infra_failures,
        "server_timeout": sup.server_timeout,
        "server_start_timeout": sup.server_start_timeout,
        "retry_backoff": sup.retry_backoff,
        "grace_period": sup.grace_period,
        "start_method": sup.start_method,
        "memory_margin": sup.memory_margin,
        "cuda_context_memory": sup.cuda_context_memory,
        "enforce_memory": sup.enforce_memory,
        "tasks_per_process": sup.tasks_per_process,
        "load_timeout": sup.timeouts.load,
        "train_timeout": sup.timeouts.train,
        "backend": sup.backend,
        "ray_address": sup.ray_address,
        "limits": dict(sup.limits) or None,
        "speculative": None if sup.speculative is None else {"after": sup.speculative.after},
        "faults": None if faults is None else FaultPlan(
            probability=faults.probability, seed=faults.seed, kinds=tuple(faults.kinds),
            phases=tuple(faults.phases), max_per_task=faults.max_per_task,
        ),
    }


def json_schema() -> dict[str, Any]:
    """The JSON schema of a run config, for editors (``# yaml-language-server: $schema=...``)."""
    return RunConfig.model_json_schema(by_alias=True)
