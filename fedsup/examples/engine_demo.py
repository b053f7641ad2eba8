"""Run synthetic MLP clients through the supervisor and show what each cost.

    python -m fedsup.examples.engine_demo --clients 20 --run-dir runs/engine-demo
"""

from __future__ import annotations

import argparse
import logging
import time

from fedsup import FaultPlan, Supervisor
from fedsup.engine.units import format_bytes
from fedsup.examples.synthetic import SyntheticClient


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--run-dir", default="runs/engine-demo")
    parser.add_argument("--faults", type=float, default=0.0, help="probability of an injected fault per phase")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    clients = [SyntheticClient(i, estimate_memory="256MiB") for i in range(args.clients)]
    faults = FaultPlan(probability=args.faults, seed=0) if args.faults else None
    started = time.perf_counter()
    records = Supervisor(devices="auto", run_dir=args.run_dir, faults=faults, retry_backoff=0.1).run(clients)
    wall = time.perf_counter() - started

    header = ("task", "status", "tries", "device", "train s", "cpu s", "peak RSS", "accuracy")
    print("{:<12}{:<10}{:>6}{:>8}{:>9}{:>7}{:>11}{:>10}".format(*header))
    for r in records:
        accuracy = f"{r.result['accuracy']:.3f}" if r.ok else "-"
        train = f"{r.train.duration:.2f}" if r.train else "-"
        print(f"{r.task_id:<12}{r.status.value:<10}{r.attempts:>6}{r.device or '-':>8}{train:>9}"
              f"{r.cpu_time:>7.2f}{format_bytes(r.peak_memory):>11}{accuracy:>10}")
    done = sum(r.ok for r in records)
    print(f"\n{done}/{len(records)} finished in {wall:.1f} s; records and logs in {args.run_dir}/")


if __name__ == "__main__":
    main()
