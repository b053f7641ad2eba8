"""A command run on a pseudo-terminal, and the screen a terminal would show after its output: for the tests
of what rich's live display leaves on a real terminal."""

from __future__ import annotations

import os
import pty
import re
import subprocess
import threading
from collections.abc import Callable


def run_on_terminal(argv: list[str], env: dict[str, str], timeout: float,
                    meanwhile: Callable[[subprocess.Popen[bytes]], None] | None = None,
                    width: int = 120) -> tuple[int, list[str]]:
    """Run ``argv`` with its stdout and stderr on a terminal ``width`` columns wide; ``meanwhile`` acts on the
    process while it runs (a signal at the right moment). Its exit status and the final screen."""
    master, slave = pty.openpty()
    env = {**env, "COLUMNS": str(width), "LINES": "40"}
    process = subprocess.Popen(argv, stdout=slave, stderr=slave, env=env)
    os.close(slave)
    chunks: list[bytes] = []

    def read_all() -> None:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: every holder of the terminal's other side has closed it
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=read_all)
    reader.start()
    try:
        if meanwhile is not None:
            meanwhile(process)
        code = process.wait(timeout=timeout)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        reader.join(timeout=60)
        os.close(master)
    return code, screen_of(b"".join(chunks).decode(errors="replace"), width)


def screen_of(stream: str, width: int) -> list[str]:
    """The screen a terminal shows after ``stream``, for what rich's live display sends: text, CR, LF, cursor
    up/down, erase line, and SGR and mode sequences (ignored)."""
    rows: list[list[str]] = [[]]
    row = col = 0
    for token in re.findall(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[^\[]|\r|\n|[^\x1b\r\n]", stream):
        if token == "\r":
            col = 0
        elif token == "\n":
            row, col = row + 1, 0
        elif token.startswith("\x1b["):
            count = int(re.sub(r"\D", "", token) or 1)
            if token.endswith("A"):
                row = max(0, row - count)
            elif token.endswith("B"):
                row += count
            elif token.endswith("K"):
                rows[row][:] = [] if "2" in token else rows[row][:col]
            continue
        elif token.startswith("\x1b"):
            continue
        else:
            if col >= width:
                row, col = row + 1, 0
            while len(rows) <= row:
                rows.append([])
            line = rows[row]
            line.extend(" " * (col - len(line) + 1))
            line[col] = token
            col += 1
        while len(rows) <= row:
            rows.append([])
    return ["".join(r).rstrip() for r in rows]
