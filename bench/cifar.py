#!/usr/bin/env python
"""The CIFAR-shaped workload (bench/cifar_clients.py: a small CNN, 1,000 clients of 50 images, 50 a round,
20 rounds, batch 10, one local epoch) on fedsup, a 2-process pool and one plain process, in one run.

    python bench/cifar.py                   # the full workload
    python bench/cifar.py --rounds 5        # fewer rounds

Each variant runs in a fresh interpreter (this script with ``--one VARIANT``) that imports torch (and fedsup)
before its timer starts and prints one ``BENCH_JSON`` line; the rounds' clients are fedsup's own sampling
(``sample_clients(0, round, 1000, 50)``) for every variant, and every variant must end with the in-process
model. Target: fedsup within 1.10x of the pool.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

HERE = Path(__file__).resolve().parent
POOL_TARGET, PFL_TARGET = 1.10, 1.2
VARIANTS = ("fedsup", "pool2", "inprocess")
PFL_PY = HERE / ".pfl-venv" / "bin" / "python"   # bash bench/setup_pfl.sh
FLOWER_PY = HERE / ".flower-venv" / "bin" / "python"   # bash bench/setup_flower.sh
FLOWER_TARGET = 1.0  # fedsup faster than Flower


def plan(clients: int, rounds: int, per_round: int) -> dict[int, list[int]]:
    from fedsup.federated.rounds import sample_clients

    return {r: sample_clients(0, r, clients, per_round) for r in range(1, rounds + 1)}


def run_fedsup(clients: int, rounds: int, per_round: int) -> Any:
    import torch

    import fedsup

    output = Path(tempfile.mkdtemp(prefix="fedsup-bench-cifar-")) / "run"
    config = {"name": "cifar", "seed": 0, "output": str(output),
              "task": {"class": f"{HERE / 'cifar_clients.py'}:CNNClient"},
              "federation": {"clients": clients, "rounds": rounds, "clients_per_round": per_round,
                             "evaluate": False},
              "supervisor": {"devices": "cpu"}}
    summary = fedsup.run(config)
    if summary["status"] != "finished":
        raise RuntimeError(f"fedsup.run ended {summary['status']}")
    return torch.load(output / "checkpoints" / "final.pt", weights_only=True)


def run_rounds(clients_by_round: dict[int, list[int]], pool: Any | None) -> Any:
    import cifar_clients
    import fl_clients

    state = cifar_clients.initial_state()
    for round_, chosen in sorted(clients_by_round.items()):
        jobs = [(c, round_, state) for c in chosen]
        results = pool.starmap(cifar_clients.client_job, jobs) if pool is not None else \
            [cifar_clients.client_job(*job) for job in jobs]
        state = fl_clients.fedavg(state, [(c, r["state"], r["num_examples"]) for c, r in zip(chosen, results,
                                                                                          strict=True)])
    return state


def one(variant: str, clients: int, rounds: int, per_round: int) -> int:
    imports = common.import_first("torch", "cifar_clients", "fl_clients",
                                  *(("fedsup", "fedsup.federated.runner") if variant == "fedsup" else ()))
    import fl_clients

    common.pin_one_thread()
    chosen = plan(clients, rounds, per_round)
    t0 = time.perf_counter()
    if variant == "fedsup":
        final = run_fedsup(clients, rounds, per_round)
    elif variant == "pool2":
        with common.fork_pool(2) as pool:
            final = run_rounds(chosen, pool)
    else:
        final = run_rounds(chosen, None)
    wall = time.perf_counter() - t0
    common.emit({"wall": wall, "imports": imports, "fingerprint": fl_clients.fingerprint(final)})
    return 0


def measure(variant: str, args: argparse.Namespace) -> dict[str, Any]:
    command = [sys.executable, str(Path(__file__).resolve()), "--one", variant, "--clients", str(args.clients),
               "--rounds", str(args.rounds), "--per-round", str(args.per_round)]
    done = subprocess.run(command, capture_output=True, text=True)
    line = next((x for x in done.stdout.splitlines() if x.startswith(common.MARK)), None)
    if done.returncode != 0 or line is None:
        raise RuntimeError(f"{variant} failed:\n{done.stderr[-3000:]}")
    return dict(json.loads(line[len(common.MARK):]))


def measure_pfl(args: argparse.Namespace) -> dict[str, Any]:
    """bench/pfl_peer.py in pfl's venv, on the same rounds' clients."""
    return measure_peer(PFL_PY, "pfl_peer.py", args, [])


def measure_peer(python: Path, script: str, args: argparse.Namespace, extra: list[str]) -> dict[str, Any]:
    """A peer's script in its own venv, on the same rounds' clients; its one BENCH_JSON line."""
    rounds = json.dumps({str(r): ids for r, ids in plan(args.clients, args.rounds, args.per_round).items()})
    command = [str(python), str(HERE / script), "--clients", str(args.clients), "--rounds", str(args.rounds),
               "--per-round", str(args.per_round), "--plan", rounds, *extra]
    done = subprocess.run(command, capture_output=True, text=True)
    line = next((x for x in done.stdout.splitlines() if x.startswith(common.MARK)), None)
    if done.returncode != 0 or line is None:
        raise RuntimeError(f"{script} failed:\n{done.stderr[-3000:]}")
    return dict(json.loads(line[len(common.MARK):]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--per-round", type=int, default=50)
    parser.add_argument("--one", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        return one(args.one, args.clients, args.rounds, args.per_round)
    started = time.perf_counter()
    results = {v: measure(v, args) for v in VARIANTS}
    pfl = measure_pfl(args) if PFL_PY.exists() else None
    flower = measure_peer(FLOWER_PY, "flower_peer.py", args, ["--workload", "cifar"]) if FLOWER_PY.exists() else None
    reference = results["inprocess"]["fingerprint"]
    print(f"{args.clients} clients of 50 images, {args.rounds} rounds of {args.per_round}, small CNN, batch 10")
    print(f"{'variant':<10} {'wall s':>8} {'/pool2':>7}  model")
    for variant, result in results.items():
        same = "= inprocess" if result["fingerprint"] == reference else "DIFFERS from inprocess"
        print(f"{variant:<10} {result['wall']:8.2f} {result['wall'] / results['pool2']['wall']:6.2f}x  {same}")
    if flower is not None:
        same = "= inprocess" if flower["fingerprint"] == reference else "DIFFERS from inprocess"
        print(f"{'flower':<10} {flower['wall']:8.2f} {flower['wall'] / results['pool2']['wall']:6.2f}x  {same}")
    else:
        print("flower: bench/.flower-venv missing (bash bench/setup_flower.sh): not run")
    if pfl is not None:
        print(f"{'pfl 0.6':<10} {pfl['wall']:8.2f} {pfl['wall'] / results['pool2']['wall']:6.2f}x  its own local "
              "loop and aggregation: not compared")
    else:
        print("pfl: bench/.pfl-venv missing (bash bench/setup_pfl.sh): not run")
    ratio = results["fedsup"]["wall"] / results["pool2"]["wall"]
    print(f"\nfedsup / pool2 {ratio:.2f}  target <= {POOL_TARGET}  {common.verdict(ratio <= POOL_TARGET)}")
    if flower is not None:
        vs_flower = results["fedsup"]["wall"] / flower["wall"]
        print(f"fedsup / flower {vs_flower:.2f}  target < {FLOWER_TARGET}  {common.verdict(vs_flower < FLOWER_TARGET)}")
    if pfl is not None:
        vs_pfl = results["fedsup"]["wall"] / pfl["wall"]
        print(f"fedsup / pfl   {vs_pfl:.2f}  target <= {PFL_TARGET}   {common.verdict(vs_pfl <= PFL_TARGET)}")
    print(common.end_line(started))
    return 0 if all(r["fingerprint"] == reference for r in results.values()) else 1


if __name__ == "__main__":
    common.run_main(main)
