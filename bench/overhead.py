#!/usr/bin/env python
"""How much does fedsup cost, per task, against a plain process pool?

    python bench/overhead.py              # the full bench: 200 no-op tasks, 100 MLP clients
    python bench/overhead.py --quick      # a smaller version (40 no-op, 20 MLP), well under a minute
    python bench/overhead.py --repeat 3   # every variant three times, medians reported

Every measured variant runs in a fresh Python subprocess (this script again, with ``--variant NAME``), which
imports torch, numpy, fedsup and the workloads *before* its timer starts, as a user script would, and prints
one ``BENCH_JSON {...}`` line that this parent collects. Neither variant inherits the other's warm state.

Workloads (see ``bench/workloads.py``):

* ``noop``: tasks whose ``load()`` and ``train()`` do nothing. ``Supervisor(devices="cpu").run(tasks)``
  divided by the number of tasks is fedsup's own overhead per task. For comparison: the wall time of one
  ``spawn`` child that imports torch (what a task would cost without the fork server).
* ``mlp``: one federated client per task: 2,000 seeded samples of 32 features, a 32-64-10 MLP, one epoch of
  SGD (batch 32, lr 0.01). The baseline is the same work mapped over a ``fork`` ``Pool`` with one worker
  per core, each worker pinned to one torch thread, as fedsup pins a ``cpus=1`` task. A sequential loop in
  one process (one thread) is shown for reference: half its time is what perfect 2-core scaling would give.

Each workload runs under fedsup twice: ``fedsup-noop`` / ``fedsup-mlp`` with fedsup's defaults
(``tasks_per_process="auto"``: a process whose task finished cleanly in under 1 s loads the next one, up to
100), which the targets judge; ``fedsup-noop-fresh`` / ``fedsup-mlp-fresh`` with ``tasks_per_process=1``, a
fresh process for every task, whose figures are shown for information.

The script reports; it does not judge: it exits 0 when a target is missed and 1 when a run errors.
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import common
from common import HERE, fmt

NOOP_TARGET_MS = 20.0      # fedsup's overhead per no-op task
MLP_TARGET_RATIO = 1.15    # fedsup wall time / pool wall time, MLP clients

FULL = {"noop": 200, "mlp": 100, "spawn_runs": 3}
QUICK = {"noop": 40, "mlp": 20, "spawn_runs": 1}


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


# ====================================================================== inside a variant's subprocess


def _record_stats(records: list[Any], wall: float, t0_epoch: float, n: int) -> dict[str, Any]:
    """What fedsup's own records say: when the first task started, and per-phase medians."""
    out: dict[str, Any] = {}
    # The first load() as the child clocked it: Supervisor setup plus the fork server's start and warm-up.
    starts = [a.load.started for r in records for a in r.history if a.load is not None]
    if starts:
        out["startup"] = min(starts) - t0_epoch
        out["steady_per_task"] = (wall - out["startup"]) / n
    for phase in ("load", "train"):
        recs = [getattr(r, phase) for r in records if getattr(r, phase) is not None]
        if recs:
            out[f"{phase}_wall_median"] = statistics.median(p.duration for p in recs)
            out[f"{phase}_cpu_median"] = statistics.median(p.cpu_time for p in recs)
    durations = [r.duration for r in records if r.duration is not None]
    if durations:
        out["task_wall_median"] = statistics.median(durations)
    return out


def _fedsup_variant(kind: str, fresh: bool = False) -> Callable[[int], dict[str, Any]]:
    """fedsup's defaults (tasks_per_process "auto"), or with ``fresh`` a fresh process per task."""
    options: dict[str, Any] = {"tasks_per_process": 1} if fresh else {}

    def run(n: int) -> dict[str, Any]:
        import workloads

        tasks = ([workloads.NoopTask(f"noop-{i}") for i in range(n)] if kind == "noop"
                 else [workloads.MLPTask(i) for i in range(n)])
        records, wall, t0_epoch = common.run_supervised(tasks, **options)
        out: dict[str, Any] = {"wall": wall}
        try:
            out.update(_record_stats(records, wall, t0_epoch, n))
        except (AttributeError, TypeError, ValueError) as exc:  # the records changed shape: time is what counts
            out["stats_error"] = repr(exc)
        if kind == "mlp":
            out["losses"] = [r.result["loss"] for r in records]
            out["threads"] = sorted({r.result["threads"] for r in records})
        return out

    return run


