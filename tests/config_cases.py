"""Configs shared by the config tests and the command-line tests: a valid and a minimal config, and the
catalogs of bad configs and bad files with the message each must give."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

STRATEGY_NAMES = ("fedavg, fedmedian, trimmed_mean, fedavgm, fedadam, fedyogi, fedadagrad, krum, multikrum, bulyan, "
                  "scaffold")
FIXTURES = Path(__file__).resolve().parent / "config_fixtures"
TOY = f"{FIXTURES / 'toy_tasks.py'}"
GiB = 1024**3
MiB = 1024**2

VALID: dict[str, Any] = {
    "name": "synthetic-fedavg",
    "seed": 0,
    "task": {
        "class": "fedsup.examples.synthetic:SyntheticClient",
        "args": {"samples": 2000, "features": 32, "classes": 10, "epochs": 1, "batch_size": 32, "lr": 0.01},
        "estimate_memory": "512MiB",
        "estimate_cuda_memory": "1GiB",
        "cpus": 1,
    },
    "federation": {
        "clients": 100, "rounds": 5, "clients_per_round": 10, "min_clients": 8,
        "strategy": "fedavg", "strategy_args": {}, "evaluate": True,
    },
    "supervisor": {
        "devices": "auto", "max_loaded": 8, "max_training": "auto", "max_retries": 3, "max_interrupts": 5,
        "retry_backoff": 0.5, "grace_period": 5, "start_method": "forkserver", "memory_margin": "256MiB",
        "cuda_context_memory": "768MiB", "timeouts": {"load": 600, "train": 3600},
    },
    "faults": {
        "probability": 0.2, "seed": 0, "kinds": ["exception", "exit", "sigkill", "cuda_oom"],
        "phases": ["load", "train"], "max_per_task": 1,
    },
    "checkpoints": {"keep_last": 3, "every": 50},
    "tracking": None,
    "output": "runs/synthetic-fedavg",
}
MINIMAL: dict[str, Any] = {
    "name": "tiny",
    "task": {"class": "fedsup.examples.synthetic:SyntheticClient"},
    "federation": {"clients": 20, "rounds": 3},
}


def changed(path: str, value: Any = None, delete: bool = False, base: dict[str, Any] = VALID) -> dict[str, Any]:
    """A copy of ``base`` with the value at dotted ``path`` replaced (or deleted)."""
    data = copy.deepcopy(base)
    *parents, last = path.split(".")
    target = data
    for key in parents:
        target = target.setdefault(key, {})
    if delete:
        del target[last]
    else:
        target[last] = value
    return data


CATALOG: list[tuple[str, dict[str, Any], str]] = [
    ("unknown-top-key", changed("nmae", "x"), "nmae: unknown key; did you mean 'name'?"),
    ("unknown-nested-key", changed("federation.roundz", 5), "federation.roundz: unknown key; did you mean 'rounds'?"),
    ("unknown-device-key", changed("supervisor.devices", [{"name": "cuda:0", "memroy": "1GiB"}]),
     "supervisor.devices[0].memroy: unknown key; did you mean 'memory'?"),
    ("missing-name", changed("name", delete=True), "name: required key is missing"),
    ("missing-rounds", changed("federation.rounds", delete=True), "federation.rounds: required key is missing"),
    ("section-not-mapping", changed("federation", 5), "federation: expected a mapping of keys (got 5)"),
    ("clients-word", changed("federation.clients", "ten"), "federation.clients: expected a whole number (got 'ten')"),
    ("clients-zero", changed("federation.clients", 0), "federation.clients: must be at least 1 (got 0)"),
    ("rounds-zero", changed("federation.rounds", 0), "federation.rounds: must be at least 1 (got 0)"),
    ("rounds-float", changed("federation.rounds", 2.5), "federation.rounds: expected a whole number (got 2.5)"),
    ("retries-string", changed("supervisor.max_retries", "3"),
     "supervisor.max_retries: expected a whole number (got '3')"),
    ("per-round-over-clients", changed("federation.clients_per_round", 200),
     "federation.clients_per_round: cannot be more than clients (100) (got 200)"),
    ("min-over-per-round", changed("federation.min_clients", 11),
     "federation.min_clients: cannot be more than clients_per_round (10) (got 11)"),
    ("probability", changed("faults.probability", 1.5), "faults.probability: must be at most 1.0 (got 1.5)"),
    ("fault-kind", changed("faults.kinds", ["exception", "sigkil"]),
     "faults.kinds[1]: expected 'exception', 'exit', 'sigkill', 'cuda_oom' or 'hang'; did you mean 'sigkill'? "
     "(got 'sigkil')"),
    ("hang-without-timeout", changed("supervisor.timeouts", {"load": 10}, base=changed("faults.kinds", ["hang"])),
     "faults.kinds: 'hang' needs supervisor.timeouts.train set"),
    ("negative-timeout", changed("supervisor.timeouts.train", -5),
     "supervisor.timeouts.train: must be more than 0.0 (got -5)"),
    ("bad-size", changed("task.estimate_memory", "12 parsecs"),
     "task.estimate_memory: expected a size such as 512MiB, 2GiB or 1.5GB, or a whole number of bytes "
     "(got '12 parsecs')"),
    ("bool-size", changed("supervisor.memory_margin", True), "supervisor.memory_margin: expected a size"),
    ("devices-word", changed("supervisor.devices", "gpu"),
     "supervisor.devices: expected 'auto', 'cpu', a list of GPU indices such as [0, 1]"),
    ("devices-negative", changed("supervisor.devices", [0, -1]), "supervisor.devices[1]: must be at least 0 (got -1)"),
    ("devices-repeated", changed("supervisor.devices", [0, 0]),
     "supervisor.devices[1]: appears twice in devices (got 0)"),
    ("device-memory", changed("supervisor.devices", [{"name": "cuda:0", "memory": "lots"}]),
     "supervisor.devices[0].memory: expected a size"),
    ("device-name", changed("supervisor.devices", [{"name": "gpu0", "memory": "8GiB"}]),
     "supervisor.devices[0].name: expected a name such as 'cuda:0' (got 'gpu0')"),
    ("max-training", changed("supervisor.max_training", 0),
     "supervisor.max_training: expected 'auto' or a whole number >= 1 (got 0)"),
    ("start-method", changed("supervisor.start_method", "fork"),
     "supervisor.start_method: expected 'forkserver' or 'spawn' (got 'fork')"),
    ("strategy", changed("federation.strategy", "fedavgg"),
     f"federation.strategy: expected one of {STRATEGY_NAMES} or 'module:Class'; did you mean 'fedavg'? "
     "(got 'fedavgg')"),
    ("strategy-arg", changed("federation.strategy_args", {"beta": 0.7}, base=changed("federation.strategy",
                                                                                       "trimmed_mean")),
     "federation.strategy_args.beta: expected the fraction trimmed at each end, from 0 to below 0.5 (got 0.7)"),
    ("strategy-unknown-option", changed("federation.strategy_args", {"etaa": 0.1}, base=changed(
        "federation.strategy", "fedadam")), "federation.strategy_args.etaa: fedadam has no option of that name; its "
     "options are eta, eta_l, beta_1, beta_2, tau; did you mean 'eta'? (got 0.1)"),
    ("strategy-option-value", changed("federation.strategy_args", {"server_momentum": 1.5}, base=changed(
        "federation.strategy", "fedavgm")),
     "federation.strategy_args.server_momentum: must be a number in [0, 1) (got 1.5)"),
    ("krum-round-too-small", changed("federation.strategy_args", {"num_malicious_nodes": 3}, base=changed(
        "federation.strategy", "krum")), "federation.min_clients: krum with num_malicious_nodes=3 needs at least 9 "
     "client updates a round, but a round may end with min_clients=8 (clients_per_round=10); raise min_clients and "
     "clients_per_round to 9 or more, or lower num_malicious_nodes (got 8)"),
    ("reserved-arg", changed("task.args.client_id", 3),
     "task.args.client_id: is set by fedsup for each client; remove it from task.args (got 3)"),
    ("negative-seed", changed("seed", -1), "seed: must be at least 0 (got -1)"),
    ("bad-name", changed("name", "my run"),
     "name: expected a name of letters, digits, '.', '_' and '-' (got 'my run')"),
    ("class-spec", changed("task.class", "SyntheticClient"),
     "task.class: expected 'module:Class' or 'path/to/file.py:Class' (got 'SyntheticClient')"),
    ("class-module-missing", changed("task.class", "nosuchmodule:Client"),
     "task.class: cannot import module 'nosuchmodule' (ModuleNotFoundError: No module named 'nosuchmodule') "
     "(got 'nosuchmodule:Client')"),
    ("class-attribute-missing", changed("task.class", "fedsup.examples.synthetic:SyntheticClinet"),
     "task.class: module 'fedsup.examples.synthetic' has no attribute 'SyntheticClinet'; did you mean "
     "'SyntheticClient'? (got 'fedsup.examples.synthetic:SyntheticClinet')"),
    ("class-file-missing", changed("task.class", f"{FIXTURES / 'nothing_here.py'}:Client"),
     f"task.class: file '{FIXTURES / 'nothing_here.py'}' does not exist"),
    ("class-not-task", changed("task.class", f"{TOY}:NotATask"), "task.class: toy_tasks.NotATask is not a subclass of "
     "fedsup.Task"),
    ("class-abstract", changed("task.class", f"{TOY}:Unfinished"),
     "task.class: toy_tasks.Unfinished is abstract: it does not define load(), train()"),
    ("class-module-broken", changed("task.class", f"{FIXTURES / 'broken_tasks.py'}:Client"),
     "task.class: cannot import module 'broken_tasks' (RuntimeError: this module is broken on purpose)"),
    ("class-args", changed("task", {"class": f"{TOY}:Client", "args": {"sise": 3}}),
     "task.args: Client(client_id=0, **task.args) would fail: got an unexpected keyword argument 'sise' "
     "(got {'sise': 3})"),
    ("estimate-in-args", changed("task.args.estimate_memory", "1GiB"),
     "task.args.estimate_memory: belongs in task.estimate_memory, not task.args (got '1GiB')"),
    ("strategy-file", changed("federation.strategy", "strategies.py:Mine"),
     f"federation.strategy: expected one of {STRATEGY_NAMES} or 'module:Class'"),
    ("strategy-not-class", changed("federation.strategy", "os.path:join"),
     "federation.strategy: posixpath.join is not a class (got 'os.path:join')"),
    ("strategy-not-strategy", changed("federation.strategy", "collections:OrderedDict"),
     "federation.strategy: collections.OrderedDict is not a subclass of fedsup.Strategy"),
]


FILES: list[tuple[str, bytes, str]] = [
    ("syntax", b"name: x\ntask: [1, 2\nfederation: 3\n", "run.yaml, line 3, column 11: YAML syntax error"),
    ("unsafe-tag", b"name: x\ntask: !!python/object/apply:os.system [echo hi]\n",
     "run.yaml, line 2, column 7: unsafe or unknown YAML tag '!!python/object/apply:os.system': unsafe tags such as "
     "!!python/object are not allowed"),
    ("top-level-list", b"- name: x\n", "run.yaml: the top level must be a mapping with name, task and federation "
     "(got a list: [{'name': 'x'}])"),
    ("top-level-scalar", b"just words\n", "run.yaml: the top level must be a mapping"),
    ("empty", b"", "run.yaml: the file is empty"),
    ("not-utf8", b"\xff\xfe\x00\x01binary", "run.yaml: not a YAML file (it is not UTF-8 text)"),
    ("duplicate-key", b"name: a\nname: b\n", "name: key written twice (lines 1 and 2)"),
]
