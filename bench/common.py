"""What ``bench/overhead.py`` and ``bench/compare.py`` share, so that the two measure and report alike.

Both run every variant in a fresh interpreter that imports its modules before its timer starts and prints
one ``BENCH_JSON {...}`` line; both compare fedsup with a ``fork`` pool whose workers are pinned to one
torch thread and with a plain loop; both take medians over repeats and print a table, targets and errors.

Only the standard library is imported here at module level: the parents must not load torch or fedsup
(their memory and CPU would count as the bench's own), so those are imported where they are used.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from multiprocessing.pool import Pool

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MARK = "BENCH_JSON "  # prefixes the one stdout line of a variant's process that its parent reads

Result = dict[str, Any]


# ====================================================================== inside a variant's subprocess


def import_first(*modules: str) -> float:
    """Import ``modules`` in this order, bench/ first on sys.path; the seconds it took.

    Called before a variant's timer starts: a user script would have these loaded already, and no variant
    should pay for an import that another got for free."""
    t0 = time.perf_counter()
    if sys.path[:1] != [str(HERE)]:
        sys.path.insert(0, str(HERE))
    for name in modules:
        importlib.import_module(name)
    return time.perf_counter() - t0


def emit(result: Result) -> None:
    """Print the result line the parent reads, after anything the variant printed (so it comes last)."""
    sys.stdout.flush()
    print(MARK + json.dumps(result), flush=True)


def pin_one_thread() -> None:
    """One torch thread in this process, as fedsup pins a ``cpus=1`` task.

    Without it, every pool worker runs an OpenMP pool as large as the machine: N workers x N threads
    oversubscribe the cores, which made the pool ~18x slower on 2 cores (bench/README.md)."""
    import torch

    torch.set_num_threads(1)


def fork_pool(workers: int, pin: bool = True) -> Pool:
    """The plain baseline: a ``fork`` pool, each worker pinned to one torch thread unless ``pin`` is false."""
    import multiprocessing as mp

    return mp.get_context("fork").Pool(workers, initializer=pin_one_thread if pin else None)


def run_supervised(tasks: Sequence[Any], **options: Any) -> tuple[list[Any], float, float]:
    """``fedsup.Supervisor(devices="cpu", **options).run(tasks)``, timed: (records, wall s, start epoch s).

    The epoch time lets a caller set the tasks' own clocks (``time.time()`` in the task processes) against
    the start. Raises when a task did not finish: a run with failed tasks measured something else."""
    import fedsup

    t0_epoch, t0 = time.time(), time.perf_counter()
    records = fedsup.Supervisor(devices="cpu", **options).run(tasks)
    wall = time.perf_counter() - t0
    bad = [f"{r.task_id}: {r.status.value} {r.error.summary() if r.error else ''}" for r in records
           if r.status.value != "FINISHED"]
    if bad:
        raise RuntimeError(f"{len(bad)} of {len(tasks)} tasks did not finish: " + "; ".join(bad[:5]))
    return records, wall, t0_epoch


def rusage() -> dict[str, float]:
    """CPU seconds (user, sys) and minor page faults of this process (``self_*``) and of every child it
    has reaped (``kids_*``): take one before and one after what is measured."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"self_user": me.ru_utime, "self_sys": me.ru_stime, "self_minflt": me.ru_minflt,
            "kids_user": kids.ru_utime, "kids_sys": kids.ru_stime, "kids_minflt": kids.ru_minflt}


def cpu_of(usage: dict[str, float], who: str) -> float:
    """user + sys of ``who`` ("self" or "kids") in a ``rusage()`` snapshot."""
    return usage[f"{who}_user"] + usage[f"{who}_sys"]


# ====================================================================== the parent: running a variant


def communicate(proc: subprocess.Popen[str], timeout: float,
                kill: Callable[[subprocess.Popen[str]], None]) -> tuple[str, str, str | None]:
    """(stdout, stderr, error) of ``proc``: error says it timed out, after ``kill`` ended it.

    ``kill`` must take down what the variant started too (its fork server, workers, Ray): it is also
    called on Ctrl-C, which is re-raised, since the variant may not be in our process group."""
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill(proc)
        stdout, stderr = proc.communicate()
        return stdout, stderr, f"timed out after {timeout:g} s"
    except BaseException:
        kill(proc)
        proc.communicate()
        raise
    return stdout, stderr, None