def _pool_mlp(pin: bool) -> Callable[[int], dict[str, Any]]:
    def run(n: int) -> dict[str, Any]:
        import workloads

        t0 = time.perf_counter()
        with common.fork_pool(cores(), pin) as pool:
            results = pool.map(workloads.client_job, range(n))
        wall = time.perf_counter() - t0
        return {"wall": wall, "losses": [r["loss"] for r in results],
                "threads": sorted({r["threads"] for r in results}), "workers": cores()}

    return run


def _sequential_mlp(n: int) -> dict[str, Any]:
    import workloads

    t0 = time.perf_counter()
    common.pin_one_thread()
    results = [workloads.client_job(i) for i in range(n)]
    wall = time.perf_counter() - t0
    return {"wall": wall, "losses": [r["loss"] for r in results], "threads": [1]}


VARIANTS: dict[str, Callable[[int], dict[str, Any]]] = {
    "fedsup-noop": _fedsup_variant("noop"),
    "fedsup-mlp": _fedsup_variant("mlp"),
    "fedsup-noop-fresh": _fedsup_variant("noop", fresh=True),
    "fedsup-mlp-fresh": _fedsup_variant("mlp", fresh=True),
    "pool-mlp": _pool_mlp(pin=True),
    "pool-mlp-unpinned": _pool_mlp(pin=False),
    "sequential-mlp": _sequential_mlp,
}


def run_variant(name: str, n: int) -> int:
    """Child side: import everything first, then time the variant, then print one JSON line."""
    import_torch = common.import_first("torch")
    imports = import_torch + common.import_first("numpy", "workloads", "fedsup")
    import fedsup

    before, load = common.rusage(), os.getloadavg()[0]
    result = VARIANTS[name](n)
    after = common.rusage()
    result.update({
        "variant": name, "tasks": n, "per_task_ms": 1000 * result["wall"] / n, "import_torch": import_torch,
        "imports": imports, "loadavg_before": load, "pid": os.getpid(),
        "cpu": {k: after[k] - before[k] for k in after}, "fedsup": os.path.dirname(fedsup.__file__),
    })
    common.emit(result)
    return 0


# ====================================================================== the parent


def _import_torch() -> None:
    import torch  # noqa: F401


def spawn_child_cost(runs: int) -> dict[str, Any]:
    """Wall time of one ``spawn`` child that imports torch: start, import, exit, join."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        p = ctx.Process(target=_import_torch)
        p.start()
        p.join()
        times.append(time.perf_counter() - t0)
        if p.exitcode != 0:
            raise RuntimeError(f"the spawn child exited with code {p.exitcode}")
    return {"variant": "spawn-child", "tasks": 1, "wall": statistics.median(times), "runs": times,
            "per_task_ms": 1000 * statistics.median(times)}


def _kill_session(proc: subprocess.Popen[str]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def launch(name: str, n: int, timeout: float, verbose: bool) -> dict[str, Any]:
    """Run one variant in a fresh interpreter; return its JSON, or {"error": ...}."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--variant", name, "--tasks", str(n)]
    t0 = time.perf_counter()
    # A session of its own, so that a timeout takes down its fork server, task processes or pool too.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    # Ctrl-C does not reach the variant's own session either: _kill_session ends it then too.
    stdout, stderr, timed_out = common.communicate(proc, timeout, _kill_session)
    if timed_out:
        return {"variant": name, "tasks": n, "error": timed_out}
    elapsed = time.perf_counter() - t0
    if verbose and stderr.strip():
        print(f"--- stderr of {name} ---\n{stderr.rstrip()}\n---", file=sys.stderr)
    result, error = common.read_result(stdout, stderr, proc.returncode, tail=15)
    if error:
        return {"variant": name, "tasks": n, "error": error}
    result["process_wall"] = elapsed
    result["stderr_lines"] = len(stderr.splitlines())
    return result


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """common.median_run of the wall time, with the per-task figure taken again from the median."""
    chosen = common.median_run(runs)
    if "error" not in chosen:
        chosen["per_task_ms"] = 1000 * chosen["wall"] / chosen["tasks"]
    return chosen


