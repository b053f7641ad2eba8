"""fedsup: a federated-learning process supervisor."""

from typing import Any

from fedsup.errors import (
    ConfigError,
    FedsupError,
    PlacementError,
    RunFailed,
    RunInterrupted,
    TaskContractError,
    TaskFailed,
)
from fedsup.faults import FaultPlan
from fedsup.records import AttemptRecord, ErrorInfo, PhaseRecord, TaskRecord
from fedsup.states import TaskStatus
from fedsup.supervisor import Supervisor
from fedsup.task import Task

__version__ = "0.1.0"


def run(config: Any, **options: Any) -> dict[str, Any]:
    """Run (or, with ``resume=True``, resume) the federated run that ``config`` describes: a YAML file, a
    dict of the same shape or a ``fedsup.config.RunConfig``. Returns the run's summary. Options:
    ``overrides`` (``["federation.rounds=10"]``), ``resume``, ``output``, ``on_event``."""
    from fedsup.runner import run as run_config

    return run_config(config, **options)


__all__ = [
    "AttemptRecord",
    "ConfigError",
    "ErrorInfo",
    "FaultPlan",
    "FedsupError",
    "PhaseRecord",
    "PlacementError",
    "RunFailed",
    "RunInterrupted",
    "Supervisor",
    "Task",
    "TaskContractError",
    "TaskFailed",
    "TaskRecord",
    "TaskStatus",
    "__version__",
    "run",
]
