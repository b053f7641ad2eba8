"""The run directory: the source of truth for a run, written so that a kill at any moment loses nothing.

```
RUN_DIR/
  events.jsonl            append-only, one JSON object per state change, flushed at each
  tasks/<task>/record.json   the task's TaskRecord, written atomically when it reaches an outcome (and made
                             durable against a power cut by the next commit: a round's end, the run's end)
  tasks/<task>/stdout.log    the task's output, every attempt (the task's working directory is tasks/<task>/)
  tasks/<task>/stderr.log
```
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import os
import re
import tempfile
import time
from pathlib import Path
from typing import IO, Any

from fedsup.engine.records import TaskRecord

log = logging.getLogger(__name__)
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def safe_name(task_id: str) -> str:
    """A directory name for a task id: the id itself where it is safe, else a cleaned id plus a short hash."""
    cleaned = _UNSAFE.sub("_", task_id)[:80]
    if cleaned == task_id and cleaned not in (".", ".."):
        return cleaned
    return f"{cleaned}-{hashlib.sha1(task_id.encode()).hexdigest()[:8]}"


def write_atomic(path: Path, data: bytes, durable: bool = True) -> None:
    """Write to a temp file beside ``path`` and rename it over ``path``: readers see old or new, never half.

    ``durable``: fsync before the rename, so that a power cut cannot leave an empty file behind. Without it
    the file survives any kill of the process (it is in the kernel's cache) and is made durable by the next
    ``sync_filesystem``.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o644)  # mkstemp makes 0600; run files are for whoever reads the run
            f.write(data)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def sync_filesystem(path: Path) -> None:
    """Make everything written to ``path``'s filesystem durable: one ``syncfs`` (one journal commit) instead of
    an fsync per file, which on the supervisor's loop held up every task process waiting for a command."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(path, os.O_RDONLY)
    except (OSError, AttributeError):
        os.sync()
        return
    try:
        if libc.syncfs(fd) != 0:
            os.sync()
    except AttributeError:  # a libc without syncfs
        os.sync()
    finally:
        os.close(fd)


def write_json(path: Path, obj: Any) -> None:
    write_atomic(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def tail_lines(path: Path, offset: int = 0, lines: int = 20, max_bytes: int = 64 * 1024) -> list[str]:
    """The last ``lines`` lines written to ``path`` after byte ``offset``."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(offset, size - max_bytes))
            text = f.read().decode(errors="replace")
    except OSError:
        return []
    return text.splitlines()[-lines:]


def read_record(path: Path) -> TaskRecord | None:
    if not path.exists():
        return None
    try:
        return TaskRecord.model_validate_json(path.read_bytes())
    except ValueError as exc:
        log.warning("%s is damaged (%s); it is not used", path, str(exc).splitlines()[0])
        return None


def read_records(run_dir: Path, folders: str = "*") -> list[TaskRecord]:
    """Every readable task record of a run directory (of the task folders matching ``folders``); damaged
    ones are named in the log and left out."""
    found = (read_record(p) for p in sorted((run_dir / "tasks").glob(f"{folders}/record.json")))
    return [r for r in found if r is not None]


class RunDir:
    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path).resolve()
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / "tasks").mkdir(exist_ok=True)
        events = self.path / "events.jsonl"
        torn = events.exists() and events.stat().st_size > 0 and not events.read_bytes().endswith(b"\n")
        self._events: IO[str] = open(events, "a", encoding="utf-8")
        if torn:  # a killed writer left half a line: end it, so that it stays the only bad line
            self._events.write("\n")

    def task_dir(self, task_id: str) -> Path:
        return self.path / "tasks" / safe_name(task_id)

    def event(self, **fields: Any) -> None:
        fields = {"time": round(time.time(), 6), **fields}
        self._events.write(json.dumps(fields, default=str) + "\n")
        self._events.flush()

    def write_record(self, record: TaskRecord) -> None:
        """Atomically; durable at the next ``commit`` (a federated round's end, or the run's)."""
        path = self.task_dir(record.task_id) / "record.json"
        write_atomic(path, (record.model_dump_json(indent=2) + "\n").encode(), durable=False)

    def commit(self) -> None:
        """Make every record, event and file written so far durable, against a power cut too."""
        self._events.flush()
        sync_filesystem(self.path)

    def read_record(self, task_id: str) -> TaskRecord | None:
        """The task's record, or None when there is none or it is damaged (the task then runs again)."""
        return read_record(self.task_dir(task_id) / "record.json")

    def close(self) -> None:
        if not self._events.closed:
            self.commit()
            self._events.close()
