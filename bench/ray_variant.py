"""``fedsup-ray`` for ``bench/compare.py``: the same federated workload on fedsup's Ray backend, on a local
cluster of two one-CPU nodes that this process starts, with the start-up reported apart from the run.

Figures, each measured in this one run:
  ``cluster_start``  seconds to start the two-node Ray cluster (Ray's own start, paid once per cluster)
  ``wall``           ``fedsup.run`` on the cluster already running: the usual multi-machine case
  ``wall_with_startup``  both: what a run on a laptop with no cluster running costs
  ``agent_start``    from ``fedsup.run`` starting to the last node agent reporting ready (its fork server warm)
  ``round_trip``     per job, the driver's view (submit to outcome written) less the node's (the job's own
                     phases), on average: what the Ray hop adds to a job

Run alone: ``python bench/ray_variant.py W2 --clients 20 --rounds 3 --per-round 10`` prints one
``BENCH_JSON`` line, as compare.py's variants do.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RUN_SEED = 0


def run(workload: str, n: int, rounds: int, per_round: int, plan: dict[int, list[int]]) -> dict[str, Any]:
    """fedsup.run with ``supervisor.backend: ray`` on a fresh two-node local cluster."""
    if workload == "W0":
        raise SystemExit("fedsup-ray runs the federated workloads (W1, W2, W3), not W0")
    import torch
    from ray.cluster_utils import Cluster

    import fedsup
    from fedsup.engine.rundir import read_records

    # the nodes' workers import the bench's client module by name, as the run's driver does
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(HERE), os.environ.get("PYTHONPATH", "")) if p)
    began = time.perf_counter()
    # two nodes of one CPU each, the head one of them: no removal is measured here, so the head need not be
    # kept free of agents as the tests' is, and a third raylet would only compete for the two cores
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    cluster_start = time.perf_counter() - began
    tmp = Path(tempfile.mkdtemp(prefix="fedsup-bench-ray-"))
    try:
        output = tmp / "run"
        config = {
            "name": f"bench-{workload.lower()}-ray", "seed": RUN_SEED, "output": str(output),
            "task": {"class": f"{HERE / 'fl_clients.py'}:MLPClient"},
            "federation": {"clients": n, "rounds": rounds, "clients_per_round": per_round, "evaluate": False},
            "supervisor": {"devices": "cpu", "backend": "ray", "ray_address": cluster.address},
        }
        t0_epoch, t0 = time.time(), time.perf_counter()
        summary = fedsup.run(config)
        wall = time.perf_counter() - t0
        if summary["status"] != "finished":
            raise RuntimeError(f"fedsup.run ended {summary['status']}: {summary}")
        events = [json.loads(line) for line in (output / "events.jsonl").read_text().splitlines() if line.strip()]
        records = [r for r in read_records(output) if r.task_id.startswith("round-")]
        trained = [json.loads(line)["finished"] for line in (output / "rounds.jsonl").read_text().splitlines()]
        expected = [[f"round-{r}.client-{i}" for i in plan[r]] for r in sorted(plan)]
        if [sorted(t) for t in trained] != [sorted(e) for e in expected]:
            raise RuntimeError("fedsup-ray trained other clients than the plan")
        final = torch.load(output / "checkpoints" / "final.pt", weights_only=True)
        starts = [r.result["train_started"] for r in records
                  if isinstance(r.result, dict) and "train_started" in r.result]
        return {"wall": wall, "cluster_start": cluster_start, "wall_with_startup": cluster_start + wall,
                "agent_start": _agent_start(events, t0_epoch), "round_trip": _round_trip(events, records),
                "nodes": sorted({r.node for r in records if r.node}), "final": final,
                "first_train": min(starts) - t0_epoch if starts else None, "clients_trained": len(records),
                "loss": summary["final_metrics"].get("loss"), "tasks": summary["totals"]["tasks"]}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        cluster.shutdown()


def _agent_start(events: list[dict[str, Any]], t0_epoch: float) -> float | None:
    joined = [e["time"] for e in events if e.get("event") == "node_joined"]
    return max(joined) - t0_epoch if joined else None


def _round_trip(events: list[dict[str, Any]], records: list[Any]) -> float | None:
    """Per job: from its first event on a node (the node began it) to its outcome written by the driver, less
    the job's own phases; the mean. What the hop through Ray adds on top of the engine's own work."""
    first: dict[str, float] = {}
    for event in events:
        task = event.get("task")
        if task is not None and task not in first:
            first[task] = event["time"]
    extra = []
    for record in records:
        attempt = record.history[-1] if record.history else None
        if attempt is None or attempt.ended is None or record.task_id not in first:
            continue
        phases = sum(p.duration for p in (attempt.load, attempt.train, attempt.evaluate) if p is not None)
        extra.append(max(0.0, (attempt.ended - first[record.task_id]) - phases))
    return sum(extra) / len(extra) if extra else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workload", choices=("W1", "W2", "W3"))
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--per-round", type=int, default=20)
    args = parser.parse_args()
    sys.path.insert(0, str(HERE))
    from fedsup.federated.rounds import sample_clients

    plan = {r: sample_clients(RUN_SEED, r, args.clients, args.per_round) for r in range(1, args.rounds + 1)}
    out = run(args.workload, args.clients, args.rounds, args.per_round, plan)
    import fl_clients

    out["fingerprint"] = fl_clients.fingerprint(out.pop("final"))
    print("BENCH_JSON " + json.dumps(out, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
