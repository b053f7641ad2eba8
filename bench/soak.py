"""The full reliability soak: every figure in docs/reliability.md comes from one run of this script.

    python bench/soak.py                  # the full soak (about 15 minutes on 2 cores)
    python bench/soak.py --scale 0.3      # a shorter one

1. chaos: a federated run with every kind of fault injected and an outside killer SIGKILLing task processes
   and the fork server; every round must complete and the final model equal the unfaulted run's, bit for bit
2. main-process kills: SIGKILL the supervisor at random moments and resume each time until the run is done;
   the same model, no finished task run twice, no worker left after any kill
3. config fuzzing: random YAML and mutated configs through the loader; never anything but ConfigError
4. load: 1,000 and 10,000 no-op tasks through the engine (per-task cost, supervisor memory), and a
   1,000-client federated round (never more than max_loaded task processes alive)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fedsup.federated.chaos import Killer, differing_checkpoints, fault_figures, finished_twice, read_events  # noqa: E402


def config(output: Path, clients: int, rounds: int, per_round: int, faults: dict[str, Any] | None = None,
           max_loaded: int = 4) -> dict[str, Any]:
    data: dict[str, Any] = {
        "name": "soak", "seed": 11,
        "task": {"class": "fedsup.examples.synthetic:SyntheticClient",
                 "args": {"samples": 300, "test_samples": 200}},
        "federation": {"clients": clients, "rounds": rounds, "clients_per_round": per_round,
                       "min_clients": per_round},
        "supervisor": {"devices": "cpu", "max_loaded": max_loaded, "max_retries": 4, "max_interrupts": 20,
                       "retry_backoff": 0.05, "timeouts": {"load": 20, "train": 3}},
        "output": str(output),
    }
    if faults:
        data["faults"] = faults
    return data


def start(data: dict[str, Any], path: Path, *extra: str) -> subprocess.Popen[bytes]:
    path.write_text(yaml.safe_dump(data))
    return subprocess.Popen([sys.executable, "-m", "fedsup", "run", str(path), *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def finish(process: subprocess.Popen[bytes]) -> None:
    _, err = process.communicate()
    if process.returncode != 0:
        raise SystemExit(f"a run failed ({process.returncode}):\n{err.decode()[-3000:]}")


def chaos(work: Path, scale: float) -> dict[str, Any]:
    clients, rounds = max(20, int(60 * scale)), max(3, int(6 * scale))
    per_round = max(8, int(20 * scale))
    finish(start(config(work / "plain", clients, rounds, per_round), work / "plain.yaml"))
    faults = {"probability": 0.3, "seed": 5, "kinds": ["exception", "exit", "sigkill", "cuda_oom", "hang"],
              "phases": ["load", "train"], "max_per_task": 1}
    began = time.monotonic()
    process = start(config(work / "chaos", clients, rounds, per_round, faults), work / "chaos.yaml")
    killer = Killer(process.pid, kills=max(10, int(40 * scale)), seed=3)
    killer.start()
    finish(process)
    killer.stop()
    figures = fault_figures(work / "chaos")
    rounds_done = len((work / "chaos" / "rounds.jsonl").read_text().splitlines())
    return {"clients": clients, "rounds": rounds, "clients_per_round": per_round, "rounds_completed": rounds_done,
            **figures, "outside_kills": {k: killer.killed.count(k) for k in ("task", "server")},
            "differing_checkpoints": differing_checkpoints(work / "plain", work / "chaos"),
            "seconds": round(time.monotonic() - began, 1)}


def main_kills(work: Path, scale: float) -> dict[str, Any]:
    clients, rounds, per_round = max(20, int(60 * scale)), max(3, int(6 * scale)), max(8, int(20 * scale))
    rng = random.Random(7)
    data = config(work / "killed", clients, rounds, per_round)
    kills, orphans = 0, 0
    target = max(4, int(10 * scale))
    while True:
        # a run killed before it wrote anything holds nothing to resume (--resume says so): start it again
        begun = (work / "killed" / "events.jsonl").exists()
        process = start(data, work / "killed.yaml", *(["--resume"] if begun else []))
        if kills >= target:
            finish(process)
            break
        try:
            # short enough that most runs are cut: an undisturbed one takes a few seconds on 2 cores
            process.wait(timeout=rng.uniform(0.5, 2.5))
        except subprocess.TimeoutExpired:
            family = psutil.Process(process.pid).children(recursive=True)
            process.send_signal(signal.SIGKILL)
            process.wait()
            kills += 1
            _, alive = psutil.wait_procs(family, timeout=30)
            orphans += len(alive)
            continue
        finish(process)  # it ended before the moment came: it must have ended well
        break
    return {"main_process_kills": kills, "workers_left_after_kills": orphans,
            "resumes": sum(1 for e in read_events(work / "killed") if e.get("event") == "run_started") - 1,
            "finished_twice": finished_twice(work / "killed"),
            "differing_checkpoints": differing_checkpoints(work / "plain", work / "killed")}


def fuzz(scale: float) -> dict[str, Any]:
    examples = max(500, int(5000 * scale))
    env = {**os.environ, "FEDSUP_FUZZ_EXAMPLES": str(examples)}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           str(ROOT / "tests" / "test_config.py"), "-k", "mutated or random_yaml"],
                          env=env, capture_output=True, text=True, cwd=ROOT)
    return {"fuzzed_inputs": 2 * examples, "unhandled_exceptions": 0 if done.returncode == 0 else "see log",
            "pytest": done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr[-500:]}


LOAD_SCRIPT = """
import json, resource, sys, time
import fedsup
from fedsup.engine.supervisor import Supervisor
class Noop(fedsup.Task):
    def load(self): pass
    def train(self, device): return None
