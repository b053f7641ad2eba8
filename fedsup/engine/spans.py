"""Measured spans inside a task: ``with fedsup.span("epoch", epoch=3):`` in ``load``, ``train`` or ``evaluate``.

A span records its wall time, CPU time, peak host memory and, where this process uses CUDA, peak GPU memory
(torch's allocated bytes), with the keyword data it was opened with; spans nest. A span left by an exception
is closed and marked failed, and the exception goes on.

Peaks are exact for every span, nested or not: the kernel's high-water mark (VmHWM) is reset when a span
opens (``/proc/self/clear_refs``, as lenskit's ``reset_hwm``), and what it had reached is first handed to the
spans still open around it, so that an outer span's peak is the largest of its own and its children's. The
phase's own measurement (``worker.Meter``) reads the same hand-over, so spans never hide a phase's peak.

They run in the task's process only, on the thread that runs ``load``/``train``/``evaluate`` (one stack per
process: spans opened on other threads would interleave with it); the finished top-level spans of a phase
travel in its PhaseRecord. Where ``/proc/self/clear_refs`` cannot be written, the mark cannot be reset and
spans report no host peak (the phase's own peak is kept).
"""

from __future__ import annotations

import contextlib
import os
import resource
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from fedsup.engine.records import SpanRecord, to_jsonable

_KIB = 1024


class _Proc:
    """This process's /proc files, opened once: a span's cost is two reads and a write, not six opens."""

    def __init__(self) -> None:
        self.status: int | None = None
        self.clear_refs: int | None = None
        self.pid: int | None = None

    def _open(self) -> None:
        # A forked child inherits the parent's descriptors, which point at the parent's /proc/self files.
        if self.pid == os.getpid():
            return
        for fd in (self.status, self.clear_refs):  # the parent's, inherited through a fork
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.pid = os.getpid()
        self.status = _open_or_none("/proc/self/status", os.O_RDONLY)
        self.clear_refs = _open_or_none("/proc/self/clear_refs", os.O_WRONLY)

    def high_water(self) -> int | None:
        """VmHWM in bytes, or None where /proc has none."""
        self._open()
        if self.status is None:
            return None
        text = os.pread(self.status, 4096, 0)
        at = text.find(b"VmHWM:")
        if at < 0:
            return None
        return int(text[at + 6:text.index(b"kB", at)]) * _KIB

    def reset_high_water(self) -> bool:
        self._open()
        if self.clear_refs is None:
            return False
        try:
            os.write(self.clear_refs, b"5")
        except OSError:
            return False
        return True


def _open_or_none(path: str, flags: int) -> int | None:
    try:
        return os.open(path, flags | os.O_CLOEXEC)
    except OSError:
        return None


_proc = _Proc()


@dataclass
class OpenSpan:
    """A span still open: what ``current_span()`` returns."""

    name: str
    data: dict[str, Any]
    started: float
    t0: float
    cpu0: float
    host_seen: int = 0           # the largest high-water mark handed over by resets inside this span
    gpu_seen: int = 0
    children: list[SpanRecord] = field(default_factory=list)


@dataclass
class _State:
    stack: list[OpenSpan] = field(default_factory=list)
    finished: list[SpanRecord] = field(default_factory=list)   # this phase's top-level spans
    host_seen: int = 0            # for the phase: the high-water marks that resets cleared
    reserved_seen: int = 0        # torch's peak reserved memory, which the phase reports
    resettable: bool = True       # the high-water mark could be reset: spans' host peaks are their own


_state = _State()


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _cuda() -> Any | None:
    """torch.cuda where this process has initialised CUDA (never initialises it)."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_initialized():
        return None
    return torch.cuda


def _hand_over() -> None:
    """Reset the high-water marks, first giving what they reached to every open span and to the phase."""
    host = _proc.high_water() or 0
    cuda = _cuda()
    gpu = int(cuda.max_memory_allocated()) if cuda is not None else 0
    for span in _state.stack:
        span.host_seen = max(span.host_seen, host)
        span.gpu_seen = max(span.gpu_seen, gpu)
    _state.host_seen = max(_state.host_seen, host)
    if cuda is not None:
        _state.reserved_seen = max(_state.reserved_seen, int(cuda.max_memory_reserved()))
    if not _proc.reset_high_water():
        _state.resettable = False  # the mark is the process's lifetime peak: no span's own
    if cuda is not None:
        cuda.reset_peak_memory_stats()


@contextmanager
def span(name: str, **data: Any) -> Iterator[None]:
    """Measure the block as a span named ``name``, with ``data`` kept beside it."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"span: expected a non-empty name, got {name!r}")
    _hand_over()
    opened = OpenSpan(name, to_jsonable(data), time.time(), time.perf_counter(), _cpu())
    _state.stack.append(opened)
    error: BaseException | None = None
    try:
        yield
    except BaseException as exc:
        error = exc
        raise
    finally:
        _close(opened, error)


def _close(opened: OpenSpan, error: BaseException | None) -> None:
    duration = time.perf_counter() - opened.t0
    cpu_time = _cpu() - opened.cpu0
    host = _proc.high_water()
    cuda = _cuda()
    gpu = int(cuda.max_memory_allocated()) if cuda is not None else None
    _state.stack.pop()
    record = SpanRecord(
        name=opened.name, data=opened.data, started=opened.started, duration=duration, cpu_time=cpu_time,
        peak_memory=None if host is None or not _state.resettable else max(host, opened.host_seen),
        peak_gpu_memory=None if gpu is None else max(gpu, opened.gpu_seen),
        failed=error is not None,
        error=None if error is None else f"{type(error).__name__}: {error}"[:500],
        children=opened.children,
    )
    (_state.stack[-1].children if _state.stack else _state.finished).append(record)


def current_span() -> OpenSpan | None:
    """The innermost open span of this process (its ``name``, ``data``, ``started``), or None."""
    return _state.stack[-1] if _state.stack else None


# ---------------------------------------------------------------- for the phase's meter (worker.Meter)


def begin_phase() -> None:
    _state.stack.clear()
    _state.finished = []
    _state.host_seen = 0
    _state.reserved_seen = 0
    _state.resettable = True


def end_phase() -> tuple[list[SpanRecord], int, int]:
    """This phase's top-level spans, and the largest host and GPU high-water marks that spans' resets cleared
    (torch's reserved bytes) that spans' resets cleared: the phase's peaks are the larger of these and the
    marks at its end."""
    while _state.stack:  # left open by a generator never finished, say: closed as failed
        _close(_state.stack[-1], RuntimeError("the span was still open when the phase ended"))
    finished, _state.finished = _state.finished, []
    return finished, _state.host_seen, _state.reserved_seen
