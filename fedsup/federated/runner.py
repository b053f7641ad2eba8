"""A federated run from a config: one call for the CLI, notebooks and scripts.

    summary = fedsup.run("configs/synthetic.yaml", overrides=["federation.rounds=10"])
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from fedsup.engine.devices import Inventory
from fedsup.engine.errors import ConfigError
from fedsup.engine.units import format_bytes, parse_bytes
from fedsup.federated.config import RunConfig, load_config, resolve_class, supervisor_kwargs, to_yaml
from fedsup.federated.registry import make_strategy
from fedsup.federated.rounds import Federation, FederationSpec

ConfigSource = str | os.PathLike[str] | dict[str, Any] | RunConfig


def build_spec(config: RunConfig, output: str | os.PathLike[str] | None = None) -> FederationSpec:
    fed, task = config.federation, config.task
    per_round = fed.clients_per_round or fed.clients
    return FederationSpec(
        name=config.name,
        seed=config.seed,
        task_class=resolve_class(task.class_, None),
        task_args=dict(task.args),
        clients=fed.clients,
        rounds=fed.rounds,
        clients_per_round=per_round,
        min_clients=fed.min_clients or per_round,
        strategy=make_strategy(fed.strategy, fed.strategy_args),
        output=Path(output or config.output),
        evaluate=fed.evaluate,
        proximal_mu=fed.proximal_mu,
        straggler_fraction=fed.stragglers.fraction if fed.stragglers else 0.0,
        straggler_mode=fed.stragglers.mode if fed.stragglers else "partial",
        dropout=fed.dropout,
        reject_nonfinite=fed.reject_nonfinite,
        keep_last=config.checkpoints.keep_last,
        checkpoint_every=config.checkpoints.every,
        task_options={"estimate_memory": task.estimate_memory, "estimate_cuda_memory": task.estimate_cuda_memory,
                      "cpus": task.cpus, "labels": task.labels},
        supervisor=supervisor_kwargs(config),
        config=yaml.safe_load(to_yaml(config)),
        tracking=config.tracking.model_dump() if config.tracking is not None else None,
    )


def prepare(source: ConfigSource, overrides: Sequence[str] = (), output: str | os.PathLike[str] | None = None,
            on_event: Callable[[dict[str, Any]], None] | None = None,
            report: Callable[[Path], Path] | None = None) -> Federation:
    """Validate the config and build the run without starting it (the CLI attaches its live view first).
    ``report``: writes the run's HTML report, for the trackers that keep it (MLflow)."""
    config = load_config(source, overrides)
    return Federation(build_spec(config, output), on_event=on_event, report=report)


def run(source: ConfigSource, *, overrides: Sequence[str] = (), resume: bool = False,
        output: str | os.PathLike[str] | None = None,
        on_event: Callable[[dict[str, Any]], None] | None = None,
        report: Callable[[Path], Path] | None = None) -> dict[str, Any]:
    """Run (or resume) the federated run a config describes; return its summary (also in summary.json).

    ``source`` is a YAML file, a dict of the same shape, or a RunConfig. Raises ConfigError for bad input,
    RunFailed when a round cannot reach ``min_clients``, RunInterrupted on SIGINT/SIGTERM.
    """
    return prepare(source, overrides, output, on_event, report).run(resume=resume)


def placement_plan(source: ConfigSource, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """What a run would do on this machine's inventory, without starting anything (``--dry-run``)."""
    config = load_config(source, overrides)
    spec = build_spec(config)
    kwargs = spec.supervisor
    inventory = Inventory.from_spec(kwargs["devices"], margin=parse_bytes(kwargs["memory_margin"]),
                                    context_memory=parse_bytes(kwargs["cuda_context_memory"]))
    estimate = parse_bytes(config.task.estimate_cuda_memory)
    devices: list[dict[str, Any]] = []
    for gpu in inventory.gpus:
        per_task = inventory.cost(estimate, resident=False)
        fits = max(0, inventory.room(gpu) // per_task) if per_task else None
        devices.append({"name": gpu.name, "memory": format_bytes(gpu.total),
                        "usable": format_bytes(inventory.room(gpu)), "tasks_at_once": fits})
    problem = None
    if inventory.gpus and estimate > inventory.largest_capacity():
        problem = (f"task.estimate_cuda_memory {format_bytes(estimate)} does not fit on any device "
                   f"(largest usable {format_bytes(inventory.largest_capacity())})")
    slots = (sum(d["tasks_at_once"] or 0 for d in devices) if devices
             else inventory.cpu.cores // max(config.task.cpus, 1))
    cluster = _cluster_plan(kwargs, config.task.cpus) if kwargs.get("backend") == "ray" else None
    if cluster is not None and cluster["nodes"]:
        slots = cluster["slots"]
    return {
        "name": spec.name, "output": str(spec.output), "clients": spec.clients, "rounds": spec.rounds,
        "clients_per_round": spec.clients_per_round, "min_clients": spec.min_clients, "strategy": repr(spec.strategy),
        "task": config.task.class_, "estimate_memory": format_bytes(parse_bytes(config.task.estimate_memory)),
        "estimate_cuda_memory": format_bytes(estimate), "devices": devices,
        "cpu_cores": inventory.cpu.cores, "max_loaded": kwargs["max_loaded"] or 2 * inventory.cpu.cores,
        "training_at_once": slots if kwargs["max_training"] is None else min(slots, kwargs["max_training"]),
        "problem": problem,
        "cluster": cluster,
    }


def _cluster_plan(kwargs: dict[str, Any], cpus: int) -> dict[str, Any]:
    """The Ray cluster a ``backend: ray`` run would use: each node as it sees itself, and the job slots its agent
    would offer (its Ray CPUs over the task's cpus). With address ``auto`` and no cluster running, the run
    would start a local Ray: said, not an error."""
    from fedsup.cluster import INSTALL

    try:
        from fedsup.cluster.driver import describe_nodes
    except ImportError:
        raise ConfigError(f"supervisor.backend: 'ray' needs the ray package, which is not installed: {INSTALL}") \
            from None
    address = kwargs.get("ray_address") or "auto"
    try:
        nodes = describe_nodes(address, key="supervisor.ray_address")
    except ConfigError:
        if address != "auto":
            raise
        return {"address": address, "nodes": [], "slots": 0,
                "note": "no Ray cluster is running here: the run would start a local Ray on this machine"}
    for node in nodes:
        node["slots"] = int(node.get("ray_cpus") or 0) // max(cpus, 1)
    return {"address": address, "nodes": nodes, "slots": sum(n["slots"] for n in nodes), "note": None}
