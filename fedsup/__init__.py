"""fedsup: a federated-learning process supervisor."""

from typing import Any

from fedsup.engine.errors import (
    ConfigError,
    FedsupError,
    PlacementError,
    RunFailed,
    RunInterrupted,
    TaskContractError,
    TaskFailed,
)
from fedsup.engine.faults import FaultPlan
from fedsup.engine.records import AttemptRecord, ErrorInfo, PhaseRecord, TaskRecord
from fedsup.engine.states import TaskStatus
from fedsup.engine.supervisor import Supervisor
from fedsup.engine.task import Task
from fedsup.federated.registry import make_strategy
from fedsup.federated.strategies import ClientUpdate, Strategy

__version__ = "0.1.0"


def run(config: Any, **options: Any) -> dict[str, Any]:
    """Run (or, with ``resume=True``, resume) the federated run that ``config`` describes: a YAML file, a
    dict of the same shape or a ``fedsup.federated.config.RunConfig``. Returns the run's summary. Options:
    ``overrides`` (``["federation.rounds=10"]``), ``resume``, ``output``, ``on_event``."""
    from fedsup.federated.runner import run as run_config

    return run_config(config, **options)


__all__ = [
    "AttemptRecord",
    "ClientUpdate",
    "ConfigError",
    "ErrorInfo",
    "FaultPlan",
    "FedsupError",
    "PhaseRecord",
    "PlacementError",
    "RunFailed",
    "RunInterrupted",
    "Strategy",
    "Supervisor",
    "Task",
    "TaskContractError",
    "TaskFailed",
    "TaskRecord",
    "TaskStatus",
    "__version__",
    "make_strategy",
    "run",
]
