"""Making a warm process cheap to fork many times.

A fork server that has imported and warmed torch holds ~220 MiB of anonymous memory (the Python heap and
torch's allocations). Every fork copies a page-table entry for each of those 4 KiB pages and every exit tears
them down again: ~25 ms per task on a small VM, which is most of what a no-op task costs. Two things cut it:

* ``gc.freeze()``: objects that exist at fork time move to the permanent generation, so a collection in the
  child never walks (and so never copies) the parent's whole heap. CPython's documentation recommends it
  for exactly this pattern.
* ``MADV_COLLAPSE`` (Linux 6.1+): the anonymous memory is rebuilt from 2 MiB huge pages, so a fork copies one
  entry per 2 MiB instead of 512. A child that writes to a huge page splits only its own mapping and copies
  4 KiB, as before. The VMAs' huge-page flags are left alone, so the children's own new memory is allocated
  as the system would have allocated it anyway.

Both are best-effort: on a kernel without ``MADV_COLLAPSE``, or with huge pages unavailable, forking works as
before, only slower.
"""

from __future__ import annotations

import ctypes
import gc
import logging
from dataclasses import dataclass

log = logging.getLogger(__name__)

_MADV_COLLAPSE = 25
_HUGE = 2 << 20


@dataclass(frozen=True)
class Collapsed:
    ranges: int     # 2 MiB ranges now backed by a huge page
    refused: int    # ranges the kernel would not collapse (partly unmapped, locked, or no huge page free)


def anonymous_ranges(maps_text: str) -> list[tuple[int, int]]:
    """The 2 MiB-aligned parts of the private writable anonymous mappings (heap included) in /proc/PID/maps."""
    ranges: list[tuple[int, int]] = []
    for line in maps_text.splitlines():
        fields = line.split()
        if len(fields) < 5 or not fields[1].startswith("rw") or fields[1][3] != "p":
            continue
        name = fields[5] if len(fields) > 5 else ""
        if name not in ("", "[heap]"):
            continue
        low, high = (int(x, 16) for x in fields[0].split("-"))
        start, end = (low + _HUGE - 1) & ~(_HUGE - 1), high & ~(_HUGE - 1)
        if end > start:
            ranges.append((start, end))
    return ranges


def collapse_to_huge_pages() -> Collapsed:
    """Back this process's anonymous memory with huge pages, where the kernel can."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        madvise = libc.madvise
        madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        with open("/proc/self/maps") as f:
            ranges = anonymous_ranges(f.read())
    except (OSError, AttributeError):
        return Collapsed(0, 0)
    done = refused = 0
    for start, end in ranges:
        for address in range(start, end, _HUGE):
            if madvise(address, _HUGE, _MADV_COLLAPSE) == 0:
                done += 1
            elif ctypes.get_errno() == 22 and done == 0 and refused == 0:
                return Collapsed(0, 0)  # EINVAL at once: no MADV_COLLAPSE here, or huge pages disabled for us
            else:
                refused += 1
    return Collapsed(done, refused)


def prepare_to_fork() -> None:
    """Call once in a process that is about to fork many children, after its imports and warm-up."""
    gc.collect()
    gc.freeze()
    collapsed = collapse_to_huge_pages()
    log.debug("fork server: %d MiB of anonymous memory on huge pages (%d ranges refused)",
              collapsed.ranges * 2, collapsed.refused)
