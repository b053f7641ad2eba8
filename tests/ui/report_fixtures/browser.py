"""Render a page in headless Chromium and read the screenshot back, with the standard library only.

Chromium daemonises helpers (crashpad, zygotes) that outlive the browser and are reparented away from
us. So it runs under a small Python wrapper that makes itself a child subreaper (Linux prctl): every
descendant is reparented to the wrapper, which kills and reaps them all before it exits. Nothing outlives
a call, even when the call times out (the wrapper gets its own session and the whole group is killed).
"""

from __future__ import annotations

import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
WINDOW = "--window-size=1280,2000"

# Run as `python -c WRAPPER chromium ...`: become a subreaper, run the command, then reap everything.
WRAPPER = r"""
import ctypes, os, signal, subprocess, sys, time
libc = ctypes.CDLL(None, use_errno=True)
libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
code = subprocess.call(sys.argv[1:])
deadline = time.monotonic() + 5
while True:
    try:
        pid, _ = os.waitpid(-1, os.WNOHANG)
    except ChildProcessError:
        break
    if pid == 0:
        if time.monotonic() > deadline:
            for name in os.listdir("/proc"):
                if name.isdigit():
                    try:
                        fields = open(f"/proc/{name}/stat").read().rsplit(")", 1)[1].split()
                    except OSError:
                        continue
                    if int(fields[1]) == os.getpid():
                        os.kill(int(name), signal.SIGKILL)
        time.sleep(0.05)
sys.exit(code)
"""


def chromium() -> str | None:
    return shutil.which("chromium")


def version(binary: str) -> str:
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30)
    return out.stdout.strip()


def run_chromium(binary: str, args: list[str], timeout: float = 90.0) -> subprocess.CompletedProcess[str]:
    """Run Chromium headless with ``args`` and a fresh profile; raise TimeoutError if it hangs."""
    with tempfile.TemporaryDirectory(prefix="fedsup-chromium-") as profile:
        command = [sys.executable, "-c", WRAPPER, binary, *FLAGS, f"--user-data-dir={profile}", *args]
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise TimeoutError(f"chromium did not finish within {timeout:g} s (deadlock?)") from None
        return subprocess.CompletedProcess(command, proc.returncode, out, err)


def screenshot(binary: str, page: Path, png: Path) -> subprocess.CompletedProcess[str]:
    return run_chromium(binary, [f"--screenshot={png}", WINDOW, page.resolve().as_uri()])


def dump_dom(binary: str, page: Path) -> str:
    return run_chromium(binary, ["--dump-dom", WINDOW, page.resolve().as_uri()]).stdout


# ---------------------------------------------------------------- PNG


@dataclass
class Image:
    width: int
    height: int
    channels: int
    rows: list[bytes]

    def pixel(self, x: int, y: int) -> tuple[int, ...]:
        c = self.channels
        return tuple(self.rows[y][x * c: x * c + 3])

    def colours(self, step: int = 1) -> dict[tuple[int, int, int], int]:
        """Count of each RGB colour, over every ``step``-th row."""
        counts: Counter[tuple[int, int, int]] = Counter()
        c = self.channels
        for row in self.rows[::step]:
            counts.update(zip(row[0::c], row[1::c], row[2::c], strict=True))
        return dict(counts)


def read_png(path: Path) -> Image:
    """Decode an 8-bit RGB or RGBA, non-interlaced PNG."""
    data = path.read_bytes()
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError(f"{path}: not a PNG")
    pos, header, idat = 8, b"", []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            header = body
        elif kind == b"IDAT":
            idat.append(body)
    width, height, depth, colour_type, _, _, interlace = struct.unpack(">IIBBBBB", header)
    if depth != 8 or colour_type not in (2, 6) or interlace:
        raise ValueError(f"{path}: only 8-bit RGB/RGBA non-interlaced PNGs are supported")
    channels = 3 if colour_type == 2 else 4
    return Image(width, height, channels, _unfilter(zlib.decompress(b"".join(idat)), width * channels, channels))


def _unfilter(raw: bytes, stride: int, bpp: int) -> list[bytes]:
    rows: list[bytes] = []
    previous = bytes(stride)
    for start in range(0, len(raw), stride + 1):
        kind, line = raw[start], raw[start + 1:start + 1 + stride]
        previous = _UNFILTERS[kind](line, previous, bpp)
        rows.append(previous)
    return rows


def _none(line: bytes, up: bytes, bpp: int) -> bytes:
    return line


def _up(line: bytes, up: bytes, bpp: int) -> bytes:
    # Byte-wise addition mod 256 across the whole row at once, on big integers (no carries between bytes).
    a, b = int.from_bytes(line, "big"), int.from_bytes(up, "big")
    low = int.from_bytes(b"\x7f" * len(line), "big")
    high = int.from_bytes(b"\x80" * len(line), "big")
    total = ((a & low) + (b & low)) ^ ((a ^ b) & high)
    return total.to_bytes(len(line), "big")


def _sub(line: bytes, up: bytes, bpp: int) -> bytes:
    out = bytearray(line)
    for channel in range(bpp):
        left, decoded = 0, bytearray()
        for x in line[channel::bpp]:
            left = (x + left) & 0xFF
            decoded.append(left)
        out[channel::bpp] = decoded
    return bytes(out)


def _average(line: bytes, up: bytes, bpp: int) -> bytes:
    out = bytearray(line)
    for channel in range(bpp):
        left, decoded = 0, bytearray()
        for x, b in zip(line[channel::bpp], up[channel::bpp], strict=True):
            left = (x + ((left + b) >> 1)) & 0xFF
            decoded.append(left)
        out[channel::bpp] = decoded
    return bytes(out)


def _paeth(line: bytes, up: bytes, bpp: int) -> bytes:
    # One channel at a time, so that left (a), up (b) and up-left (c) are plain locals: about twice as fast.
    out = bytearray(line)
    for channel in range(bpp):
        a = c = 0
        decoded = bytearray()
        for x, b in zip(line[channel::bpp], up[channel::bpp], strict=True):
            pa, pb = abs(b - c), abs(a - c)
            pc = abs(a + b - c - c)
            a = (x + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 0xFF
            c = b
            decoded.append(a)
        out[channel::bpp] = decoded
    return bytes(out)


_UNFILTERS = {0: _none, 1: _sub, 2: _up, 3: _average, 4: _paeth}


@pytest.fixture()
def chromium_binary() -> Iterator[str]:
    """Chromium's path, or the test is skipped; and no browser process may outlive the test."""
    binary = chromium()
    if binary is None:
        pytest.skip("chromium is not installed (Debian: apt-get install -y chromium): the page is not rendered")
    yield binary
    assert psutil.Process().children(recursive=True) == [], "a browser process outlived the test"
