#!/usr/bin/env python
"""How long does each built-in strategy take to aggregate one round, and how much memory does it need?

    python bench/aggregation.py                           # 1,000 updates of a ~1M-parameter model, every strategy
    python bench/aggregation.py --clients 100 --params 200000 --strategies fedavg,krum
    python bench/aggregation.py --scaling none            # skip the Krum/Bulyan scaling table

The updates are written once, as fedsup's rounds write them (one ``torch.save`` file per client, float32),
to a temporary folder that is removed at the end, and every measured run loads them the way fedsup's
rounds do: ``torch.load(path, mmap=True, weights_only=True)``, so the tensors are read-only pages of the
files. Each run is a fresh Python process (this script again, with ``--variant``) that imports torch and
fedsup, maps the updates and builds the strategy *before* its timer starts, then times one
``strategy.aggregate(global_state, updates)``. Server optimisers start from a saved state (random float64
buffers, as after an earlier round), so that their buffers are in memory as in a real round.

The baseline is the plain in-place weighted sum a user would write, in the same process setup: one
accumulator per key in the model's dtype, ``acc.add_(tensor, alpha=num_examples)`` per update, then one
division (``torch-sum``); ``torch-sum-f64`` is the same with float64 accumulators, for information.

Memory: "peak MiB" is the peak of the process's anonymous resident memory (``RssAnon`` in
/proc/self/status, sampled every millisecond by a thread in the run) above its value just before the timer
started. The updates' mapped pages are file pages (``RssFile``): they live in the page cache and are not
counted; they would fill ``VmHWM`` (peak RSS, shown for information) with the whole round's files. The
files are in the page cache when the runs start (written, synced and read once just before), so every
run, the baseline's included, pays the same minor page faults on its first touch of each mapped page.
The baselines run first and last; the faster of their two runs is the one the ratios use.

Targets: FedAvg and each server optimiser within 2x the baseline's wall time; every strategy's peak at
most 8 model-sizes, a model-size being the model's floating parameters in float64 (8 bytes a parameter:
what one float64 accumulator takes; stacking 1,000 updates of a key in float64 takes 1,000 of them).
Krum, MultiKrum and Bulyan are allowed three n x n float64 matrices on top (their distances, whatever
the model's size: 23 MiB at n = 1,000).
The scaling table runs Krum and Bulyan on the first n updates and shows their O(n^2) pairwise-distance
cost: the time ratio beside the n^2 ratio. The script reports; it exits 0 when a target is missed, 1 when
a run errors, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import common
from common import fmt

TIME_TARGET = 2.0          # FedAvg / server optimiser wall time over the baseline's
MEMORY_TARGET = 8.0        # peak anonymous memory, in float64 model-sizes
TIMED = ("fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad")
BASELINES = ("torch-sum", "torch-sum-f64")
SCALING_RULES = ("krum", "bulyan")
PAIRWISE = ("krum", "multikrum", "bulyan")
DEFAULT_SCALING = (100, 250, 500, 1000)
STRATEGY_ORDER = ("fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "scaffold", "fedmedian", "trimmed_mean",
                  "krum", "multikrum", "bulyan")


def options_for(name: str, clients: int) -> dict[str, Any]:
    """Sensible options at this round size: a tenth of the clients Byzantine for the robust rules."""
    f = clients // 10
    return {
        "fedavgm": {"server_learning_rate": 1.0, "server_momentum": 0.9},
        "trimmed_mean": {"beta": 0.1},
        "krum": {"num_malicious_nodes": f},
        "multikrum": {"num_malicious_nodes": f, "num_nodes_to_select": clients - f},
        "bulyan": {"num_malicious_nodes": f},
    }.get(name, {})


def model_shapes(params: int) -> dict[str, tuple[int, ...]]:
    """A small CNN's state (two convolutions, batch norm, two linear layers) of about ``params`` floats."""
    def shapes(s: int) -> dict[str, tuple[int, ...]]:
        c1, c2, hidden = 4 * s, 8 * s, 32 * s
        return {"conv1.weight": (c1, 3, 5, 5), "conv1.bias": (c1,), "conv2.weight": (c2, c1, 5, 5),
                "conv2.bias": (c2,), "bn2.weight": (c2,), "bn2.bias": (c2,), "bn2.running_mean": (c2,),
                "bn2.running_var": (c2,), "fc1.weight": (hidden, c2 * 25), "fc1.bias": (hidden,),
                "fc2.weight": (10, hidden), "fc2.bias": (10,)}

    scale = 1
    while sum(math.prod(shape) for shape in shapes(scale).values()) < params:
        scale += 1
    return shapes(scale)


