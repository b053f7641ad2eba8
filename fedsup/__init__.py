"""fedsup: a federated-learning process supervisor.

The names below are loaded on first use, not when ``fedsup`` is imported: importing them pulls in torch,
which takes seconds, and the ``fedsup`` command must be able to catch a Ctrl-C during that import (one
line, exit 130) and to answer ``fedsup status`` without it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

import fedsup.cluster  # noqa: F401 - registers the "ray" backend (ray itself is imported only when used)

if TYPE_CHECKING:
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
    from fedsup.engine.records import AttemptRecord, ErrorInfo, PhaseRecord, SpanRecord, TaskRecord
    from fedsup.engine.spans import current_span, span
    from fedsup.engine.states import TaskStatus
    from fedsup.engine.supervisor import Supervisor
    from fedsup.engine.task import Task
    from fedsup.federated.registry import make_strategy
    from fedsup.federated.strategies import ClientUpdate, Strategy

__version__ = "0.1.0"

_HOMES = {
    "fedsup.engine.errors": ("ConfigError", "FedsupError", "PlacementError", "RunFailed", "RunInterrupted",
                             "TaskContractError", "TaskFailed"),
    "fedsup.engine.faults": ("FaultPlan",),
    "fedsup.engine.records": ("AttemptRecord", "ErrorInfo", "PhaseRecord", "SpanRecord", "TaskRecord"),
    "fedsup.engine.spans": ("current_span", "span"),
    "fedsup.engine.states": ("TaskStatus",),
    "fedsup.engine.supervisor": ("Supervisor",),
    "fedsup.engine.task": ("Task",),
    "fedsup.federated.registry": ("make_strategy",),
    "fedsup.federated.strategies": ("ClientUpdate", "Strategy"),
}
_HOME_OF = {name: module for module, names in _HOMES.items() for name in names}


def __getattr__(name: str) -> Any:
    module = _HOME_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'fedsup' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups are plain attribute reads
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOME_OF))


def run(config: Any, **options: Any) -> dict[str, Any]:
    """Run (or, with ``resume=True``, resume) the federated run that ``config`` describes: a YAML file, a
    dict of the same shape or a ``fedsup.federated.config.RunConfig``. Returns the run's summary. Options:
    ``overrides`` (``["federation.rounds=10"]``), ``resume``, ``output``, ``on_event``, and ``report``: a
    function that writes the run's HTML report and returns its path, for MLflow to keep
    (``fedsup.ui.report.write_report``; the ``fedsup`` command passes it)."""
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
    "SpanRecord",
    "Strategy",
    "Supervisor",
    "Task",
    "TaskContractError",
    "TaskFailed",
    "TaskRecord",
    "TaskStatus",
    "__version__",
    "current_span",
    "make_strategy",
    "run",
    "span",
]
