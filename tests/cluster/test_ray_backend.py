"""The Ray backend on a local cluster of two one-CPU nodes: the same model, bit for bit, as the local
backend; the nodes named in the records; a node's agent SIGKILLed or the node removed mid-round costs only
its jobs, requeued on the other node on their own budget; the driver SIGKILLed, then ``--resume``; Ctrl-C.

Every run is a ``fedsup run`` process, as a user starts it; the moment a test acts at is held by a client
that waits on a FIFO (``ray_toys.HoldingSynthetic``), never by a sleep."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml
from ray_cluster import LocalCluster, child_env, ray_or_skip, run_processes

from fedsup.engine.rundir import read_records
from fedsup.federated.chaos import differing_checkpoints
from fedsup.federated.rounds import sample_clients

ray_or_skip()

SEED, CLIENTS, PER_ROUND, ROUNDS = 3, 6, 4, 3
HELD = sample_clients(SEED, 2, CLIENTS, PER_ROUND)[-1]  # a client of round 2: its job is held there


def config(tmp_path: Path, name: str, backend: str = "local", address: str = "auto", hold: bool = False) -> Path:
    """configs/synthetic.yaml scaled down, on one backend or the other."""
    announce, go = tmp_path / f"{name}.announce", tmp_path / f"{name}.go"
    if hold:
        os.mkfifo(announce)
        os.mkfifo(go)
    data = {
        "name": name, "seed": SEED,
        "task": {"class": "ray_toys:HoldingSynthetic",
                 "args": {"samples": 200, "features": 16, "classes": 4, "epochs": 1, "batch_size": 32,
                          "lr": 0.05, "alpha": 0.3, "announce": str(announce) if hold else "",
                          "go": str(go) if hold else "", "hold_round": 2, "hold_client": HELD}},
        "federation": {"clients": CLIENTS, "rounds": ROUNDS, "clients_per_round": PER_ROUND,
                       "min_clients": PER_ROUND, "strategy": "fedavg"},
        "supervisor": {"devices": "cpu", "max_loaded": 2, "max_retries": 0, "grace_period": 1,
                       "backend": backend, "ray_address": address},
        "output": str(tmp_path / name),
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def fedsup(*args: str, timeout: float = 400) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fedsup", *args], env=child_env(), capture_output=True, text=True,
                          timeout=timeout)


def start(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "fedsup", *args], env=child_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def held_pid(tmp_path: Path, name: str) -> int:
    """Blocks until the held job says its pid: that job is under way on one node now."""
    with open(tmp_path / f"{name}.announce") as f:
        return int(f.readline())


def ancestor(pid: int, mark: str) -> psutil.Process:
    """The nearest ancestor of ``pid`` whose command line holds ``mark`` (its agent, its raylet)."""
    proc: psutil.Process | None = psutil.Process(pid)
    while proc is not None:
        if mark in " ".join(proc.cmdline()):
            return proc
        proc = proc.parent()
    raise AssertionError(f"pid {pid} has no ancestor with {mark!r}")


def until(condition: Callable[[], Any], timeout: float) -> Any:
    """``condition()`` once it is true (what another process writes, read again every 50 ms); its last
    value when ``timeout`` passes first: a deadlock detector."""
    deadline = time.monotonic() + timeout
    while not (value := condition()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return value


def events(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines() if line.strip()]


def joined_nodes(run: Path) -> set[str]:
    """The nodes the run's event log says joined so far (a line still being written is left for later)."""
    lines = (run / "events.jsonl").read_text().split("\n")[:-1]
    return {e["node"] for e in map(json.loads, lines) if e.get("event") == "node_joined"}


