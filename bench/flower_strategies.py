"""Compute the reference numbers of tests/federated/test_server_rules.py with Flower's own code, and print
them as Python literals, on the inputs of tests/federated/flower_cases.py.

Run with a throwaway venv that has Flower (``bash bench/setup_flower.sh`` makes bench/.flower-venv, or
``python3 -m venv /tmp/flwr && /tmp/flwr/bin/pip install flwr==1.41.0 numpy``), never with fedsup's: the
tests hold the numbers and must not import Flower::

    bench/.flower-venv/bin/python bench/flower_strategies.py            # prints REFERENCE = {...}
    bench/.flower-venv/bin/python bench/flower_strategies.py --search   # seeds where the two Bulyans differ

Primary numbers come from the Message-API strategies in ``flwr.serverapp.strategy`` (Flower's current API,
whose option names fedsup uses), driven the way Flower's ServerApp loop drives them. Every number is
cross-checked against the legacy ``flwr.server.strategy`` code (``aggregate_fit`` / ``aggregate.py``) to 1e-12,
except Bulyan, whose reference is the legacy iterative ``aggregate_bulyan`` (the paper's algorithm); the
one-shot serverapp Bulyan is printed beside it for the case where the two differ.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from flwr.common import (
    Array,
    ArrayRecord,
    Code,
    FitRes,
    Message,
    MetricRecord,
    RecordDict,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server.strategy import FedAdagrad as LegacyFedAdagrad
from flwr.server.strategy import FedAdam as LegacyFedAdam
from flwr.server.strategy import FedAvgM as LegacyFedAvgM
from flwr.server.strategy import FedYogi as LegacyFedYogi
from flwr.server.strategy.aggregate import aggregate, aggregate_bulyan, aggregate_krum
from flwr.serverapp import strategy as serverapp
from flwr.supercore.task_identity import TaskIdentity

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "federated"))
import flower_cases as inputs  # noqa: E402 - found through the path above

# Message() needs a run and node identity, which a real ServerApp process would have.
TaskIdentity.run_id = 1
TaskIdentity.node_id = 1
TaskIdentity.task_id = 1
logging.getLogger("flwr").setLevel(logging.ERROR)

Arrays = dict[str, np.ndarray]

# Options of each stateful case, in fedsup's (= Flower serverapp's) names.
OPT_CASES: dict[str, tuple[str, dict[str, float]]] = {
    "fedavgm_default": ("fedavgm", {}),
    "fedavgm_lr": ("fedavgm", {"server_learning_rate": 0.7}),
    "fedavgm_momentum": ("fedavgm", {"server_learning_rate": 0.5, "server_momentum": 0.9}),
    "fedadam_default": ("fedadam", {}),
    "fedadam_custom": ("fedadam", {"eta": 0.3, "beta_1": 0.5, "beta_2": 0.75, "tau": 0.01}),
    "fedyogi_default": ("fedyogi", {}),
    "fedyogi_custom": ("fedyogi", {"eta": 0.2, "beta_1": 0.6, "beta_2": 0.9, "tau": 0.05}),
    "fedadagrad_default": ("fedadagrad", {}),
    "fedadagrad_custom": ("fedadagrad", {"eta": 0.05, "tau": 0.02}),
}

NEW_OPT = {
    "fedavgm": serverapp.FedAvgM,
    "fedadam": serverapp.FedAdam,
    "fedyogi": serverapp.FedYogi,
    "fedadagrad": serverapp.FedAdagrad,
}
LEGACY_OPT = {
    "fedavgm": LegacyFedAvgM,
    "fedadam": LegacyFedAdam,
    "fedyogi": LegacyFedYogi,
    "fedadagrad": LegacyFedAdagrad,
}
# The serverapp defaults fedsup follows; the legacy classes default tau to 1e-9 for FedAdam and FedAdagrad.
SERVERAPP_TAU = 1e-3


def to_arrays(model: inputs.Model) -> Arrays:
    return {key: np.array(model[key], dtype=np.float64).reshape(shape) for key, shape in inputs.SHAPES.items()}


def to_literal(arrays: Arrays) -> dict[str, list[float]]:
    return {key: [float(v) for v in np.asarray(value, dtype=np.float64).ravel()] for key, value in arrays.items()}


def reply(arrays: Arrays, num_examples: int) -> Message:
    content = RecordDict(
        {
            "arrays": ArrayRecord({key: Array(value) for key, value in arrays.items()}),
            "metrics": MetricRecord({"num-examples": num_examples}),
        }
    )
    return Message(content=content, dst_node_id=0, message_type="train")


def from_record(record: ArrayRecord) -> Arrays:
    return {key: array.numpy() for key, array in record.items()}


def fit_res(arrays: Arrays, num_examples: int) -> tuple[None, FitRes]:
    parameters = ndarrays_to_parameters(list(arrays.values()))
    return None, FitRes(status=Status(Code.OK, ""), parameters=parameters, num_examples=num_examples, metrics={})


def round_clients(round_number: int) -> list[tuple[int, Arrays, int]]:
    # Flower sums in the order replies arrive; fedsup sorts by client_id, so give Flower that order.
    return [(cid, to_arrays(inputs.opt_client_state(round_number, cid)), n) for cid, n in sorted(inputs.OPT_CLIENTS)]


def run_new_opt(kind: str, options: dict[str, float]) -> list[Arrays]:
    """Drive a serverapp strategy as ServerApp's loop does: configure_train's arrays in, aggregate_train out."""
    strategy = NEW_OPT[kind](**options)
    current = to_arrays(inputs.opt_initial())
    rounds = []
    for round_number in range(1, inputs.OPT_ROUNDS + 1):
        _configure(strategy, kind, current)
        replies = [reply(arrays, n) for _, arrays, n in round_clients(round_number)]
        record, _ = strategy.aggregate_train(round_number, replies)
        current = from_record(record)
        rounds.append(current)
    return rounds


def _configure(strategy: Any, kind: str, current: Arrays) -> None:
    # What configure_train stores, without building a Grid: FedOpt keeps the round's arrays as numpy,
    # FedAvgM keeps the first round's ArrayRecord and then its own output.
    if kind == "fedavgm":
        if strategy.current_arrays is None:
            strategy.current_arrays = ArrayRecord({key: Array(value) for key, value in current.items()})
    else:
        strategy.current_arrays = {key: value.copy() for key, value in current.items()}


def run_legacy_opt(kind: str, options: dict[str, float]) -> list[Arrays]:
    legacy_options = dict(options)
    if kind != "fedavgm":
        legacy_options.setdefault("tau", SERVERAPP_TAU)
    initial = to_arrays(inputs.opt_initial())
    strategy = LEGACY_OPT[kind](initial_parameters=ndarrays_to_parameters(list(initial.values())), **legacy_options)
    rounds = []
    for round_number in range(1, inputs.OPT_ROUNDS + 1):
        results = [fit_res(arrays, n) for _, arrays, n in round_clients(round_number)]
        parameters, _ = strategy.aggregate_fit(round_number, results, [])
        rounds.append(dict(zip(inputs.SHAPES, parameters_to_ndarrays(parameters), strict=True)))
    return rounds


def assert_close(name: str, left: list[Arrays], right: list[Arrays], tol: float = 1e-12) -> None:
    for a, b in zip(left, right, strict=True):
        for key in a:
            if not np.allclose(a[key], b[key], rtol=0, atol=tol):
                raise AssertionError(f"{name}: serverapp and legacy Flower disagree on {key}: {a[key]} vs {b[key]}")


def robust_clients(seed: int, ids: list[int] | None = None) -> list[tuple[int, Arrays, int]]:
    chosen = [(cid, n) for cid, n in inputs.ROBUST_CLIENTS if ids is None or cid in ids]
    return [(cid, to_arrays(inputs.robust_state(seed, cid)), n) for cid, n in chosen]


def new_robust(cls: Callable[..., Any], clients: list[tuple[int, Arrays, int]], **options: int) -> Arrays | None:
    record, _ = cls(**options).aggregate_train(1, [reply(arrays, n) for _, arrays, n in clients])
    return None if record is None else from_record(record)


def legacy_results(clients: list[tuple[int, Arrays, int]]) -> list[tuple[list[np.ndarray], int]]:
    return [(list(arrays.values()), n) for _, arrays, n in clients]


def named(values: list[np.ndarray]) -> Arrays:
    return dict(zip(inputs.SHAPES, values, strict=True))


def krum_reference(seed: int, f: int, select: int | None) -> dict[str, list[float]]:
    """Krum (select None) or MultiKrum, from serverapp, checked against legacy aggregate_krum."""
    clients = robust_clients(seed)
    if select is None:
        new = new_robust(serverapp.Krum, clients, num_malicious_nodes=f)
        legacy = named(aggregate_krum(legacy_results(clients), f, 0))
    else:
        new = new_robust(serverapp.MultiKrum, clients, num_malicious_nodes=f, num_nodes_to_select=select)
        legacy = named(aggregate_krum(legacy_results(clients), f, select))
    assert new is not None
    assert_close(f"krum f={f} select={select}", [new], [legacy])
    return to_literal(new)


def bulyan_pair(seed: int, f: int, ids: list[int] | None = None) -> tuple[Arrays, Arrays]:
    """(paper's iterative aggregate_bulyan, serverapp's one-shot Bulyan) on the same clients."""
    clients = robust_clients(seed, ids)
    iterative = named(aggregate_bulyan(legacy_results(clients), f, aggregate_krum, to_keep=0))
    one_shot = new_robust(serverapp.Bulyan, clients, num_malicious_nodes=f)
    assert one_shot is not None
    return iterative, one_shot


def differs(a: Arrays, b: Arrays) -> float:
    return max(float(np.max(np.abs(a[key] - b[key]))) for key in a)


def search(limit: int = 200) -> None:
    for seed in range(1, limit):
        iterative, one_shot = bulyan_pair(seed, 1)
        gap = differs(iterative, one_shot)
        if gap > 1e-6:
            print(f"seed {seed}: iterative and one-shot Bulyan differ by up to {gap}")


def fedavg_reference() -> dict[str, list[float]]:
    clients = round_clients(1)
    legacy = named(aggregate([(list(arrays.values()), n) for _, arrays, n in clients]))
    new = new_robust(serverapp.FedAvg, clients)
    assert new is not None
    assert_close("fedavg", [new], [legacy])
    return to_literal(legacy)


def main() -> None:
    if "--search" in sys.argv:
        search()
        return
    import flwr

    reference: dict[str, Any] = {"flwr_version": flwr.__version__, "fedavg_round1": fedavg_reference()}
    for name, (kind, options) in OPT_CASES.items():
        new_rounds = run_new_opt(kind, options)
        assert_close(name, new_rounds, run_legacy_opt(kind, options))
        reference[name] = {"options": options, "rounds": [to_literal(r) for r in new_rounds]}
    for f in (0, 1, 2):
        reference[f"krum_f{f}"] = krum_reference(inputs.ROBUST_SEED, f, None)
    for f, select in ((0, 3), (1, 1), (1, 4), (2, 5)):
        reference[f"multikrum_f{f}_m{select}"] = krum_reference(inputs.ROBUST_SEED, f, select)
    for f in (0, 1):
        iterative, one_shot = bulyan_pair(inputs.ROBUST_SEED, f)
        reference[f"bulyan_f{f}"] = to_literal(iterative)
    # Seven clients, the smallest count Bulyan takes with f=1 (4f + 3); the outliers 7 and 8 left out.
    iterative, _ = bulyan_pair(inputs.ROBUST_SEED, 1, ids=list(range(7)))
    reference["bulyan_f1_n7"] = to_literal(iterative)
    iterative, one_shot = bulyan_pair(inputs.BULYAN_DIFFERS_SEED, 1)
    if differs(iterative, one_shot) < 1e-6:
        raise AssertionError("BULYAN_DIFFERS_SEED no longer separates the two Bulyans; rerun with --search")
    reference["bulyan_differs_iterative"] = to_literal(iterative)
    reference["bulyan_differs_one_shot"] = to_literal(one_shot)
    print("REFERENCE = " + repr(reference))


if __name__ == "__main__":
    main()
