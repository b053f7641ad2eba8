#!/usr/bin/env python
"""The Flower side of ``bench/compare.py``: the MLP workload on Flower's simulation engine (Ray).

Run with the python of Flower's own venv (``bash bench/setup_flower.sh`` makes it)::

    bench/.flower-venv/bin/python bench/flower_peer.py --clients 100 --rounds 1 --per-round 100
    bench/.flower-venv/bin/python bench/flower_peer.py --clients 100 --rounds 3 --per-round 10

compare.py starts it as the ``flower`` variant and reads the one ``BENCH_JSON {...}`` line it prints.

What runs: Flower's message API (``ClientApp``/``ServerApp``, ``flwr.serverapp.strategy.FedAvg``) under
``flwr.simulation.run_simulation`` with ``num_supernodes`` = the number of clients and
``client_resources = {"num_cpus": 1, "num_gpus": 0}`` (Ray then runs one ClientApp actor per core),
federated evaluation off (``fraction_evaluate=0``). The timer covers ``run_simulation`` whole: starting
Ray, registering the nodes, the rounds, and shutting Ray down, as a user of ``flwr`` waits for them.
torch, numpy and flwr are imported before the timer starts.

Two deviations from the stock FedAvg, both so that Flower computes exactly what the other variants do:

* **which clients train**: simulated nodes get random 64-bit ids and the server cannot see their
  ``partition-id``, so the strategy cannot pick "client 37" by itself. The server therefore gives
  client ``c`` the ``c``-th node in sorted node-id order (the same node every round) and sends ``c`` in
  the train config (``client-id``); the ClientApp builds that client's data from it. Per round the clients
  are ``fedsup.federated.rounds.sample_clients(0, round, clients, per_round)``, passed in by compare.py
  (``--plan``); without it every client trains every round. The work per message is the same as with
  ``partition-id`` and random sampling.
* **aggregation**: ``fl_clients.fedavg`` (float64, client-id order) instead of Flower's float32 average,
  so the final model matches fedsup's bit for bit. Its cost is negligible either way.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # fl_clients; Flower hands sys.path to its Ray workers as PYTHONPATH

MARK = "BENCH_JSON "
T_IMPORT0 = time.perf_counter()

import cifar_clients  # noqa: E402
import fl_clients  # noqa: E402
import flwr  # noqa: E402
import numpy  # noqa: E402,F401 - imported before the timer, as any user script would
import ray  # noqa: E402
import torch  # noqa: E402
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402
from flwr.serverapp.strategy import FedAvg  # noqa: E402
from flwr.serverapp.strategy.strategy_utils import sample_nodes  # noqa: E402
from flwr.simulation import run_simulation  # noqa: E402

IMPORTS = time.perf_counter() - T_IMPORT0
WORKLOADS = {"mlp": fl_clients, "cifar": cifar_clients}  # the client's data, model and training (--workload)

# ---------------------------------------------------------------- the client

client_app = ClientApp()


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    config = msg.content["config"]
    cid, round_ = int(config["client-id"]), int(config["server-round"])
    work = WORKLOADS[str(config["workload"])]
    if work is cifar_clients:
        # one thread, as the other variants pin it (num_cpus=1 leaves torch's own count, which changes the
        # convolutions' last bits)
        torch.set_num_threads(1)
    global_state = msg.content["arrays"].to_torch_state_dict()
    x, y = work.make_data(cid)
    out = work.train_client(cid, round_, global_state, x, y)
    metrics = MetricRecord({"num-examples": out["num_examples"], "loss": out["loss"], "client-id": cid,
                            "train-started": out["train_started"], "train-ended": out["train_ended"],
                            "threads": torch.get_num_threads(),
                            "pid": os.getpid()})
    return Message(RecordDict({"arrays": ArrayRecord(out["state"]), "metrics": metrics}), reply_to=msg)


# ---------------------------------------------------------------- the server


class BenchFedAvg(FedAvg):
    """FedAvg that trains the planned client ids each round and averages in float64 (see the docstring)."""

    def __init__(self, plan: dict[int, list[int]], clients: int, workload: str = "mlp") -> None:
        super().__init__(fraction_train=1.0, fraction_evaluate=0.0, min_available_nodes=clients)
        self.plan, self.clients, self.workload = plan, clients, workload
        self.current = WORKLOADS[workload].initial_state()  # the global model, as torch tensors
        self.train_started: list[float] = []
        self.train_ended: list[float] = []
        self.pids: set[int] = set()
        self.threads: set[int] = set()
        self.losses: dict[int, list[float]] = {}

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> list[Message]:
        # Flower's own wait for the nodes to come online (it polls once a second), then a stable mapping.
        _, all_nodes = sample_nodes(grid, self.clients, len(self.plan[server_round]))
        nodes = sorted(all_nodes)
        messages = []
        for cid in self.plan[server_round]:
            cfg = ConfigRecord({"server-round": server_round, "client-id": cid, "workload": self.workload})
            messages.append(Message(RecordDict({"arrays": arrays, "config": cfg}), message_type="train",
                                    dst_node_id=nodes[cid]))
        return messages

    def aggregate_train(self, server_round: int, replies: Any) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        errors = [m.error.reason for m in replies if m.has_error()]
        if errors:
            raise RuntimeError(f"round {server_round}: {len(errors)} client(s) failed: {errors[:3]}")
        updates, losses = [], []
        for m in replies:
            metrics = m.content["metrics"]
            cid, n = int(metrics["client-id"]), int(metrics["num-examples"])
            updates.append((cid, m.content["arrays"].to_torch_state_dict(), n))
            losses.append((cid, n, float(metrics["loss"])))
            self.train_started.append(float(metrics["train-started"]))
            self.train_ended.append(float(metrics["train-ended"]))
            self.pids.add(int(metrics["pid"]))
            self.threads.add(int(metrics["threads"]))
        losses.sort()
        self.losses[server_round] = [loss for _, _, loss in losses]
        self.current = fl_clients.fedavg(self.current, updates)
        total = sum(n for _, n, _ in losses)
        loss = sum(n * value for _, n, value in losses) / total
        return ArrayRecord(self.current), MetricRecord({"loss": loss})


RESULT: dict[str, Any] = {}


def make_server_app(plan: dict[int, list[int]], clients: int, rounds: int, workload: str = "mlp") -> ServerApp:
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        strategy = BenchFedAvg(plan, clients, workload)
        result = strategy.start(grid=grid, initial_arrays=ArrayRecord(strategy.current), num_rounds=rounds)
        RESULT.update(final=strategy.current, train_started=strategy.train_started, train_ended=strategy.train_ended,
                      pids=sorted(strategy.pids),
                      threads=sorted(strategy.threads), losses=strategy.losses,
                      train_metrics={r: dict(m) for r, m in result.train_metrics_clientapp.items()})

    return server_app


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, required=True)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--per-round", type=int, default=None)
    parser.add_argument("--plan", default=None, help="JSON {round: [client ids]}; default: every client")
    parser.add_argument("--cpus-per-client", type=float, default=1.0)
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="mlp",
                        help="the MLP clients of compare.py, or the CNN clients of bench/cifar.py")
    args = parser.parse_args()
    if args.plan:
        plan = {int(r): list(ids) for r, ids in json.loads(args.plan).items()}
    else:
        plan = {r: list(range(args.clients)) for r in range(1, args.rounds + 1)}
    if sorted(plan) != list(range(1, args.rounds + 1)):
        parser.error(f"--plan must name rounds 1..{args.rounds}")

    server_app = make_server_app(plan, args.clients, args.rounds, args.workload)
    backend_config = {"client_resources": {"num_cpus": args.cpus_per_client, "num_gpus": 0.0}}
    t0_epoch, t0 = time.time(), time.perf_counter()
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=args.clients,
                   backend_config=backend_config)
    wall = time.perf_counter() - t0
    if "final" not in RESULT:
        print("the ServerApp did not finish (see the log above)", file=sys.stderr)
        return 1
    print(MARK + json.dumps({
        "wall": wall, "first_train": min(RESULT["train_started"]) - t0_epoch,
        "first_done": min(RESULT["train_ended"]) - t0_epoch, "imports": IMPORTS,
        "fingerprint": fl_clients.fingerprint(RESULT["final"]), "clients_trained": len(RESULT["train_started"]),
        "losses": RESULT["losses"], "threads": RESULT["threads"], "worker_pids": len(RESULT["pids"]),
        "versions": {"flwr": flwr.__version__, "ray": ray.__version__, "torch": torch.__version__,
                     "python": sys.version.split()[0]},
    }), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