def float_params(params: int) -> int:
    return sum(math.prod(shape) for shape in model_shapes(params).values())


# ====================================================================== inside the writer and the runs


def write_updates(folder: Path, clients: int, params: int) -> dict[str, Any]:
    """The global model and ``clients`` updates (float32, one file each), then sync: the page cache holds them."""
    import torch

    t0 = time.perf_counter()
    generator = torch.Generator().manual_seed(0)
    global_state: dict[str, torch.Tensor] = {k: torch.randn(s, generator=generator) * 0.1
                                             for k, s in model_shapes(params).items()}
    global_state["bn2.num_batches_tracked"] = torch.tensor(0)
    torch.save(global_state, folder / "global.pt")
    examples = []
    for client in range(clients):
        generator.manual_seed(1 + client)
        state = {k: v + torch.randn(v.shape, generator=generator) * 0.01 if v.is_floating_point()
                 else torch.tensor(50 + client % 7) for k, v in global_state.items()}
        torch.save(state, folder / f"update-{client}.pt")
        examples.append(10 + (37 * client) % 91)
    (folder / "examples.json").write_text(json.dumps(examples))
    os.sync()
    return {"wall": time.perf_counter() - t0}


def warm_page_cache(folder: Path) -> float:
    """Read every file once, so that no run (the first one above all) reads its updates from the disk."""
    t0 = time.perf_counter()
    for path in sorted(folder.iterdir()):
        with path.open("rb") as file:
            while file.read(16 * 2**20):
                pass
    return time.perf_counter() - t0


def rss_anon() -> int:
    """This process's anonymous resident memory in bytes (file-backed pages, such as mapped updates, excluded)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status")


class PeakSampler:
    """The peak of ``rss_anon()`` while running, sampled every millisecond by a thread (torch releases the GIL)."""

    def __init__(self) -> None:
        self.peak = rss_anon()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, rss_anon())

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_anon())


def load_round(folder: Path, clients: int) -> tuple[Any, list[Any]]:
    """The global state and the first ``clients`` updates, mapped from their files as fedsup's rounds load them."""
    import torch

    from fedsup.federated.strategies import ClientUpdate

    examples = json.loads((folder / "examples.json").read_text())
    global_state = torch.load(folder / "global.pt", weights_only=True)
    updates = [ClientUpdate(client, torch.load(folder / f"update-{client}.pt", mmap=True, weights_only=True),
                            examples[client]) for client in range(clients)]
    return global_state, updates


def plain_weighted_sum(global_state: dict[str, Any], updates: list[Any], dtype: Any) -> dict[str, Any]:
    """The baseline: per key one accumulator, ``add_(tensor, alpha=n)`` per update, one division; integers: max."""
    import torch

    total = sum(update.num_examples for update in updates)
    result = {}
    for key, reference in global_state.items():
        if not reference.is_floating_point():
            result[key] = torch.stack([u.state[key] for u in updates]).amax(dim=0)
            continue
        acc = torch.zeros(reference.shape, dtype=dtype or reference.dtype)
        for update in updates:
            acc.add_(update.state[key], alpha=update.num_examples)
        result[key] = acc.div_(total).to(reference.dtype)
    return result


