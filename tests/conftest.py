"""Shared fixtures. The autouse one holds every test to the engine's promise: when ``Supervisor.run()``
returns (or raises), no process it started is left, running or unreaped."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from multiprocessing import resource_tracker
from pathlib import Path
from typing import Any

import psutil
import pytest
from announce import Fifo

# Make the toy modules importable by their short names (``toys``), also for ``spawn`` children, which
# take ``sys.path`` from the parent.
sys.path.insert(0, str(Path(__file__).resolve().parent))


def _tracker() -> Any:
    """multiprocessing's resource tracker: one per interpreter, started by the first ``spawn`` Process (the
    spawn launcher, or a fork server started with spawn) and meant to live until the interpreter exits. It is
    not a task process and fedsup does not own it."""
    return resource_tracker._resource_tracker


def _tracker_running() -> bool:
    return getattr(_tracker(), "_fd", None) is not None


def _is_tracker(proc: psutil.Process) -> bool:
    try:
        return "multiprocessing.resource_tracker" in " ".join(proc.cmdline())
    except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
        return False


def _describe(proc: psutil.Process) -> str:
    try:
        return f"pid {proc.pid} ({proc.status()}): {' '.join(proc.cmdline()) or proc.name()}"
    except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
        return f"pid {proc.pid} (gone or zombie)"


@pytest.fixture(autouse=True)
def no_process_left() -> Iterator[None]:
    """After each test, the test process has no child left: no task process, no fork server, no zombie.

    Nothing waits here: the supervisor must have reaped everything before ``run()`` came back, and a test
    that starts a helper process waits for it itself. The one exception is multiprocessing's resource
    tracker: if this test started it, it is stopped here (closing its pipe ends it; ``_stop`` reaps it), so
    that later tests, here or in other files, start from a process with no children.
    """
    tracker_before = _tracker_running()
    yield
    if not tracker_before and _tracker_running():
        _tracker()._stop()
    left = [p for p in psutil.Process().children(recursive=True) if not (tracker_before and _is_tracker(p))]
    assert not left, "processes left behind by the test:\n  " + "\n  ".join(_describe(p) for p in left)


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A fresh run directory (not created yet: the supervisor creates it)."""
    return tmp_path / "run"


@pytest.fixture
def markers(tmp_path: Path) -> str:
    """A directory for the toys' first-attempt marker files."""
    path = tmp_path / "markers"
    path.mkdir()
    return str(path)


@pytest.fixture
def fifo(tmp_path: Path) -> Iterator[Fifo]:
    f = Fifo(tmp_path / "announce.fifo")
    yield f
    f.close()
