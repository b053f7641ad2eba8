"""The command line: a thin translator from argv to a library call to an exit status. The core never prints.

Exit statuses: 0 success, 1 the run failed, 2 bad input, 130 interrupted, 141 stdout was a pipe its reader
closed. An OS error (a full disk, a read-only folder) is one line naming the path and the cause: 2 before the
run started, 1 after.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from enum import IntEnum
from pathlib import Path
from typing import Any

from fedsup.engine.errors import ConfigError, FedsupError, RunFailed, TaskContractError


class ExitStatus(IntEnum):
    SUCCESS = 0
    RUN_FAILED = 1
    BAD_INPUT = 2
    INTERRUPTED = 130
    CLOSED_PIPE = 141  # 128 + SIGPIPE, what a shell shows for a command its pipe's reader left


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


# ---------------------------------------------------------------- commands


def cmd_run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from fedsup.federated.runner import placement_plan, prepare
    from fedsup.ui.live import LiveView

    if args.dry_run:
        return _show_plan(placement_plan(args.config, args.set))
    # the log handler's console where there is one: log lines printed by another console while the live
    # panel is drawn would leave copies of the panel behind on the terminal
    console = getattr(args, "console", None) or Console(stderr=True)
    view = LiveView(console)

    def on_event(event: dict[str, Any]) -> None:
        if event.get("event") == "run_started":
            args.run_started = True  # from here on an error means the run failed, not that the input was bad
        view.on_event(event)

    from fedsup.ui.report import write_report

    federation = prepare(args.config, args.set, args.output, on_event=on_event, report=write_report)
    args.run_dir_path = federation.path
    view.attach(federation)
    try:
        summary = federation.run(resume=args.resume)
    finally:
        view.stop()
    metrics = ", ".join(f"{k} {v:.4g}" for k, v in summary["final_metrics"].items())
    print(f"{summary['name']}: {summary['status']}, {summary['rounds_completed']}/{summary['rounds']} rounds "
          f"in {summary['totals']['duration']:.1f}s; {metrics}")
    print(f"run directory: {federation.path}")
    return ExitStatus.SUCCESS


def _show_plan(plan: dict[str, Any]) -> int:
    print(f"{plan['name']}: {plan['clients']} clients, {plan['rounds']} rounds of {plan['clients_per_round']} "
          f"(min {plan['min_clients']}), {plan['strategy']}")
    print(f"task {plan['task']}: estimate {plan['estimate_memory']} host, {plan['estimate_cuda_memory']} GPU")
    for device in plan["devices"]:
        print(f"  {device['name']}: {device['memory']} ({device['usable']} usable now) -> "
              f"{device['tasks_at_once']} task(s) at once")
    cluster = plan.get("cluster")
    if cluster is not None:
        _show_cluster_plan(cluster)
    elif not plan["devices"]:
        print(f"  cpu: {plan['cpu_cores']} cores -> {plan['training_at_once']} task(s) training at once")
    print(f"at most {plan['max_loaded']} task processes alive, {plan['training_at_once']} training at once")
    print(f"output: {plan['output']}")
    if plan["problem"]:
        print(f"fedsup: error: {plan['problem']}", file=sys.stderr)
        return ExitStatus.BAD_INPUT
    return ExitStatus.SUCCESS


def _show_cluster_plan(cluster: dict[str, Any]) -> None:
    from fedsup.engine.units import format_bytes

    if cluster["note"]:
        print(f"  ray ({cluster['address']}): {cluster['note']}")
        return
    print(f"  ray cluster at {cluster['address']}: {len(cluster['nodes'])} node(s), {cluster['slots']} job slot(s)")
    for node in cluster["nodes"]:
        gpus = ", ".join(f"{g['name']} {format_bytes(g['free'])} free" for g in node.get("gpus") or []) or "no GPUs"
        state = f"error: {node['error']}" if "error" in node else f"cores {node.get('cores', '-')}, {gpus}"
        print(f"    {node['node']}: ray {node.get('ray_cpus', 0):g} CPU -> {node['slots']} slot(s); {state}")


def cmd_validate(args: argparse.Namespace) -> int:
    from fedsup.federated.config import load_config

    config = load_config(args.config, args.set)
    print(f"{args.config}: valid ({config.federation.clients} clients, {config.federation.rounds} rounds, "
          f"task {config.task.class_})")
    return ExitStatus.SUCCESS


def cmd_devices(args: argparse.Namespace) -> int:
    from fedsup.engine.devices import cpu_cores, describe_gpus
    from fedsup.engine.units import format_bytes

    if args.cluster is not None:
        return _cluster_devices(args.cluster, args.json)
    gpus = describe_gpus()
    if args.json:
        _print_json({"gpus": gpus, "cpu_cores": cpu_cores()})
        return ExitStatus.SUCCESS
    if not gpus:
        print(f"no NVIDIA GPUs found (NVML reports none); tasks run on the CPU ({cpu_cores()} cores)")
    for gpu in gpus:
        total, free = format_bytes(gpu["total"]), format_bytes(gpu["free"])
        print(f"{gpu['name']:8} {gpu['model']:28} total {total:>10}   free {free:>10}")
    return ExitStatus.SUCCESS


CLUSTER_FLAG = "--cluster"


def _cluster_devices(address: str, as_json: bool) -> int:
    """``fedsup devices --cluster [ADDRESS]``: every node of the Ray cluster, as it sees itself."""
    from fedsup.cluster import INSTALL
    from fedsup.engine.units import format_bytes

    try:
        import ray  # noqa: F401 - only to tell a missing package from a cluster that is not there
    except ImportError:
        raise ConfigError(f"{CLUSTER_FLAG}: listing a cluster's nodes needs the ray package, which is not "
                          f"installed: {INSTALL}") from None
    from fedsup.cluster.driver import describe_nodes

    nodes = describe_nodes(address, key=CLUSTER_FLAG)  # the error lines name the flag the address came with
    if as_json:
        _print_json({"address": address, "nodes": nodes})
        return ExitStatus.SUCCESS
    if not nodes:
        print(f"the Ray cluster at {address} has no live nodes")
    for node in nodes:
        head = (f"{node['node']}  {node.get('address') or '-'}  ray: {node.get('ray_cpus', 0):g} CPU, "
                f"{node.get('ray_gpus', 0):g} GPU")
        if "error" in node:
            print(f"{head}  error: {node['error']}")
            continue
        print(f"{head}  cores {node.get('cores', '-')}")
        if not node.get("gpus"):
            print("  no NVIDIA GPUs found (NVML reports none)")
        for gpu in node.get("gpus") or []:
            total, free = format_bytes(gpu["total"]), format_bytes(gpu["free"])
            print(f"  {gpu['name']:8} {gpu['model']:28} total {total:>10}   free {free:>10}")
    return ExitStatus.SUCCESS


def _run_dir(path: str) -> Path:
    run_dir = Path(path)
    if not (run_dir / "events.jsonl").exists():
        raise ConfigError(f"RUN_DIR: {path} is not a fedsup run directory (it has no events.jsonl)")
    return run_dir


def cmd_status(args: argparse.Namespace) -> int:
    from fedsup.ui.digest import json_summary, load_run, text_summary

    run = load_run(_run_dir(args.run_dir))
    if args.json:
        _print_json(json_summary(run))
    else:
        print(text_summary(run))
    return ExitStatus.SUCCESS


def cmd_sweep(args: argparse.Namespace) -> int:
    from rich.console import Console

    from fedsup.federated.sweep import load_sweep, run_sweep

    sweep = load_sweep(args.sweep, args.set)
    if args.dry_run:
        print(f"{sweep.name}: {len(sweep.runs)} runs of {sweep.base}, into {sweep.output}")
        for run in sweep.runs:
            print(f"  {run.name:<40} {' '.join('--set ' + o for o in run.overrides)}")
        return ExitStatus.SUCCESS
    from fedsup.ui.live import SweepView
    from fedsup.ui.report import write_report

    view = SweepView(getattr(args, "console", None) or Console(stderr=True), [r.name for r in sweep.runs])
    args.run_started = True  # the sweep's input is checked; what fails from here is a run
    try:
        outcomes = run_sweep(sweep, resume=args.resume, on_event=view.on_event, report=write_report)
    finally:
        view.stop()
    for outcome in outcomes:
        metrics = ", ".join(f"{k} {v:.4g}" for k, v in ((outcome.summary or {}).get("final_metrics") or {}).items())
        note = outcome.error or metrics
        print(f"{outcome.run.name}: {outcome.status}{'; ' + note if note else ''}")
    failed = [o for o in outcomes if o.status not in ("finished", "skipped")]
    print(f"sweep {sweep.name}: {len(outcomes) - len(failed)}/{len(outcomes)} runs finished; directory: "
          f"{sweep.output}")
    return ExitStatus.RUN_FAILED if failed else ExitStatus.SUCCESS


def cmd_report(args: argparse.Namespace) -> int:
    from fedsup.ui.digest import load_run, text_summary
    from fedsup.ui.report import write_report
    from fedsup.ui.sweep_report import is_sweep_dir, write_sweep_report

    if is_sweep_dir(args.run_dir):
        path = write_sweep_report(args.run_dir, args.out, args.format)
        print(f"report: {path}")
        return ExitStatus.SUCCESS
    if args.format != "html":
        raise ConfigError(f"--format {args.format}: only a sweep's report has a table to write as "
                          f"{args.format}; {args.run_dir} is a run directory")
    run_dir = _run_dir(args.run_dir)
    path = write_report(run_dir, args.out)
    print(text_summary(load_run(run_dir)))
    print(f"report: {path}")
    return ExitStatus.SUCCESS


# ---------------------------------------------------------------- parsing


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedsup", description="A federated-learning process supervisor.",
                                     epilog="exit statuses: 0 success, 1 run failed, 2 bad input, 130 interrupted, "
                                            "141 output pipe closed")
    parser.add_argument("--traceback", action="store_true", help="show the full traceback on errors")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run (or resume) the federated run a config describes")
    run.add_argument("config", help="the run's YAML config")
    run.add_argument("--resume", action="store_true", help="continue the run in its output directory")
    run.add_argument("--output", help="the run directory (default: the config's output)")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config key, e.g. --set federation.rounds=10 (repeatable)")
    run.add_argument("--dry-run", action="store_true", help="validate and print the placement plan; run nothing")
    run.set_defaults(func=cmd_run)

    validate = sub.add_parser("validate", help="check a config and report every problem at once")
    validate.add_argument("config")
    validate.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    validate.set_defaults(func=cmd_validate)

    devices = sub.add_parser("devices", help="list GPUs with total and free memory")
    devices.add_argument("--json", action="store_true", help="print JSON")
    devices.add_argument(CLUSTER_FLAG, nargs="?", const="auto", default=None, metavar="ADDRESS",
                         help="list the nodes of a Ray cluster instead (default address: auto, the running one)")
    devices.set_defaults(func=cmd_devices)

    status = sub.add_parser("status", help="how a run stands: rounds, tasks, metrics")
    status.add_argument("run_dir", metavar="RUN_DIR")
    status.add_argument("--json", action="store_true", help="print JSON")
    status.set_defaults(func=cmd_status)

    report = sub.add_parser("report", help="write RUN_DIR/report.html with a device timeline and charts (or, for "
                            "a sweep's directory, the sweep's page)")
    report.add_argument("run_dir", metavar="RUN_DIR")
    report.add_argument("--out", help="where to write the page (default RUN_DIR/report.html)")
    report.add_argument("--format", choices=("html", "csv", "json"), default="html",
                        help="a sweep's final-metrics table as CSV or JSON instead of the page")
    report.set_defaults(func=cmd_report)

    sweep = sub.add_parser("sweep", help="run every config x seed of a sweep file on one supervisor")
    sweep.add_argument("sweep", metavar="SWEEP", help="the sweep's YAML file")
    sweep.add_argument("--resume", action="store_true", help="continue a killed sweep; finished runs are kept")
    sweep.add_argument("--dry-run", action="store_true", help="list the runs it expands to; run nothing")
    sweep.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a key of every run's config (repeatable)")
    sweep.set_defaults(func=cmd_sweep)
    return parser


def _setup_logging(verbose: int) -> Any:
    """Route log lines to stderr; on a terminal through a rich console, which is returned (the live panel
    draws on it too), else None."""
    level = {0: logging.INFO, 1: logging.INFO}.get(verbose, logging.DEBUG)
    handler: logging.Handler
    console = None
    if sys.stderr.isatty():
        from rich.console import Console
        from rich.logging import RichHandler

        console = Console(stderr=True)
        handler = RichHandler(console=console, show_path=False, show_time=False)
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "fedsup_cli", False)]:
        root.removeHandler(old)  # main() may run more than once in a process (tests, notebooks)
    setattr(handler, "fedsup_cli", True)  # noqa: B010 - a mark on the handler, found again above
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    # fedsup's own progress lines at INFO; libraries stay at WARNING unless -vv
    logging.getLogger("fedsup").setLevel(level if verbose else logging.WARNING)
    logging.getLogger("fedsup.run").setLevel(logging.INFO)
    logging.getLogger("fedsup.sweep").setLevel(logging.INFO)
    return console


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.console = _setup_logging(args.verbose)
        func: Callable[[argparse.Namespace], int] = args.func
        status = int(func(args))
        sys.stdout.flush()  # here, not at exit, so that a closed pipe is noticed while it can be handled
        return status
    except (ConfigError, TaskContractError) as exc:
        return _fail(args, exc, ExitStatus.BAD_INPUT)
    except RunFailed as exc:
        return _fail(args, exc, ExitStatus.RUN_FAILED)
    except FedsupError as exc:
        return _fail(args, exc, ExitStatus.RUN_FAILED)
    except BrokenPipeError:
        return _closed_pipe(args)
    except OSError as exc:
        return _os_error(args, exc)
    except RuntimeError as exc:
        # Python < 3.13's Path.resolve() turns ELOOP into a RuntimeError; the OSError is its context
        if isinstance(exc.__context__, OSError) and str(exc).startswith("Symlink loop"):
            return _os_error(args, exc.__context__, exc)
        raise
    except KeyboardInterrupt:
        if args.traceback:
            raise
        note = ("; the run directory holds everything finished so far (--resume continues)"
                if getattr(args, "run_started", False) else "")
        _say(f"fedsup: interrupted{note}")
        return ExitStatus.INTERRUPTED


def _say(line: str) -> None:
    """One line on stderr; nothing where stderr is a closed pipe (the exit status still tells)."""
    try:
        print(line, file=sys.stderr)
    except OSError:
        pass


def _fail(args: argparse.Namespace, exc: Exception, status: ExitStatus) -> int:
    if args.traceback:
        raise exc
    _say(f"fedsup: error: {exc}")
    return status


def _closed_pipe(args: argparse.Namespace) -> int:
    """What was printed went into a pipe whose reader has gone (``fedsup status --json | head``): stop quietly,
    as a command killed by SIGPIPE would, with its status 128 + SIGPIPE. Python's own flush at exit would
    fail the same way, so stdout is pointed at /dev/null first."""
    if args.traceback:
        raise
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return ExitStatus.CLOSED_PIPE


def _os_error(args: argparse.Namespace, exc: OSError, raised: BaseException | None = None) -> int:
    """A file fedsup needs could not be used (a full disk, a read-only or missing folder, a symlink loop): one
    line with the path and the cause. Bad input (2) before the run started, a failed run (1) after."""
    if args.traceback:
        raise raised or exc
    where = exc.filename or getattr(args, "run_dir_path", None)  # a failed write() does not name its file
    if exc.filename2:
        where = f"{where} -> {exc.filename2}"
    code = errno.errorcode.get(exc.errno or 0)
    cause = f"{exc.strerror} ({code})" if exc.strerror and code else str(exc)
    _say(f"fedsup: error: {f'{where}: ' if where else ''}{cause}")
    return ExitStatus.RUN_FAILED if getattr(args, "run_started", False) else ExitStatus.BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
