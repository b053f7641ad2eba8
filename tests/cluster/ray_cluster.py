"""A local Ray cluster for the Ray backend's tests, started on this machine and stopped after, and the
processes of a run told apart from the cluster's own."""


from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil
import pytest

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent
RUN_MARKS = ("NodeAgent", "multiprocessing", "fedsup")  # in the command line of a run's processes


def ray_or_skip() -> Any:
    return pytest.importorskip("ray", reason="the Ray backend's tests need ray: pip install 'fedsup[ray]'")


def child_env() -> dict[str, str]:
    """For the run's processes and the cluster's workers: the test clients importable by name."""
    extra = [str(HERE), str(TESTS), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in extra if p)}


def run_processes() -> list[psutil.Process]:
    """The test process's descendants that belong to a run rather than to the Ray cluster itself."""
    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            line = " ".join(proc.cmdline())
        except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
            continue
        if any(mark in line for mark in RUN_MARKS) and "resource_tracker" not in line:
            found.append(proc)
    return found


class LocalCluster:
    """A Ray cluster on this machine, kept by ``cluster_keeper.py`` in a process of its own."""

    def __init__(self, cpu_nodes: int) -> None:
        self.keeper = subprocess.Popen([sys.executable, str(HERE / "cluster_keeper.py"), str(cpu_nodes)],
                                       env=child_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.keeper.stdout is not None
        self.address = self.keeper.stdout.readline().strip()
        assert self.address, "the local Ray cluster did not start"

    def remove_node(self, raylet_pid: int) -> None:
        """Remove the node whose raylet has this pid, as a machine that goes away."""
        assert self.keeper.stdin is not None and self.keeper.stdout is not None
        self.keeper.stdin.write(f"remove {raylet_pid}\n")
        self.keeper.stdin.flush()
        assert self.keeper.stdout.readline().strip() == "removed"

    def add_node(self) -> None:
        """Add a node with one CPU, as a machine that joins; returns once Ray sees it."""
        assert self.keeper.stdin is not None and self.keeper.stdout is not None
        self.keeper.stdin.write("add\n")
        self.keeper.stdin.flush()
        assert self.keeper.stdout.readline().strip() == "added"

    def shutdown(self) -> None:
        assert self.keeper.stdin is not None
        self.keeper.stdin.close()
        self.keeper.wait(timeout=120)