def fedsup_origin() -> str:
    """Where fedsup comes from, and the git commit of this checkout (dirty or not), to attribute results."""
    # Found (not imported: that would import torch) from bench/, as the variants import it: the script's
    # folder comes first on their sys.path.
    probe = subprocess.run([sys.executable, "-c", "import importlib.util as u; s = u.find_spec('fedsup'); "
                            "print(s.submodule_search_locations[0] if s else 'not importable')"],
                           capture_output=True, text=True, cwd=HERE)
    where = probe.stdout.strip() or "not importable"
    rev, dirty = common.git_revision()
    return f"fedsup at {where} (git {rev}{'+dirty fedsup/' if dirty else ''})"


def report(results: dict[str, dict[str, Any]], args: argparse.Namespace, sizes: dict[str, int]) -> list[str]:
    lines: list[str] = []
    pool = results.get("pool-mlp", {})
    base = pool.get("wall") if "error" not in pool else None

    def ratio(r: dict[str, Any]) -> str:
        return common.ratio(r["wall"], base) if r.get("workload") == "mlp" and "error" not in r else "-"

    rows = [
        ("no-op", "fedsup (forkserver)", "fedsup-noop", "the default (tasks_per_process: auto)"),
        ("no-op", "fedsup, fresh processes", "fedsup-noop-fresh", "tasks_per_process=1"),
        ("no-op", "spawn child, import torch", "spawn-child", "one child, for comparison"),
        ("mlp 32-64-10", f"pool({cores()}) fork, 1 thread", "pool-mlp", "baseline"),
        ("mlp 32-64-10", "fedsup (forkserver)", "fedsup-mlp", "the default (tasks_per_process: auto)"),
        ("mlp 32-64-10", "fedsup, fresh processes", "fedsup-mlp-fresh", "tasks_per_process=1"),
        ("mlp 32-64-10", "pool, default threads", "pool-mlp-unpinned", "reference: no thread pinning"),
        ("mlp 32-64-10", "sequential, 1 thread", "sequential-mlp", f"reference; /{cores()} = ideal"),
    ]
    header = f"{'workload':<13} {'variant':<27} {'tasks':>5} {'wall s':>8} {'per-task ms':>12} {'vs pool':>8}  notes"
    lines += [header, "-" * len(header)]
    for workload, label, key, note in rows:
        if key not in results:
            continue
        r = results[key]
        r["workload"] = "mlp" if "-mlp" in key else "noop"
        if "error" in r:
            first = r["error"].splitlines()[0]
            lines.append(f"{workload:<13} {label:<27} {r['tasks']:>5} {'ERROR':>8} {'':>12} {'':>8}  {first}")
            continue
        notes = [note] if note else []
        if key == "spawn-child":
            notes = [f"median of {len(r['runs'])}: {common.seconds(r['runs'])} s"]
        if len(r.get("walls", [])) > 1:
            notes.append(f"runs {common.seconds(r['walls'])} s")
        if key == "sequential-mlp":
            notes = [f"reference; /{cores()} = {r['wall'] / cores():.2f} s (perfect scaling)"] + notes[1:]
        lines.append(f"{workload:<13} {label:<27} {r['tasks']:>5} {r['wall']:>8.2f} {r['per_task_ms']:>12.1f} "
                     f"{ratio(r):>8}  {'; '.join(notes)}")

    # ---- targets: judged on fedsup's defaults; the fresh-process variants' figures for information
    lines.append("")
    lines.append("targets")
    lines += target_lines(results, base, "", "the default", judged=True)
    fresh = target_lines(results, base, "-fresh", "fresh processes", judged=False)
    if fresh:
        lines.append("for information, with tasks_per_process=1, a fresh process per task (not judged):")
        lines += fresh

    # ---- details: where the time goes
    lines.append("")
    lines.append("details (CPU seconds during the timed region; 'children' = every process it started, reaped)")
    for key in ("fedsup-noop", "fedsup-noop-fresh", "fedsup-mlp", "fedsup-mlp-fresh", "pool-mlp",
                "pool-mlp-unpinned", "sequential-mlp"):
        r = results.get(key, {})
        if not r or "cpu" not in r:
            continue
        c = r["cpu"]
        total = c["self_user"] + c["self_sys"] + c["kids_user"] + c["kids_sys"]
        lines.append(f"  {key:<18} self {c['self_user']:6.2f}u {c['self_sys']:5.2f}s   children {c['kids_user']:6.2f}u "
                     f"{c['kids_sys']:5.2f}s   = {1000 * total / r['tasks']:6.1f} ms CPU/task   "
                     f"minor faults {int(c['self_minflt'] + c['kids_minflt']) // r['tasks']}/task   "
                     f"threads {r.get('threads', '-')}   load avg {r['loadavg_before']:.2f}")
    for key in ("fedsup-noop", "fedsup-noop-fresh", "fedsup-mlp", "fedsup-mlp-fresh"):
        r = results.get(key, {})
        if not r or "startup" not in r:
            continue
        phases = ", ".join(f"{phase} {fmt(_ms(r, phase + '_wall_median'), '.1f')} ms wall / "
                           f"{fmt(_ms(r, phase + '_cpu_median'), '.1f')} ms CPU" for phase in ("load", "train"))
        lines.append(f"  {key:<18} startup {r['startup']:.2f} s (to the first task's load()), then "
                     f"{1000 * r['steady_per_task']:.1f} ms/task; medians per task: {phases}, "
                     f"whole task {fmt(_ms(r, 'task_wall_median'), '.1f')} ms wall")
    losses = {k: r["losses"] for k, r in results.items() if "losses" in r}
    if len(losses) > 1:
        ref_key = "pool-mlp" if "pool-mlp" in losses else next(iter(losses))
        diffs = {k: max(abs(a - b) for a, b in zip(v, losses[ref_key], strict=True))
                 for k, v in losses.items() if k != ref_key}
        worst = max(diffs.values())
        verdict = "identical" if worst == 0 else ("agree" if worst < 1e-4 else "DIFFER")
        lines.append(f"  mlp results vs {ref_key}: max |loss difference| "
                     + ", ".join(f"{k} {d:.2g}" for k, d in diffs.items()) + f" ({verdict})")
    return lines


