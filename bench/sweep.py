#!/usr/bin/env python
"""A sweep on one supervisor against the shell loop it replaces, measured in one run.

    python bench/sweep.py              # eight W2-shaped runs: 100 MLP clients, 3 rounds of 10, seeds 0-7
    python bench/sweep.py --quick      # 20 clients a run, seeds 0-3
    python bench/sweep.py --repeat 3 --json sweep.json

Variants, each a whole command timed from this process (so each pays Python's and torch's start, as a user's
shell does), one after another, in turns A B C A B C when repeated:

* ``in a row``: ``fedsup run`` once per seed, one process after another (the shell loop).
* ``sweep``: ``fedsup sweep`` over the same seeds: every run's jobs through one supervisor.
* ``one run``: a single ``fedsup run`` with all the runs' jobs in it (8 x the clients, 8 x per round): what
  one supervisor costs for that much work, the floor a sweep is judged against.

Targets: the sweep at most 0.6x the runs in a row, and at most 1.15x the one run. Every sweep run's final model
is checked bit for bit against the same seed's run alone. The clients are bench/fl_clients.py's (2,000 samples
x 32 features, a 32-64-10 MLP, one epoch).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

HERE = Path(__file__).resolve().parent
IN_A_ROW_TARGET, ONE_RUN_TARGET = 0.6, 1.15


def base(clients: int, per_round: int, output: Path) -> dict[str, Any]:
    return {"name": "bench-sweep", "seed": 0, "output": str(output),
            "task": {"class": f"{HERE / 'fl_clients.py'}:MLPClient"},
            "federation": {"clients": clients, "rounds": 3, "clients_per_round": per_round, "evaluate": False},
            "supervisor": {"devices": "cpu"}}


def fedsup(*args: str) -> float:
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "fedsup", *args], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"fedsup {' '.join(args)} exited {done.returncode}:\n{done.stderr[-3000:]}")
    return wall


def in_a_row(folder: Path, seeds: list[int], clients: int) -> float:
    config = folder / "base.yaml"
    config.write_text(yaml.safe_dump(base(clients, 10, folder / "unused")))
    t0 = time.perf_counter()
    for seed in seeds:
        fedsup("run", str(config), "--set", f"seed={seed}", "--output", str(folder / f"alone-{seed}"))
    return time.perf_counter() - t0


def sweep(folder: Path, seeds: list[int], clients: int) -> float:
    (folder / "base.yaml").write_text(yaml.safe_dump(base(clients, 10, folder / "unused")))
    path = folder / "sweep.yaml"
    path.write_text(yaml.safe_dump({"name": "bench", "base": "base.yaml", "seeds": seeds,
                                    "output": str(folder / "sweep")}))
    return fedsup("sweep", str(path))


def one_run(folder: Path, seeds: list[int], clients: int) -> float:
    config = folder / "big.yaml"
    config.write_text(yaml.safe_dump(base(clients * len(seeds), 10 * len(seeds), folder / "big")))
    return fedsup("run", str(config))


def same_models(folder: Path, seeds: list[int]) -> bool:
    import torch

    for seed in seeds:
        a = torch.load(folder / f"alone-{seed}" / "checkpoints" / "final.pt", weights_only=True)
        b = torch.load(folder / "sweep" / f"base.seed-{seed}" / "checkpoints" / "final.pt", weights_only=True)
        if a.keys() != b.keys() or not all(torch.equal(a[k], b[k]) for k in a):
            return False
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="20 clients a run, 4 seeds")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args()
    started = time.perf_counter()
    seeds = list(range(4 if args.quick else 8))
    clients = 20 if args.quick else 100
    walls: dict[str, list[float]] = {"in a row": [], "sweep": [], "one run": []}
    identical = True
    for _ in range(args.repeat):
        with tempfile.TemporaryDirectory(prefix="fedsup-bench-sweep-") as tmp:
            folder = Path(tmp)
            walls["in a row"].append(in_a_row(folder, seeds, clients))
            walls["sweep"].append(sweep(folder, seeds, clients))
            walls["one run"].append(one_run(folder, seeds, clients))
            identical = identical and same_models(folder, seeds)
    median = {name: statistics.median(values) for name, values in walls.items()}
    print(f"{len(seeds)} runs of {clients} MLP clients, 3 rounds of 10; {args.repeat} repeat(s)")
    print(f"{'variant':<10} {'wall s':>8}  runs")
    for name, values in walls.items():
        print(f"{name:<10} {median[name]:8.2f}  {common.seconds(values)}")
    row = median["sweep"] / median["in a row"]
    one = median["sweep"] / median["one run"]
    print(f"\nsweep / in a row   {row:5.2f}   target <= {IN_A_ROW_TARGET}   {common.verdict(row <= IN_A_ROW_TARGET)}")
    print(f"sweep / one run    {one:5.2f}   target <= {ONE_RUN_TARGET}  {common.verdict(one <= ONE_RUN_TARGET)}")
    print(f"every sweep run's model = the same seed's run alone: {'yes' if identical else 'NO'}")
    print(common.end_line(started))
    if args.json:
        common.write_json(args.json, {"walls": walls, "median": median, "identical": identical})
    return 0 if identical else 1


if __name__ == "__main__":
    common.run_main(main)
