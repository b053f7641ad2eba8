"""The exceptions fedsup raises. One root, ``FedsupError``, so a caller can catch them all."""

from __future__ import annotations

from typing import Any


class FedsupError(Exception):
    """Root of every error fedsup raises on purpose."""


class ConfigError(FedsupError, ValueError):
    """Bad input: a value, a field or a file that fedsup cannot use. Names what is wrong."""


class PlacementError(FedsupError):
    """A task can never be placed: it is larger than every device that could hold it."""


class RemoteTraceback(Exception):
    """Carries a child's formatted traceback so it prints as the ``__cause__`` of a local error."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return f'\n"""\n{self.tb}"""'


class TaskFailed(FedsupError):
    """A task ended FAILED; ``record`` holds its attempts and the root cause."""

    def __init__(self, record: Any) -> None:
        error = record.error
        what = f"{error.type}: {error.message}" if error else "unknown cause"
        super().__init__(f"task {record.task_id!r} failed after {record.attempts} attempt(s): {what}")
        self.record = record
        if error and error.traceback:
            self.__cause__ = RemoteTraceback(error.traceback)


class RunInterrupted(KeyboardInterrupt):
    """The run was stopped by SIGINT, SIGTERM or SIGHUP; ``records`` holds every task as it was left."""

    def __init__(self, signum: int, records: list[Any]) -> None:
        super().__init__(f"run interrupted by signal {signum}")
        self.signum = signum
        self.records = records


class RunFailed(FedsupError):
    """A federated run could not go on: a round ended with fewer successful clients than ``min_clients``."""


class TaskContractError(FedsupError):
    """A task broke the federated contract (what ``train``/``evaluate`` must return): a bug, not bad luck."""


class RunDirError(ConfigError):
    """The run directory cannot be used as asked: it holds another run, or a damaged one."""