def target_lines(results: dict[str, dict[str, Any]], base: float | None, suffix: str, label: str,
                 judged: bool) -> list[str]:
    """The two targets for ``fedsup-noop{suffix}`` and ``fedsup-mlp{suffix}``: PASS/FAIL when ``judged``."""
    def missing(*keys: str) -> str:
        return "ERROR" if any("error" in results.get(k, {}) for k in keys) else "not run"

    def verdict(met: bool) -> str:
        return common.verdict(met) if judged else "(not judged)"

    lines = []
    noop_key, mlp_key = f"fedsup-noop{suffix}", f"fedsup-mlp{suffix}"
    noop, mlp = results.get(noop_key, {}), results.get(mlp_key, {})
    if "wall" in noop:
        ms = noop["per_task_ms"]
        lines.append(f"  no-op overhead per task, {label:<17} {ms:8.1f} ms   target <= {NOOP_TARGET_MS:g} ms"
                     f"     {verdict(ms <= NOOP_TARGET_MS)}")
    elif noop_key in results:
        lines.append(f"  no-op overhead per task, {label:<17} {missing(noop_key)}")
    if "wall" in mlp and base:
        q = mlp["wall"] / base
        lines.append(f"  mlp wall / pool, {label:<25} {q:8.2f}      target <= {MLP_TARGET_RATIO:g}        "
                     f"{verdict(q <= MLP_TARGET_RATIO)}")
    elif mlp_key in results:
        lines.append(f"  mlp wall / pool, {label:<25} {missing(mlp_key, 'pool-mlp')}")
    return lines


def _ms(r: dict[str, Any], key: str) -> float | None:
    return None if r.get(key) is None else 1000 * r[key]


