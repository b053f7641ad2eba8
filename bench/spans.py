#!/usr/bin/env python
"""What a measured span costs: ``fedsup.span`` against an empty ``with`` block, in one process.

    python bench/spans.py [--spans 20000]

Each span reads the clock, the CPU time and the kernel's memory high-water mark twice and resets that mark
once (``fedsup/engine/spans.py``); CUDA's peak counters too where this process uses CUDA (not here). The
spans are timed flat and nested three deep; the target is at most 50 microseconds per span.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

TARGET_US = 50.0


def per_span(open_span: Callable[[str], contextlib.AbstractContextManager[None]], count: int, depth: int) -> float:
    """Microseconds per span, the median of five passes over ``count`` spans (``depth`` nested at a time)."""
    passes = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(count // depth):
            with contextlib.ExitStack() as stack:
                for level in range(depth):
                    stack.enter_context(open_span(f"level-{level}"))
        passes.append((time.perf_counter() - t0) / (count // depth * depth) * 1e6)
    return sorted(passes)[2]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spans", type=int, default=20000)
    args = parser.parse_args()
    from fedsup.engine import spans

    spans.begin_phase()
    rows = []
    for depth in (1, 3):
        bare = per_span(lambda name: contextlib.nullcontext(), args.spans, depth)
        measured = per_span(lambda name: spans.span(name, step=1), args.spans, depth)
        spans.end_phase()
        rows.append((depth, bare, measured))
    print(f"{'nesting':<8} {'empty with, us':>15} {'fedsup.span, us':>16} {'cost, us':>9}  "
          f"target <= {TARGET_US:.0f} us")
    status = 0
    for depth, bare, measured in rows:
        verdict = "PASS" if measured - bare <= TARGET_US else "FAIL"
        status |= verdict == "FAIL"
        print(f"{depth:<8} {bare:15.2f} {measured:16.2f} {measured - bare:9.2f}  {verdict}")
    return status


if __name__ == "__main__":
    common.run_main(main)
