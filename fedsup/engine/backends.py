"""Where a ``Supervisor`` runs its sessions: ``"local"`` (this machine, the engine itself) or a backend that a
layer above registers here, such as ``"ray"`` (``fedsup.cluster``, registered when ``fedsup`` is imported).

The engine knows backends by name only: a backend is a factory that takes the supervisor and its options and
returns an object whose ``session(tasks)`` is a context manager yielding a session with ``run(jobs)`` and
``run_dir``, the same interface as the local one.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, Protocol

from fedsup.engine.errors import ConfigError

LOCAL = "local"


class Backend(Protocol):
    def session(self, tasks: list[Any]) -> AbstractContextManager[Any]: ...


Factory = Callable[[Any, dict[str, Any]], Backend]
_FACTORIES: dict[str, Factory] = {}


def register(name: str, factory: Factory) -> None:
    """Make ``Supervisor(backend=name)`` build its sessions with ``factory(supervisor, options)``."""
    _FACTORIES[name] = factory


def names() -> list[str]:
    return [LOCAL, *sorted(_FACTORIES)]


def check(name: Any) -> str:
    """The backend's name, or a ConfigError naming the known ones (and the likeliest, for a typo)."""
    if isinstance(name, str) and (name == LOCAL or name in _FACTORIES):
        return name
    known = names()
    match = difflib.get_close_matches(str(name), known, n=1)
    hint = f"; did you mean {match[0]!r}?" if match else ""
    raise ConfigError(f"supervisor.backend: unknown backend {name!r} (known: {', '.join(known)}){hint}")


def make(name: str, supervisor: Any, options: dict[str, Any]) -> Backend | None:
    """The backend for ``name``; None for the local one, which the supervisor runs itself."""
    if check(name) == LOCAL:
        return None
    return _FACTORIES[name](supervisor, options)