def read_result(stdout: str, stderr: str, returncode: int, tail: int) -> tuple[Result, str | None]:
    """The variant's BENCH_JSON, or ({}, error) with the exit code and the last ``tail`` lines of output."""
    lines = [line for line in stdout.splitlines() if line.startswith(MARK)]
    if returncode != 0 or not lines:
        last = "\n".join((stdout + stderr).strip().splitlines()[-tail:])
        return {}, f"exit code {returncode}\n{last}"
    return json.loads(lines[-1][len(MARK):]), None


def median_run(runs: list[Result], keys: Sequence[str] = ("wall",)) -> Result:
    """The run with the median wall time (the lower middle one for an even count), with the median of each
    of ``keys`` over the runs that worked, and every wall and error kept; the last run if none worked.

    A median, not a mean: one run disturbed by other work on the machine should not move the figure."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return dict(runs[-1])
    ordered = sorted(ok, key=lambda r: r["wall"])
    out = dict(ordered[(len(ordered) - 1) // 2])
    for key in keys:
        values = [r[key] for r in ok if r.get(key) is not None]
        if values:
            out[key] = statistics.median(values)
    out["walls"] = [r["wall"] for r in ok]
    out["errors"] = [r["error"] for r in runs if "error" in r]
    return out


def git_revision() -> tuple[str, bool]:
    """The checkout's short commit ("?" without git) and whether fedsup/ has uncommitted changes: a result
    is only worth quoting with the code it measured."""
    def git(*words: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["git", "-C", str(ROOT), *words], capture_output=True, text=True)

    try:
        rev = git("rev-parse", "--short", "HEAD")
        if rev.returncode != 0:
            return "?", False
        return rev.stdout.strip(), bool(git("status", "--porcelain", "--", "fedsup").stdout.strip())
    except OSError:
        return "?", False


# ====================================================================== the parent: arguments and report


def make_parser(doc: str) -> argparse.ArgumentParser:
    """The parser of a bench script: its docstring's first paragraph as the description, kept as written."""
    return argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def add_output_options(parser: argparse.ArgumentParser, json_help: str, timeout: float, timeout_help: str) -> None:
    """--json PATH and --timeout S, which every bench script takes (each with its own words and default)."""
    parser.add_argument("--json", metavar="PATH", help=json_help)
    parser.add_argument("--timeout", type=float, default=timeout, help=timeout_help)


def require_positive(parser: argparse.ArgumentParser, args: argparse.Namespace, options: Sequence[str]) -> None:
    """Exit with status 2 (argparse's) when one of ``options`` is given below 1."""
    for option in options:
        value = getattr(args, option)
        if value is not None and value < 1:
            parser.error(f"--{option.replace('_', '-')}: expected a whole number >= 1, got {value}")


def fmt(value: Any, spec: str) -> str:
    """``value`` formatted, or a dash as wide as the spec says (a column whose figure was not measured)."""
    width = int("".join(c for c in spec.split(".")[0] if c.isdigit()) or 0)
    return "-".rjust(width) if value is None else format(value, spec)


def ratio(wall: float, base: float | None) -> str:
    """``wall`` / the baseline's wall, or a dash when the baseline did not run."""
    return f"{wall / base:.2f}" if base else "-"


def seconds(values: Sequence[float], sep: str = ", ") -> str:
    """Every repeat's figure, so that a reader sees the spread behind a median."""
    return sep.join(f"{v:.2f}" for v in values)


def verdict(met: bool) -> str:
    return "PASS" if met else "FAIL"


def end_line(started: float) -> str:
    """How long the bench took and the load at the end: a busy machine makes every figure noisy."""
    return f"\nbench took {time.perf_counter() - started:.0f} s; load average {os.getloadavg()[0]:.2f} at the end"


def print_errors(errors: dict[str, str]) -> int:
    """Every failed run's error on stderr; the exit status: 1 when a run failed (a missed target is not)."""
    for name, error in errors.items():
        print(f"\nERROR in {name}:\n{error}", file=sys.stderr)
    return 1 if errors else 0


def write_json(path: str, data: Any) -> None:
    Path(path).write_text(json.dumps(data, indent=1, default=str))


def run_main(main: Callable[[], int]) -> None:
    """A bench script's entry: its exit status, and a Ctrl-C as one line and 130 rather than a traceback."""
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