def _timed(record: dict[str, float], name: str, function: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            record[name] = record.get(name, 0.0) + time.perf_counter() - t0
    return wrapper


def prepared(name: str, clients: int, global_state: dict[str, Any]) -> tuple[Callable[..., Any], dict[str, float]]:
    """``(aggregate, phases)``: the call to time, and where the robust rules' phase timings will be recorded."""
    import torch

    from fedsup.federated import robust
    from fedsup.federated.registry import make_strategy

    phases: dict[str, float] = {}
    if name in BASELINES:
        dtype = torch.float64 if name == "torch-sum-f64" else None
        return lambda g, u: plain_weighted_sum(g, u, dtype), phases
    strategy = make_strategy(name, options_for(name, clients))
    strategy.setup(clients)
    if "step" in strategy.state_dict():
        # As after an earlier round: every buffer present, so the round holds old and new ones at once.
        generator = torch.Generator().manual_seed(5)
        floats = {k: v for k, v in global_state.items() if v.is_floating_point()}
        buffers = [key for key in strategy.state_dict() if key not in ("strategy", "step")]
        state = {buffer: {k: torch.rand(v.shape, generator=generator, dtype=torch.float64) * 1e-3
                          for k, v in floats.items()} for buffer in buffers}
        strategy.load_state_dict({"strategy": strategy.name, "step": 1, **state})
    robust.squared_distances = _timed(phases, "distances", robust.squared_distances)
    robust.Bulyan.select = _timed(phases, "selection", robust.Bulyan.select)  # type: ignore[method-assign]
    robust.krum_scores = _timed(phases, "selection", robust.krum_scores)
    return strategy.aggregate, phases


def run_variant(name: str, folder: Path, clients: int, threads: int) -> int:
    """Child side: import, map the round, build the strategy; then time one aggregate and print one JSON line."""
    imports = common.import_first("torch", "fedsup")
    import gc

    import torch

    torch.set_num_threads(threads)

    global_state, updates = load_round(folder, clients)
    aggregate, phases = prepared(name, clients, global_state)
    gc.collect()
    start_anon = rss_anon()
    with PeakSampler() as sampler:
        t0 = time.perf_counter()
        result = aggregate(global_state, updates)
        wall = time.perf_counter() - t0
    checksum = math.fsum(float(v.double().sum()) for v in result.values() if v.is_floating_point())
    common.emit({"variant": name, "clients": clients, "wall": wall, "peak_anon": sampler.peak - start_anon,
                 "start_anon": start_anon, "vm_hwm": _status_kib("VmHWM") * 1024, "phases": phases,
                 "checksum": checksum, "threads": torch.get_num_threads(), "imports": imports})
    return 0


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


# ====================================================================== the parent


def _kill_session(proc: subprocess.Popen[str]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def launch(args: list[str], timeout: float, verbose: bool) -> dict[str, Any]:
    """This script again with ``args``, in a session of its own; its JSON, or {"error": ...}."""
    cmd = [sys.executable, str(Path(__file__).resolve()), *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    stdout, stderr, timed_out = common.communicate(proc, timeout, _kill_session)
    if timed_out:
        return {"error": timed_out}
    if verbose and stderr.strip():
        print(f"--- stderr of {' '.join(args[:2])} ---\n{stderr.rstrip()}\n---", file=sys.stderr)
    result, error = common.read_result(stdout, stderr, proc.returncode, tail=15)
    return {"error": error} if error else result


def measure(name: str, folder: Path, clients: int, args: argparse.Namespace) -> dict[str, Any]:
    runs = []
    for _ in range(args.repeat):
        command = ["--variant", name, "--dir", str(folder), "--clients", str(clients),
                   "--threads", str(args.threads)]
        runs.append(launch(command, args.timeout, args.verbose))
    chosen = common.median_run(runs)
    chosen.setdefault("variant", name)
    chosen.setdefault("clients", clients)
    return chosen


def mib(value: float) -> float:
    return value / 2**20


def report(results: dict[str, dict[str, Any]], scaling: dict[str, dict[int, dict[str, Any]]],
           args: argparse.Namespace) -> list[str]:
    params = float_params(args.params)
    model_size = 8 * params
    base = results.get("torch-sum", {})
    base_wall = base.get("wall") if "error" not in base else None
    lines = [f"one round, {args.clients} updates of {params:,} float32 parameters ({len(model_shapes(args.params))} "
             f"floating keys; the largest {max(math.prod(s) for s in model_shapes(args.params).values()):,}); "
             f"model-size (float64) = {mib(model_size):.1f} MiB", ""]
    header = (f"{'strategy':<14} {'options':<44} {'wall s':>8} {'/base':>6} {'peak MiB':>9} {'models':>7} "
              f"{'VmHWM MiB':>10}  notes")
    lines += [header, "-" * len(header)]
    for name, r in results.items():
        options = "; ".join(f"{k}={v}" for k, v in options_for(name, args.clients).items()) if name not in BASELINES \
            else ("model dtype" if name == "torch-sum" else "float64 accumulators")
        if "error" in r:
            lines.append(f"{name:<14} {options:<44} {'ERROR':>8}  {r['error'].splitlines()[0]}")
            continue
        notes = []
        if name == "torch-sum":
            notes.append("baseline")
        if r.get("phases"):
            notes.append(", ".join(f"{k} {v:.2f} s" for k, v in r["phases"].items()))
        if name == "fedavg" and "checksum" in base:
            notes.append(f"checksum {r['checksum']:.6g} vs baseline {base['checksum']:.6g}")
        if len(r.get("walls", [])) > 1:
            notes.append("walls " + common.seconds(r["walls"], "/"))
        lines.append(f"{name:<14} {options:<44} {r['wall']:>8.2f} {common.ratio(r['wall'], base_wall):>6} "
                     f"{mib(r['peak_anon']):>9.1f} {r['peak_anon'] / model_size:>7.2f} {mib(r['vm_hwm']):>10.0f}  "
                     + "; ".join(notes))
    lines.append("'peak MiB': peak anonymous RSS above the value before the timer (sampled each ms); 'models': that "
                 "in model-sizes;")
    lines.append("'VmHWM': peak RSS of the whole process, imports and the mapped update files' pages included "
                 "(not judged).")
    if scaling:
        lines += ["", "scaling: Krum and Bulyan on the first n updates (f = n // 10), time against n^2", ""]
        head = f"{'rule':<8} {'n':>5} {'wall s':>8} {'distances s':>12} {'selection s':>12} {'t/t0':>7} " \
               f"{'(n/n0)^2':>9} {'dist/d0':>8}"
        lines += [head, "-" * len(head)]
        for rule, rows in scaling.items():
            first = next((r for r in rows.values() if "error" not in r), None)
            for n, r in rows.items():
                if "error" in r:
                    lines.append(f"{rule:<8} {n:>5} {'ERROR':>8}  {r['error'].splitlines()[0]}")
                    continue
                assert first is not None
                d, d0 = r["phases"].get("distances"), first["phases"].get("distances")
                lines.append(f"{rule:<8} {n:>5} {r['wall']:>8.2f} {fmt(d, '12.2f')} "
                             f"{fmt(r['phases'].get('selection'), '12.2f')} {r['wall'] / first['wall']:>7.1f} "
                             f"{(n / first['clients']) ** 2:>9.1f} {fmt(d / d0 if d and d0 else None, '8.1f')}")
        lines.append("'t/t0', 'dist/d0': wall and distance time over the smallest n's; the distances are "
                     "O(n^2 * params), Bulyan's coordinate step O(n log n * params).")
    lines += ["", "targets"]
    for name in TIMED:
        r = results.get(name)
        if r is None:
            continue
        if "error" in r or not base_wall:
            lines.append(f"  {name:<13} wall within {TIME_TARGET:g}x the baseline         ERROR")
            continue
        q = r["wall"] / base_wall
        lines.append(f"  {name:<13} wall within {TIME_TARGET:g}x the baseline{'':<25} {r['wall']:8.2f} s / "
                     f"{base_wall:.2f} s = {q:5.2f}x   {common.verdict(q <= TIME_TARGET)}")
    f64 = results.get("torch-sum-f64", {})
    if "wall" in f64 and any("wall" in results.get(name, {}) for name in TIMED):
        lines.append("  for information, against torch-sum-f64 (float64 accumulators, fedsup's precision): "
                     + ", ".join(f"{name} {results[name]['wall'] / f64['wall']:.2f}x" for name in TIMED
                                 if "wall" in results.get(name, {})))
    pairs = 3 * 8 * args.clients**2  # Krum's own n x n float64 distances: the matrix, its mirror, sorted rows
    for name, r in results.items():
        if name in BASELINES:
            continue
        extra = pairs if name in PAIRWISE else 0
        bound = f"{MEMORY_TARGET:g} model-sizes" + (f" + 3 n^2 doubles ({mib(pairs):.1f} MiB)" if extra else "")
        if "error" in r:
            lines.append(f"  {name:<13} peak at most {bound}        ERROR")
            continue
        m = r["peak_anon"] / model_size
        lines.append(f"  {name:<13} peak at most {bound:<44} {mib(r['peak_anon']):8.1f} MiB = {m:6.2f} models  "
                     f"{common.verdict(r['peak_anon'] <= MEMORY_TARGET * model_size + extra)}")
    return lines


def parse(argv: list[str] | None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    parser = common.make_parser(__doc__)
    parser.add_argument("--clients", type=int, default=1000, help="updates in the round (default 1000)")
    parser.add_argument("--params", type=int, default=1_000_000,
                        help="floating parameters of the model, about (default 1000000)")
    parser.add_argument("--strategies", default="all",
                        help="comma-separated built-in names, or 'all' (default); the baselines always run")
    parser.add_argument("--scaling", default=",".join(map(str, DEFAULT_SCALING)),
                        help="round sizes of the Krum/Bulyan scaling table, comma-separated, or 'none' "
                             f"(default {','.join(map(str, DEFAULT_SCALING))}; sizes above --clients are dropped)")
    parser.add_argument("--repeat", type=int, default=1, metavar="N", help="runs per variant, median reported")
    parser.add_argument("--threads", type=int, default=1, metavar="N",
                        help="torch threads in every run (default 1: on a machine shared with other work, two "
                             "OpenMP threads made the distance loop 20x slower)")
    parser.add_argument("--dir", help="where to make the temporary folder of updates (default: the system's)")
    common.add_output_options(parser, "also write every result to PATH as JSON", 3600.0, "seconds allowed per run")
    parser.add_argument("-v", "--verbose", action="store_true", help="show each run's stderr")
    parser.add_argument("--from-json", metavar="PATH", help="print the report of a run saved with --json, run nothing")
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--write", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    common.require_positive(parser, args, ("clients", "params", "repeat", "threads"))
    return parser, args


def chosen_strategies(parser: argparse.ArgumentParser, spec: str) -> list[str]:
    names = list(STRATEGY_ORDER) if spec == "all" else [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [n for n in names if n not in STRATEGY_ORDER]
    if unknown or not names:
        parser.error(f"--strategies: unknown name(s) {', '.join(unknown) or '(none given)'}; "
                     f"known: {', '.join(STRATEGY_ORDER)}")
    return names


def scaling_sizes(parser: argparse.ArgumentParser, spec: str, clients: int) -> list[int]:
    if spec == "none":
        return []
    try:
        sizes = sorted({int(part) for part in spec.split(",") if part.strip()})
    except ValueError:
        parser.error(f"--scaling: expected comma-separated whole numbers or 'none', got {spec!r}")
    if any(n < 7 for n in sizes):
        parser.error(f"--scaling: every size must be >= 7 (Bulyan with f = n // 10 needs 4f + 3), got {spec!r}")
    return [n for n in sizes if n <= clients]


def main(argv: list[str] | None = None) -> int:
    parser, args = parse(argv)
    if args.variant:
        return run_variant(args.variant, Path(args.dir), args.clients, args.threads)
    if args.write:
        common.emit(write_updates(Path(args.dir), args.clients, args.params))
        return 0
    if args.from_json:
        return print_saved(parser, args.from_json)
    names = chosen_strategies(parser, args.strategies)
    sizes = scaling_sizes(parser, args.scaling, args.clients)
    if args.clients < 7 and any(n in ("krum", "multikrum", "bulyan") for n in names):
        parser.error(f"--clients: the robust rules need at least 7 updates here, got {args.clients}")
    parent = Path(args.dir) if args.dir else Path(tempfile.gettempdir())
    if not parent.is_dir():
        parser.error(f"--dir: {str(parent)!r} is not a folder")
    need = int(args.clients * float_params(args.params) * 4 * 1.05) + 2**20
    free = shutil.disk_usage(parent).free
    rev, dirty = common.git_revision()
    print(f"fedsup aggregation bench: {len(os.sched_getaffinity(0))} cores, Python {platform.python_version()}, "
          f"git {rev}{'+dirty fedsup/' if dirty else ''}; torch threads per run {args.threads}; "
          f"load average {os.getloadavg()[0]:.2f} at start")
    print(f"updates: {args.clients} x {float_params(args.params):,} float32 parameters = {need / 2**30:.2f} GiB "
          f"in {parent} ({free / 2**30:.1f} GiB free)", flush=True)
    if free < need * 1.2:
        print(f"error: --dir {parent}: needs {need / 2**30:.2f} GiB (and a margin), has {free / 2**30:.2f} GiB free",
              file=sys.stderr)
        return 2
    started = time.perf_counter()
    folder = Path(tempfile.mkdtemp(prefix="fedsup-aggregation-bench-", dir=parent))
    try:
        return run_all(folder, names, sizes, args, started)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def print_saved(parser: argparse.ArgumentParser, path: str) -> int:
    try:
        saved = json.loads(Path(path).read_text())
        args = argparse.Namespace(clients=saved["clients"], params=saved["params"])
        scaling = {rule: {int(n): r for n, r in rows.items()} for rule, rows in saved["scaling"].items()}
        lines = report(saved["results"], scaling, args)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        parser.error(f"--from-json: cannot read a saved run from {path!r}: {exc}")
    print("\n".join(lines))
    return 0


def run_all(folder: Path, names: list[str], sizes: list[int], args: argparse.Namespace, started: float) -> int:
    print("  writing the updates ...", end=" ", flush=True)
    written = launch(["--write", "--dir", str(folder), "--clients", str(args.clients), "--params", str(args.params)],
                     args.timeout, args.verbose)
    if "error" in written:
        print("ERROR", flush=True)
        return common.print_errors({"writing the updates": written["error"]})
    print(f"{written['wall']:.1f} s; reading them once ...", end=" ", flush=True)
    print(f"{warm_page_cache(folder):.1f} s", flush=True)
    results: dict[str, dict[str, Any]] = {}
    first: dict[str, dict[str, Any]] = {}
    for name in (*BASELINES, *names, *BASELINES):
        again = name in results
        print(f"  {name}{' again' if again else ''} ...", end=" ", flush=True)
        result = measure(name, folder, args.clients, args)
        print("ERROR" if "error" in result else f"{result['wall']:.2f} s", flush=True)
        if again:
            # The baseline runs first and last, and counts its faster run: a busy moment should not flatter
            # (or sink) every ratio against it.
            ok = [r for r in (first[name], result) if "error" not in r]
            results[name] = dict(min(ok, key=lambda r: r["wall"])) if ok else result
            results[name]["walls"] = [r["wall"] for r in ok]
        else:
            first[name] = results[name] = result
    scaling: dict[str, dict[int, dict[str, Any]]] = {}
    for rule in SCALING_RULES:
        if not sizes:
            break
        scaling[rule] = {}
        for n in sizes:
            if n == args.clients and rule in results:
                scaling[rule][n] = results[rule]
                continue
            print(f"  {rule} on {n} updates ...", end=" ", flush=True)
            scaling[rule][n] = measure(rule, folder, n, args)
            print("ERROR" if "error" in scaling[rule][n] else f"{scaling[rule][n]['wall']:.2f} s", flush=True)
    print()
    for line in report(results, scaling, args):
        print(line)
    print(common.end_line(started))
    errors = {name: r["error"] for name, r in results.items() if "error" in r}
    errors.update({f"{rule} n={n}": r["error"] for rule, rows in scaling.items() for n, r in rows.items()
                   if "error" in r})
    status = common.print_errors(errors)
    if args.json:
        common.write_json(args.json, {"clients": args.clients, "params": float_params(args.params),
                                      "results": results, "scaling": scaling})
    return status


if __name__ == "__main__":
    common.run_main(main)
