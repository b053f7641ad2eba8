"""A FIFO that task processes announce themselves on: tests wait on it instead of sleeping."""

from __future__ import annotations

import os
import select
from pathlib import Path


class Fifo:
    """A FIFO the tasks announce themselves on, held open read-write by the test.

    Holding it read-write means a task's ``open(O_WRONLY)`` never blocks and the pipe never reports EOF;
    ``lines(n)`` waits, with ``select`` and a deadlock-detector timeout, until ``n`` lines have come.
    """

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        os.mkfifo(self.path)
        self.fd = os.open(self.path, os.O_RDWR | os.O_NONBLOCK)
        self._buffer = b""

    def lines(self, n: int, timeout: float = 60.0, watch: list[object] | None = None) -> list[str]:
        """The next ``n`` announcements. ``watch``: more objects to select on (a subprocess's stdout); if
        one of them becomes readable first, that process ended early, and this raises instead of hanging."""
        out: list[str] = []
        while True:
            while b"\n" in self._buffer and len(out) < n:
                line, self._buffer = self._buffer.split(b"\n", 1)
                out.append(line.decode())
            if len(out) == n:
                return out
            ready, _, _ = select.select([self.fd, *(watch or [])], [], [], timeout)
            if not ready:
                raise TimeoutError(f"only {len(out)} of {n} announcements after {timeout} s: {out}")
            if self.fd not in ready:
                raise RuntimeError(f"a watched process ended before {n} announcements came (got {out})")
            self._buffer += os.read(self.fd, 4096)

    def close(self) -> None:
        os.close(self.fd)
