"""The Ray backend's fixtures: a local cluster started by the tests on this machine and stopped after, and
the no-process-left check made to fit it (the cluster's own processes are the tests' children while it runs;
no process of a run may be: no driver, no node agent, no fork server, no task process)."""

from __future__ import annotations

from collections.abc import Iterator

import psutil
import pytest
from ray_cluster import LocalCluster, ray_or_skip, run_processes


@pytest.fixture(autouse=True)
def no_process_left() -> Iterator[None]:
    """After each test no process of a run is left. Ray ends a job's actors once its driver has gone, a
    moment later: the wait is a deadlock detector, nothing else."""
    yield
    _, alive = psutil.wait_procs(run_processes(), timeout=60)
    assert not alive, "processes of a run left behind: " + ", ".join(
        f"{p.pid} {' '.join(p.cmdline())[:120]}" for p in alive if p.is_running())


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    """Two Ray nodes with one CPU each on this machine (and a head with none), for a module's tests."""
    ray_or_skip()
    made = LocalCluster(2)
    try:
        yield made
    finally:
        made.shutdown()
