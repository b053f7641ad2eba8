"""fedsup: a federated-learning process supervisor."""

from fedsup.errors import ConfigError, FedsupError, PlacementError, RunInterrupted, TaskFailed
from fedsup.faults import FaultPlan
from fedsup.records import AttemptRecord, ErrorInfo, PhaseRecord, TaskRecord
from fedsup.states import TaskStatus
from fedsup.supervisor import Supervisor
from fedsup.task import Task

__version__ = "0.1.0"

__all__ = [
    "AttemptRecord",
    "ConfigError",
    "ErrorInfo",
    "FaultPlan",
    "FedsupError",
    "PhaseRecord",
    "PlacementError",
    "RunInterrupted",
    "Supervisor",
    "Task",
    "TaskFailed",
    "TaskRecord",
    "TaskStatus",
    "__version__",
]
