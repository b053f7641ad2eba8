"""A script that starts a run when it is imported, and a process started with ``spawn``.

``spawn`` imports the parent's main module again in every process it starts, before that process's own
code runs (so that what the main module defines can be unpickled there). A script without
``if __name__ == "__main__":`` then starts its run again inside fedsup's own process, which would fail in
ways that name everything but the cause: a fork server that dies again and again, a lock held by "another
run". Instead, while fedsup starts a process with spawn it marks the environment; a run started under that
mark leaves at once with ``REENTERED``, and the parent raises one error that says what to change.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sys

from fedsup.engine.errors import ConfigError

SPAWNING = "FEDSUP_SPAWNING"  # set ("1") while fedsup starts a process with spawn
REENTERED = 86                # the exit status of a spawned process whose main-module import started a run


class MainModuleReentry(ConfigError):
    """The script that started the run starts it again when imported, as spawn imports it."""


def started() -> None:
    """In a spawned process, once its own code runs: the main module is imported, the mark goes."""
    os.environ.pop(SPAWNING, None)


def refuse_reentry() -> None:
    """At every start of a run: inside a process fedsup is starting with spawn, while it imports the main
    module, leave at once with ``REENTERED`` (the parent says why); elsewhere, nothing."""
    # _inheriting: multiprocessing's own mark of a spawned process that is still importing the main module
    if os.environ.get(SPAWNING) is not None and getattr(mp.current_process(), "_inheriting", False):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(REENTERED)


def reentry_error(what: str, why: str | None = None) -> MainModuleReentry:
    """The error a parent raises when ``what``, started with spawn, left with ``REENTERED``."""
    main = getattr(sys.modules.get("__main__"), "__file__", None) or "the main module"
    because = f" (spawn, because {why})" if why else ""
    return MainModuleReentry(
        f"{main} starts a fedsup run when it is imported, and {what}{because} imports it again, as spawn does "
        "in every process it starts: the run would start over in there. Put the code that starts the run "
        "under `if __name__ == \"__main__\":`")
