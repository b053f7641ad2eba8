"""Keeps a local Ray cluster for the tests, in a process of its own so that the test process never holds
Ray's native threads (its later tests fork fork servers). Prints the cluster's address, then serves lines
on stdin: ``remove RAYLET_PID`` removes the node of that raylet and answers ``removed``; ``add`` adds a node
with one CPU and answers ``added``, once it is up; end of input, SIGTERM or SIGHUP shuts the cluster down.

    python cluster_keeper.py CPU_NODES
"""

from __future__ import annotations

import signal
import sys
from types import FrameType

from ray.cluster_utils import Cluster


def _leave(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # through the finally below: a signal must not leave the cluster running


def main() -> None:
    nodes = int(sys.argv[1])
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _leave)
    # the head has no CPU, so no agent: any node with an agent can be removed without ending the cluster
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    try:
        for _ in range(nodes):
            cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        print(cluster.address, flush=True)
        for line in sys.stdin:
            command, _, argument = line.strip().partition(" ")
            if command == "remove":
                victim = next(n for n in cluster.worker_nodes
                              if n.all_processes["raylet"][0].process.pid == int(argument))
                cluster.remove_node(victim)
                print("removed", flush=True)
            elif command == "add":
                cluster.add_node(num_cpus=1)
                cluster.wait_for_nodes()
                print("added", flush=True)
    finally:
        cluster.shutdown()


if __name__ == "__main__":
    main()