def main(argv: list[str] | None = None) -> int:
    parser = common.make_parser(__doc__)
    parser.add_argument("--quick", action="store_true", help="40 no-op tasks, 20 MLP tasks, 1 spawn child")
    parser.add_argument("--repeat", type=int, default=1, metavar="N",
                        help="run each variant N times (interleaved) and report the median (default 1)")
    parser.add_argument("--noop-tasks", type=int, help="no-op tasks (default 200, 40 with --quick)")
    parser.add_argument("--mlp-tasks", type=int, help="MLP tasks (default 100, 20 with --quick)")
    parser.add_argument("--spawn-runs", type=int, help="spawn children to time (default 3, 1 with --quick)")
    parser.add_argument("--unpinned-pool", action="store_true",
                        help="also run the pool without pinning torch to one thread per worker (slow: "
                             "OpenMP oversubscription)")
    parser.add_argument("--only", choices=sorted(VARIANTS) + ["spawn-child"], action="append",
                        help="run only these variants (repeatable)")
    common.add_output_options(parser, "also write every result to PATH as JSON", 900.0,
                              "seconds allowed per variant run")
    parser.add_argument("-v", "--verbose", action="store_true", help="show each variant's stderr")
    parser.add_argument("--variant", choices=sorted(VARIANTS), help=argparse.SUPPRESS)
    parser.add_argument("--tasks", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.variant:
        return run_variant(args.variant, args.tasks)
    common.require_positive(parser, args, ("repeat", "noop_tasks", "mlp_tasks", "spawn_runs"))

    preset = QUICK if args.quick else FULL
    sizes = {"noop": args.noop_tasks or preset["noop"], "mlp": args.mlp_tasks or preset["mlp"],
             "spawn_runs": args.spawn_runs or preset["spawn_runs"]}
    plan = [("fedsup-noop", sizes["noop"]), ("fedsup-noop-fresh", sizes["noop"]), ("pool-mlp", sizes["mlp"]),
            ("fedsup-mlp", sizes["mlp"]), ("fedsup-mlp-fresh", sizes["mlp"]), ("sequential-mlp", sizes["mlp"])]
    if args.unpinned_pool:
        plan.append(("pool-mlp-unpinned", sizes["mlp"]))
    if args.only:
        plan = [(name, n) for name, n in plan if name in args.only]
    with_spawn = not args.only or "spawn-child" in args.only

    print(f"fedsup overhead bench: {cores()} cores, Python {platform.python_version()}, {fedsup_origin()}")
    print(f"{'quick' if args.quick else 'full'}: {sizes['noop']} no-op tasks, {sizes['mlp']} MLP tasks, "
          f"repeat {args.repeat}; load average {os.getloadavg()[0]:.2f} at start"
          + ("" if os.getloadavg()[0] < cores() / 2 else " (busy machine: timings will be noisy)"), flush=True)
    started = time.perf_counter()

    runs: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in plan}
    for rep in range(args.repeat):  # interleaved, so that drift in the machine's load hits every variant alike
        for name, n in plan:
            print(f"  [{rep + 1}/{args.repeat}] {name} ({n} tasks) ...", end=" ", flush=True)
            r = launch(name, n, args.timeout, args.verbose)
            print("ERROR" if "error" in r else f"{r['wall']:.2f} s", flush=True)
            runs[name].append(r)
    results = {name: median_run(rs) for name, rs in runs.items()}
    if with_spawn:
        print(f"  spawn child importing torch x{sizes['spawn_runs']} ...", end=" ", flush=True)
        try:
            results["spawn-child"] = spawn_child_cost(sizes["spawn_runs"])
            print(f"{results['spawn-child']['wall']:.2f} s", flush=True)
        except Exception as exc:  # noqa: BLE001 - reported as an error row
            results["spawn-child"] = {"variant": "spawn-child", "tasks": 1, "error": str(exc)}
            print("ERROR", flush=True)

    print()
    for line in report(results, args, sizes):
        print(line)
    errors = {name: r["error"] for name, r in results.items() if "error" in r}
    errors.update({f"{name} (a repeat)": e for name, r in results.items() for e in r.get("errors", [])})
    print(common.end_line(started) + " (the bench's own processes included)")
    status = common.print_errors(errors)
    if args.json:
        common.write_json(args.json, {"sizes": sizes, "repeat": args.repeat, "results": results, "runs": runs})
    return status


if __name__ == "__main__":
    common.run_main(main)