@pytest.fixture(scope="module")
def local_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same run on the local backend: the model every Ray run must end with."""
    tmp = tmp_path_factory.mktemp("local")
    done = fedsup("run", str(config(tmp, "local")))
    assert done.returncode == 0, done.stderr
    return tmp / "local"


def assert_same_model(run: Path, local_run: Path) -> None:
    assert json.loads((run / "summary.json").read_text())["status"] == "finished"
    assert (run / "checkpoints" / "final.pt").exists()
    assert differing_checkpoints(local_run, run) == []


def assert_nothing_twice(run: Path) -> None:
    finished = Counter(e["task"] for e in events(run) if e.get("status") == "FINISHED")
    assert finished and max(finished.values()) == 1, [t for t, n in finished.items() if n > 1]


@pytest.mark.timeout(600)
def test_two_nodes_give_the_local_backends_model_bit_for_bit(tmp_path: Path, cluster: LocalCluster,
                                                             local_run: Path) -> None:
    done = fedsup("run", str(config(tmp_path, "ray", "ray", cluster.address)))
    assert done.returncode == 0, done.stderr
    run = tmp_path / "ray"
    assert_same_model(run, local_run)
    records = [r for r in read_records(run) if r.task_id.startswith("round-")]
    assert all(r.node and r.history and all(a.node == r.node for a in r.history) for r in records)
    assert len({r.node for r in records}) == 2, "jobs should have run on both nodes"
    joined = [e["node"] for e in events(run) if e.get("event") == "node_joined"]
    assert sorted(joined) == sorted({r.node for r in records})


def _lost_node_checks(run: Path, node: str) -> None:
    held = next(r for r in read_records(run) if r.task_id == f"round-2.client-{HELD}")
    assert held.ok and held.attempts == 2, held
    lost, final = held.history
    assert lost.error is not None and lost.error.kind == "node_lost" and node in lost.error.message
    assert lost.node == node and final.node != node and held.node == final.node
    gone = [e for e in events(run) if e.get("event") == "node_lost"]
    assert [e["node"] for e in gone] == [node] and f"round-2.client-{HELD}" in gone[0]["jobs"]
    assert "time" in gone[0]


@pytest.mark.timeout(600)
def test_an_agent_sigkilled_mid_round_costs_only_its_jobs(tmp_path: Path, cluster: LocalCluster,
                                                          local_run: Path) -> None:
    main = start("run", str(config(tmp_path, "agent", "ray", cluster.address, hold=True)))
    pid = held_pid(tmp_path, "agent")
    agent = ancestor(pid, "NodeAgent")
    node = next(e["node"] for e in events(tmp_path / "agent") if e.get("agent_pid") == agent.pid)
    agent.send_signal(signal.SIGKILL)
    _, err = main.communicate(timeout=400)
    assert main.returncode == 0, err
    assert not psutil.pid_exists(pid), "the held task process outlived its agent"
    run = tmp_path / "agent"
    assert_same_model(run, local_run)
    assert_nothing_twice(run)
    _lost_node_checks(run, node)


@pytest.mark.timeout(600)
def test_the_driver_sigkilled_then_resume_gives_the_same_model(tmp_path: Path, cluster: LocalCluster,
                                                               local_run: Path) -> None:
    cfg = config(tmp_path, "driver", "ray", cluster.address, hold=True)
    main = start("run", str(cfg))
    held = held_pid(tmp_path, "driver")
    family = [p for p in run_processes() if p.pid != main.pid]
    assert any("NodeAgent" in " ".join(p.cmdline()) for p in family) and held in {p.pid for p in family}
    main.send_signal(signal.SIGKILL)
    main.wait(timeout=60)
    _, alive = psutil.wait_procs(family, timeout=60)  # a deadlock detector: agents go with their driver
    assert not alive, f"processes of the run outlived its driver on the nodes: {alive}"
    resumed = fedsup("run", str(cfg), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    run = tmp_path / "driver"
    assert_same_model(run, local_run)
    assert_nothing_twice(run)
    assert any(e.get("event") == "run_started" and e.get("resume") for e in events(run))


@pytest.mark.timeout(600)
def test_ctrl_c_stops_the_cluster_run_with_130_and_resume_finishes_it(tmp_path: Path, cluster: LocalCluster,
                                                                      local_run: Path) -> None:
    cfg = config(tmp_path, "ctrlc", "ray", cluster.address, hold=True)
    main = start("run", str(cfg))
    held = held_pid(tmp_path, "ctrlc")
    main.send_signal(signal.SIGINT)
    _, err = main.communicate(timeout=300)
    assert main.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err, err
    assert not psutil.pid_exists(held)
    cancelled = [r for r in read_records(tmp_path / "ctrlc") if r.task_id == f"round-2.client-{HELD}"]
    assert cancelled and cancelled[-1].status.value == "CANCELLED", cancelled
    resumed = fedsup("run", str(cfg), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert_same_model(tmp_path / "ctrlc", local_run)
    assert_nothing_twice(tmp_path / "ctrlc")


@pytest.mark.timeout(300)
def test_the_clusters_nodes_are_described_as_each_sees_itself(cluster: LocalCluster) -> None:
    code = ("import json, sys; from fedsup.cluster.driver import describe_nodes; "
            "print(json.dumps(describe_nodes(sys.argv[1])))")
    done = subprocess.run([sys.executable, "-c", code, cluster.address], env=child_env(), capture_output=True,
                          text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    nodes = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(nodes) == 3 and all("error" not in n for n in nodes), nodes
    assert sorted(n["ray_cpus"] for n in nodes) == [0, 1, 1]
    assert all(n["cores"] >= 1 and isinstance(n["gpus"], list) and ":" in n["node"] for n in nodes)


@pytest.mark.timeout(600)
def test_a_node_removed_mid_round_costs_only_its_jobs(tmp_path: Path, cluster: LocalCluster, local_run: Path) -> None:
    # last in the module: the cluster keeps one node with a CPU after it
    main = start("run", str(config(tmp_path, "removed", "ray", cluster.address, hold=True)))
    pid = held_pid(tmp_path, "removed")
    agent = ancestor(pid, "NodeAgent")
    node = next(e["node"] for e in events(tmp_path / "removed") if e.get("agent_pid") == agent.pid)
    cluster.remove_node(ancestor(agent.pid, "raylet").pid)
    _, err = main.communicate(timeout=400)
    assert main.returncode == 0, err
    run = tmp_path / "removed"
    assert_same_model(run, local_run)
    assert_nothing_twice(run)
    _lost_node_checks(run, node)


@pytest.mark.timeout(600)
def test_a_node_that_joins_mid_run_is_given_work(tmp_path: Path, cluster: LocalCluster, local_run: Path) -> None:
    # after the removal above: the cluster has one node with a CPU, and gains one while round 2 is held
    main = start("run", str(config(tmp_path, "joined", "ray", cluster.address, hold=True)))
    held_pid(tmp_path, "joined")
    run = tmp_path / "joined"
    before = joined_nodes(run)
    cluster.add_node()
    # the driver looks for new nodes every few seconds; the new agent is ready once its fork server is warm
    joined_while_held = until(lambda: joined_nodes(run) - before, timeout=120)
    assert joined_while_held, "the new node's agent did not report ready in 120 s"
    with open(tmp_path / "joined.go", "w") as go:  # the held job goes on
        go.write("x")
    _, err = main.communicate(timeout=400)
    assert main.returncode == 0, err
    assert_same_model(run, local_run)
    assert_nothing_twice(run)
    joined = {e["node"] for e in events(run) if e.get("event") == "node_joined"} - before
    assert len(joined) == 1, "the new node got an agent"
    later = [r for r in read_records(run) if r.task_id.startswith(f"round-{ROUNDS}.")]
    assert any(r.node in joined for r in later), [(r.task_id, r.node) for r in later]

