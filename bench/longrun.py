"""Long and wide runs: whether a round's cost, the supervisor's memory and a resume stay flat over 1,000
rounds, whether `fedsup status` and `fedsup report` stay fast on a run of 1,000 rounds x 50 clients, and
W3 (1,000 MLP clients, one round) against the 2-process pool.

    python bench/longrun.py                     # every part (about 20 min on 2 cores)
    python bench/longrun.py --parts rounds,resume --rounds 300
    python bench/longrun.py --parts digest --wide-run runs/wide   # time status/report on a run you have

Parts, each in fresh interpreters:
    rounds   1,000 rounds of 10 no-op clients (bench/workloads.py NoopClient): the median round time of the
             last 100 against rounds 2-101, and the supervisor's peak RSS at the end against after round 100
    resume   `fedsup run --resume` of that finished run (nothing to do) against `fedsup validate` of its
             config: both pay Python's and torch's start, the difference is what a resume reads
    digest   a run of 1,000 rounds x 50 no-op clients (made here unless --wide-run names one), then
             `fedsup status` and `fedsup report` on it, end to end and in-process (load_run + render)
    w3       bench/compare.py's W3 for fedsup and pool2, its ratio

Every ratio is printed with a PASS/FAIL line (bench/common.py); --json keeps the curves too.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import common

PARTS = ("rounds", "resume", "digest", "w3")
ROUND_RATIO = 1.1       # the last 100 rounds' median against rounds 2-101's
RSS_RATIO = 1.2         # peak RSS at the end against after round 100
RESUME_SLACK = 1.0      # s: a resume with nothing to do against validate
STATUS_LIMIT = 2.0      # s, fedsup status on 1,000 rounds x 50 clients
REPORT_LIMIT = 10.0     # s, fedsup report on the same
W3_RATIO = 1.15         # fedsup against pool2 on W3
BUCKET = 100            # rounds per point of the growth curves


def config(output: Path, clients: int, rounds: int, per_round: int) -> dict[str, Any]:
    return {"name": output.name, "seed": 1, "output": str(output),
            "task": {"class": "workloads:NoopClient"},
            "federation": {"clients": clients, "rounds": rounds, "clients_per_round": per_round, "evaluate": False},
            "supervisor": {"devices": "cpu", "max_loaded": per_round, "max_retries": 0}}


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(common.HERE), os.environ.get("PYTHONPATH", "")])}


# ====================================================================== inside the child


def child_rounds(config_path: str) -> int:
    """Run the config with fedsup.run, noting each round's time and this process's peak RSS as it goes."""
    import resource

    import yaml

    common.import_first("workloads")
    import fedsup

    durations: list[float] = []
    cpu: list[float] = []  # this process's CPU seconds per round: less swayed by a busy machine than the wall
    peak_after: dict[int, int] = {}
    began = [0.0]

    def on_event(event: dict[str, Any]) -> None:
        if event.get("event") == "round_started":
            began[0] = time.process_time()
        if event.get("event") == "round_finished":
            durations.append(float(event["duration"]))
            cpu.append(time.process_time() - began[0])
            if event["round"] % BUCKET == 0:
                peak_after[event["round"]] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    data = yaml.safe_load(Path(config_path).read_text())
    t0 = time.perf_counter()
    summary = fedsup.run(data, on_event=on_event)
    wall = time.perf_counter() - t0
    common.emit({"wall": wall, "status": summary["status"], "durations": durations, "cpu": cpu,
                 "peak_after": peak_after,
                 "peak_end": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024})
    return 0


# ====================================================================== the parent


def run_child(config_path: Path, timeout: float) -> dict[str, Any]:
    proc = subprocess.Popen([sys.executable, __file__, "--child", str(config_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env(), start_new_session=True)
    stdout, stderr, error = common.communicate(proc, timeout, lambda p: os.killpg(p.pid, 9))
    result, problem = common.read_result(stdout, stderr, proc.returncode, 20)
    if error or problem:
        raise RuntimeError(error or problem)
    return result


def write_config(path: Path, data: dict[str, Any]) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def timed(cmd: list[str], timeout: float) -> float:
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env(), timeout=timeout)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: exit {done.returncode}\n{done.stderr[-2000:]}")
    return wall


def fedsup_cmd(*words: str) -> list[str]:
    return [sys.executable, "-m", "fedsup", *words]


def curve(durations: list[float]) -> list[dict[str, float]]:
    """The median round time of each BUCKET rounds, in ms: the growth curve."""
    return [{"rounds": f"{i + 1}-{i + len(part)}", "median_ms": 1000 * statistics.median(part)}
            for i in range(0, len(durations), BUCKET) if (part := durations[i:i + BUCKET])]


def part_rounds(work: Path, rounds: int, timeout: float) -> tuple[dict[str, Any], list[tuple[str, str, str]]]:
    path = write_config(work / "long.yaml", config(work / "long", 10, rounds, 10))
    result = run_child(path, timeout)
    durations = result["durations"]
    first, last = durations[1:101], durations[-100:]
    ratio = statistics.median(last) / statistics.median(first)
    peaks = {int(k): v for k, v in result["peak_after"].items()}
    at_100 = peaks.get(BUCKET) or min(peaks.values())
    rss_ratio = result["peak_end"] / at_100
    cpu_ratio = statistics.median(result["cpu"][-100:]) / statistics.median(result["cpu"][1:101])
    checks = [
        (f"rounds: last 100 at most {ROUND_RATIO}x rounds 2-101 (median)",
         f"{1000 * statistics.median(last):.1f} ms / {1000 * statistics.median(first):.1f} ms = {ratio:.2f}x",
         common.verdict(ratio <= ROUND_RATIO)),
        (f"rounds: peak RSS at the end at most {RSS_RATIO}x after round {BUCKET}",
         f"{result['peak_end'] / 2**20:.0f} MiB / {at_100 / 2**20:.0f} MiB = {rss_ratio:.2f}x",
         common.verdict(rss_ratio <= RSS_RATIO)),
    ]
    print(f"  (for information: the supervisor's CPU per round, last 100 against rounds 2-101: {cpu_ratio:.2f}x)")
    figures = {"wall": result["wall"], "curve": curve(durations), "cpu_curve": curve(result["cpu"]),
               "cpu_ratio": cpu_ratio,
               "peak_rss_mib": {k: v / 2**20 for k, v in sorted(peaks.items())},
               "peak_end_mib": result["peak_end"] / 2**20, "round_ratio": ratio, "rss_ratio": rss_ratio}
    return figures, checks


def part_resume(work: Path, repeat: int, timeout: float) -> tuple[dict[str, Any], list[tuple[str, str, str]]]:
    path = work / "long.yaml"
    if not (work / "long" / "summary.json").exists():
        raise RuntimeError("resume needs the finished run of the rounds part (--parts rounds,resume)")
    resumes, validates = [], []
    for _ in range(repeat):  # interleaved: the machine's load hits both alike
        validates.append(timed(fedsup_cmd("validate", str(path)), timeout))
        resumes.append(timed(fedsup_cmd("run", str(path), "--resume"), timeout))
    resume, validate = statistics.median(resumes), statistics.median(validates)
    checks = [(f"resume of the finished run within {RESUME_SLACK:g} s of validate",
               f"{resume:.2f} s vs {validate:.2f} s (+{resume - validate:.2f} s)",
               common.verdict(resume - validate <= RESUME_SLACK))]
    return {"resume": resumes, "validate": validates}, checks


def part_digest(work: Path, wide: Path | None, repeat: int,
                timeout: float) -> tuple[dict[str, Any], list[tuple[str, str, str]]]:
    made = None
    if wide is None:
        wide = work / "wide"
        made = run_child(write_config(work / "wide.yaml", config(wide, 50, 1000, 50)), timeout)["wall"]
    statuses, reports, loads = [], [], []
    for _ in range(repeat):
        statuses.append(timed(fedsup_cmd("status", str(wide)), timeout))
        reports.append(timed(fedsup_cmd("report", str(wide), "--out", str(work / "report.html")), timeout))
        loads.append(in_process(wide))
    status, report = statistics.median(statuses), statistics.median(reports)
    inproc = {k: statistics.median([r[k] for r in loads]) for k in loads[0]}
    checks = [
        (f"fedsup status on 1,000 rounds x 50 clients under {STATUS_LIMIT:g} s", f"{status:.2f} s "
         f"(in-process {inproc['status']:.2f} s)", common.verdict(status < STATUS_LIMIT)),
        (f"fedsup report on the same under {REPORT_LIMIT:g} s", f"{report:.2f} s "
         f"(in-process {inproc['report']:.2f} s)", common.verdict(report < REPORT_LIMIT)),
    ]
    listing = sorted(p.name for p in wide.iterdir())
    return {"made_in": made, "status": statuses, "report": reports, "in_process": loads, "listing": listing,
            "records_files": len(list((wide / "records").iterdir()))}, checks


def in_process(run_dir: Path) -> dict[str, float]:
    """What `fedsup status` and `fedsup report` cost past the interpreter's and the imports' start."""
    code = ("import sys, time, json; t=time.perf_counter(); from fedsup.ui import digest, report; i=time.perf_counter()"
            "; digest.text_summary(digest.load_run(sys.argv[1])); s=time.perf_counter()"
            "; report.write_report(sys.argv[1], sys.argv[2]); r=time.perf_counter()"
            "; print(json.dumps({'imports': i-t, 'status': s-i, 'report': r-s}))")
    done = subprocess.run([sys.executable, "-c", code, str(run_dir), str(run_dir.parent / "inproc.html")],
                          capture_output=True, text=True, env=env(), timeout=600, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def part_w3(work: Path, repeat: int, timeout: float) -> tuple[dict[str, Any], list[tuple[str, str, str]]]:
    out = work / "w3.json"
    subprocess.run([sys.executable, str(common.HERE / "compare.py"), "--workloads", "W3", "--variants",
                    "fedsup,pool2", "--repeat", str(repeat), "--json", str(out)], check=True, env=env(),
                   stdout=subprocess.DEVNULL, timeout=timeout * repeat * 2)
    results = json.loads(out.read_text())["results"]["W3"]
    fed, pool = results["fedsup"], results["pool2"]
    ratio = fed["wall"] / pool["wall"]
    checks = [(f"W3: fedsup within {W3_RATIO}x of pool2",
               f"{fed['wall']:.2f} s / {pool['wall']:.2f} s = {ratio:.2f}x", common.verdict(ratio <= W3_RATIO))]
    return {"fedsup": fed.get("walls"), "pool2": pool.get("walls"), "ratio": ratio}, checks


def main(argv: list[str] | None = None) -> int:
    parser = common.make_parser(__doc__)
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {','.join(PARTS)}")
    parser.add_argument("--rounds", type=int, default=1000, help="rounds of the rounds part (default 1000)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each timed command; medians reported")
    parser.add_argument("--wide-run", type=Path, help="a run directory to time status and report on")
    parser.add_argument("--work", type=Path, help="where the runs go (default: a temporary folder, removed)")
    common.add_output_options(parser, "write every figure here", 3600, "seconds one run may take")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child_rounds(args.child)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    for part in parts:
        if part not in PARTS:
            parser.error(f"--parts: unknown {part!r}; expected some of {', '.join(PARTS)}")
    common.require_positive(parser, args, ("rounds", "repeat"))
    if "rounds" in parts and args.rounds < 200:
        parser.error(f"--rounds: the ratios compare rounds 2-101 with the last 100: expected >= 200, got {args.rounds}")

    started = time.perf_counter()
    rev, dirty = common.git_revision()
    print(f"fedsup git {rev}{' (uncommitted changes)' if dirty else ''}; {os.cpu_count()} cores; "
          f"load average {os.getloadavg()[0]:.2f} at the start", flush=True)
    work = args.work or Path(tempfile.mkdtemp(prefix="fedsup-longrun-"))
    work.mkdir(parents=True, exist_ok=True)
    figures: dict[str, Any] = {}
    checks: list[tuple[str, str, str]] = []
    errors: dict[str, str] = {}
    for part in parts:
        try:
            if part == "rounds":
                figures[part], found = part_rounds(work, args.rounds, args.timeout)
            elif part == "resume":
                figures[part], found = part_resume(work, args.repeat, args.timeout)
            elif part == "digest":
                figures[part], found = part_digest(work, args.wide_run, args.repeat, args.timeout)
            else:
                figures[part], found = part_w3(work, args.repeat, args.timeout)
        except (RuntimeError, subprocess.SubprocessError, OSError) as exc:
            errors[part] = str(exc)
            continue
        checks += found
        print_part(part, figures[part])
    print("\ntargets")
    for name, values, verdict in checks:
        print(f"  {verdict:<5} {name:<66} {values}")
    print(common.end_line(started))
    if args.json:
        common.write_json(args.json, {"figures": figures,
                                      "targets": [{"target": n, "figures": f, "verdict": v} for n, f, v in checks]})
    if args.work is None:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return common.print_errors(errors)


def print_part(part: str, figures: dict[str, Any]) -> None:
    if part == "rounds":
        print(f"\n{part}: {len(figures['curve']) * BUCKET} rounds in {figures['wall']:.0f} s; median round time "
              "per 100 rounds (ms), and peak RSS after each 100 (MiB):")
        print("  wall " + "  ".join(f"{c['median_ms']:.1f}" for c in figures["curve"]))
        print("  CPU  " + "  ".join(f"{c['median_ms']:.1f}" for c in figures["cpu_curve"]))
        print("  RSS  " + "  ".join(f"{v:.0f}" for v in figures["peak_rss_mib"].values()))
    elif part == "resume":
        print(f"\n{part}: resume {common.seconds(figures['resume'])} s; "
              f"validate {common.seconds(figures['validate'])} s")
    elif part == "digest":
        made = f"made in {figures['made_in']:.0f} s; " if figures["made_in"] else ""
        print(f"\n{part}: {made}status {common.seconds(figures['status'])} s; report "
              f"{common.seconds(figures['report'])} s; the run directory: {', '.join(figures['listing'])} "
              f"({figures['records_files']} files in records/)")
    else:
        print(f"\n{part}: fedsup {figures['fedsup']} s; pool2 {figures['pool2']} s")


if __name__ == "__main__":
    sys.exit(main())