def peak(): return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
if __name__ == "__main__":
    n = int(sys.argv[1])
    tasks = [Noop(f"t{i}") for i in range(n)]
    before = peak()
    started = time.perf_counter()
    supervisor = Supervisor(devices="cpu")
    records = supervisor.run(tasks)
    wall = time.perf_counter() - started
    print(json.dumps({"tasks": n, "wall": wall, "per_task_ms": 1000 * wall / n,
                      "finished": sum(r.ok for r in records), "rss_growth": peak() - before,
                      "peak_processes": supervisor.scheduler.peak_procs, "max_loaded": supervisor.policy.max_loaded}))
"""


def load(work: Path, scale: float) -> dict[str, Any]:
    script = work / "load_run.py"
    script.write_text(LOAD_SCRIPT)
    results = []
    for n in (1000, max(1000, int(10000 * scale))):
        done = subprocess.run([sys.executable, str(script), str(n)], capture_output=True, text=True, check=True)
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    clients = max(200, int(1000 * scale))
    data = config(work / "wide", clients, 1, clients, max_loaded=8)
    process = start(data, work / "wide.yaml")
    peak = 0
    while process.poll() is None:  # sample the tree: task processes (the fork servers' children) <= max_loaded
        try:
            servers = psutil.Process(process.pid).children()
            tasks = [child for server in servers for child in server.children()]
        except psutil.NoSuchProcess:
            continue  # one of them ended between the two reads: sample again
        peak = max(peak, len(tasks))
        time.sleep(0.05)
    finish(process)
    return {"engine": results, "federated_clients": clients, "max_loaded": 8, "peak_task_processes_seen": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=1.0, help="size of every part (1.0: the full soak)")
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument("--parts", default="chaos,kills,fuzz,load")
    args = parser.parse_args()
    parts = args.parts.split(",")
    figures: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="fedsup-soak-") as tmp:
        work = Path(tmp)
        if "chaos" in parts or "kills" in parts:
            figures["chaos"] = chaos(work, args.scale)
            print("chaos:", json.dumps(figures["chaos"]), flush=True)
        if "kills" in parts:
            figures["main_kills"] = main_kills(work, args.scale)
            print("main-process kills:", json.dumps(figures["main_kills"]), flush=True)
        if "fuzz" in parts:
            figures["fuzz"] = fuzz(args.scale)
            print("fuzz:", json.dumps(figures["fuzz"]), flush=True)
        if "load" in parts:
            figures["load"] = load(work, args.scale)
            print("load:", json.dumps(figures["load"]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
