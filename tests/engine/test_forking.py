"""Preparing a warm process to be forked cheaply: which memory is offered for huge pages, and that asking is
harmless where the kernel says no."""

from __future__ import annotations

import subprocess
import sys

from fedsup.engine.forking import anonymous_ranges

MAPS = """\
55d0c0000000-55d0c0a00000 rw-p 00000000 00:00 0                          [heap]
7f0000100000-7f0000900000 rw-p 00000000 00:00 0
7f0000900000-7f0000a00000 rw-p 00000000 00:00 0
7f1000000000-7f1000400000 rw-s 00000000 00:05 12                         /dev/shm/fedsup-global
7f2000000000-7f2000400000 rw-p 00001000 fd:01 99                         /usr/lib/libtorch_cpu.so
7f3000000000-7f3000400000 r--p 00000000 00:00 0
7ffc00000000-7ffc00400000 rw-p 00000000 00:00 0                          [stack]
"""


def test_only_private_anonymous_memory_is_offered_in_whole_huge_pages() -> None:
    mib2 = 2 << 20
    ranges = anonymous_ranges(MAPS)
    # the heap (10 MiB, aligned); the anonymous 8 MiB starting 1 MiB past a boundary shrinks to its aligned
    # middle; the 1 MiB mapping holds no whole huge page; shared, file-backed, read-only and stack are skipped
    assert ranges == [(0x55D0C0000000, 0x55D0C0A00000), (0x7F0000200000, 0x7F0000800000)]
    assert all(start % mib2 == 0 and end % mib2 == 0 for start, end in ranges)


def test_preparing_to_fork_is_harmless_and_children_still_work() -> None:
    # In a process of its own: it freezes the garbage collector's view of the heap for good.
    code = """
import os, resource
import torch
from fedsup.engine.forking import prepare_to_fork
def rss():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) * 1024
before = rss()
prepare_to_fork()
grown = rss() - before
pid = os.fork()
if pid == 0:
    os._exit(0 if float(torch.ones(3).sum()) == 3.0 else 1)
_, status = os.waitpid(pid, 0)
print(grown < 64 << 20, os.waitstatus_to_exitcode(status))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "0"], out.stdout
