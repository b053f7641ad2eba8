"""The command line: a thin translator from argv to a library call to an exit status. The core never prints."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from enum import IntEnum

from fedsup.errors import FedsupError


class ExitStatus(IntEnum):
    SUCCESS = 0
    RUN_FAILED = 1
    BAD_INPUT = 2
    INTERRUPTED = 130


def cmd_devices(args: argparse.Namespace) -> int:
    from fedsup.devices import cpu_cores, describe_gpus
    from fedsup.units import format_bytes

    gpus = describe_gpus()
    if args.json:
        print(json.dumps({"gpus": gpus, "cpu_cores": cpu_cores()}))
        return ExitStatus.SUCCESS
    if not gpus:
        print(f"no NVIDIA GPUs found (NVML reports none); tasks run on the CPU ({cpu_cores()} cores)")
    for gpu in gpus:
        total, free = format_bytes(gpu["total"]), format_bytes(gpu["free"])
        print(f"{gpu['name']:8} {gpu['model']:28} total {total:>10}   free {free:>10}")
    return ExitStatus.SUCCESS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedsup", description="A federated-learning process supervisor.")
    parser.add_argument("--traceback", action="store_true", help="show the full traceback on errors")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    sub = parser.add_subparsers(dest="command", required=True)
    devices = sub.add_parser("devices", help="list GPUs with total and free memory")
    devices.add_argument("--json", action="store_true", help="print JSON")
    devices.set_defaults(func=cmd_devices)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = {0: logging.WARNING, 1: logging.INFO}.get(args.verbose, logging.DEBUG)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return int(func(args))
    except FedsupError as exc:
        if args.traceback:
            raise
        print(f"fedsup: error: {exc}", file=sys.stderr)
        return ExitStatus.BAD_INPUT
    except KeyboardInterrupt:
        if args.traceback:
            raise
        print("fedsup: interrupted", file=sys.stderr)
        return ExitStatus.INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
