"""Runs across machines: the Ray backend. One node agent per Ray node (``agent.py``) runs the local engine
there; the driver side (``driver.py``) keeps the one queue of jobs across nodes and stays the one writer of
the run directory.

Importing this package registers the ``"ray"`` backend with the engine (``fedsup.engine.backends``), which
``fedsup`` does on import; ``ray`` itself is imported only when a ``Supervisor(backend="ray")`` is built.

May import: ``fedsup.engine`` only; the federated layer builds on it, not the other way.
"""

from __future__ import annotations

from typing import Any

from fedsup.engine import backends

INSTALL = "pip install 'fedsup[ray]'"


def _ray_backend(supervisor: Any, options: dict[str, Any]) -> backends.Backend:
    from fedsup.engine.errors import ConfigError

    try:
        import ray  # noqa: F401
    except ImportError:
        raise ConfigError(f"supervisor.backend: ray needs the ray package, which is not installed: {INSTALL}") from None
    from fedsup.cluster.driver import RayBackend

    return RayBackend(supervisor, options["ray_address"])


backends.register("ray", _ray_backend)
