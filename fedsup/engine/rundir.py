"""The run directory: the source of truth for a run, written so that a kill at any moment loses nothing.

```
RUN_DIR/
  fedsup.lock             held (flock) by the process using the run, with its pid: one run at a time
  events.jsonl            append-only, one JSON object per state change, flushed at each
  tasks/<task>/record.json   the task's TaskRecord, written atomically when it reaches an outcome (and made
                             durable against a power cut by the next commit: a round's end, the run's end)
  tasks/<task>/stdout.log    the task's output, every attempt (the task's working directory is tasks/<task>/)
  tasks/<task>/stderr.log
  records/<group>.jsonl      instead of tasks/<task>/record.json, once ``use_records(group)`` is called (a
                             federated run: one file per round): one TaskRecord a line, appended and flushed
                             when the task reaches an outcome; where a task has several, the last counts
```

A run of many small jobs (a federated run: clients x rounds of them) groups its records: a folder per job
would leave a folder per client and round, 75,000 of them for 1,500 rounds of 50 clients. A grouped run
also removes, when it closes, the log files no task wrote to and the task folders left empty, so that
``tasks/`` holds only the folders of tasks that printed something.

A task's folder is its id where the id is a plain name (letters, digits, ``.``, ``_``, ``-``, at most 80
characters, not ``.`` or ``..``); any other id gets the cleaned id, a ``+`` and 128 bits of its SHA-256. A
plain id never holds a ``+``, so two ids never share a folder.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from fedsup.engine.errors import RunDirError
from fedsup.engine.records import TaskRecord

log = logging.getLogger(__name__)
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
_MAX_PLAIN = 80
LOCK_FILE = "fedsup.lock"


def safe_name(task_id: str) -> str:
    """A directory name for a task id: the id itself where it is a plain name, else the cleaned id, ``+`` and a
    hash of the id. ``+`` is never in a plain name, so a hashed name never equals one: ids ``"a/b"`` and
    ``"a_b"`` (or anything a hashed name looks like) get folders of their own."""
    if task_id and len(task_id) <= _MAX_PLAIN and not _UNSAFE.search(task_id) and task_id not in (".", ".."):
        return task_id
    cleaned = _UNSAFE.sub("_", task_id)[:_MAX_PLAIN]
    digest = hashlib.sha256(task_id.encode("utf-8", "surrogatepass")).hexdigest()[:32]
    return f"{cleaned}+{digest}"


# ---------------------------------------------------------------- the run lock


class _Flock:
    """One open, exclusively flock'ed ``fedsup.lock``: the kernel drops the lock when the last descriptor of it
    closes, so a SIGKILL never leaves it stuck. Its holders count references; the last ``release`` closes it."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self.fd = fd
        self.thread = threading.get_ident()
        self.holders = 1

    def release(self) -> None:
        self.holders -= 1
        if self.holders <= 0:
            self.close()

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            _LOCKS.pop(str(self.path.parent), None)
            os.close(fd)

    def __del__(self) -> None:  # a holder dropped without release (a RunDir never closed)
        self.close()


# run dir -> its lock, while this process holds it. Weak: a lock nobody holds any more is closed, not kept.
_LOCKS: weakref.WeakValueDictionary[str, _Flock] = weakref.WeakValueDictionary()


def _forget_locks_in_child() -> None:
    """A forked child (the fork servers, and through them every task process) must not keep the lock alive:
    flock belongs to the open file, which fork shares, so a task's double-forked daemon would hold the run
    directory locked after the run is gone. Close the child's copies; the parent's lock stays."""
    for lock in list(_LOCKS.values()):
        fd, lock.fd = lock.fd, -1
        if fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass
    _LOCKS.clear()


os.register_at_fork(after_in_child=_forget_locks_in_child)


@dataclass(frozen=True)
class LockState:
    """What ``fedsup.lock`` says of a run directory: whether it has one, whether a process holds it, whose."""

    exists: bool
    held: bool
    pid: int | None


def _pid_in(path: Path) -> int | None:
    try:
        text = path.read_text(encoding="ascii", errors="replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _flock_holders(path: Path) -> list[int] | None:
    """The pids /proc/locks shows holding a flock on ``path``; None where /proc/locks cannot be read."""
    try:
        st = os.stat(path)
        with open("/proc/locks", encoding="ascii", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    inode = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    pids = []
    for line in lines:
        fields = line.split()
        if "FLOCK" in fields and inode in fields and "->" not in fields:  # "->": a waiter, not a holder
            at = fields.index(inode)
            if fields[at - 1].isdigit():
                pids.append(int(fields[at - 1]))
    return pids


def lock_state(run_dir: str | os.PathLike[str]) -> LockState:
    """Whether a process is using the run directory now, by its lock, without taking the lock where the kernel
    can say (/proc/locks), so that asking never gets in the way of a run starting."""
    path = Path(run_dir) / LOCK_FILE
    if not path.is_file():
        return LockState(exists=False, held=False, pid=None)
    held = _LOCKS.get(str(Path(run_dir).resolve()))
    if held is not None and held.fd >= 0:
        return LockState(exists=True, held=True, pid=os.getpid())
    holders = _flock_holders(path)
    if holders:
        return LockState(exists=True, held=True, pid=_pid_in(path) or holders[0])
    # /proc/locks unreadable, or silent (a filesystem whose device it names otherwise): ask the lock itself
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return LockState(exists=True, held=False, pid=None)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return LockState(exists=True, held=True, pid=_pid_in(path))
    except OSError:  # no flock on this filesystem: nothing to tell
        return LockState(exists=True, held=False, pid=None)
    finally:
        os.close(fd)
    return LockState(exists=True, held=False, pid=None)


def _in_use(run_dir: Path, pid: int | None) -> RunDirError:
    who = "another process" if pid is None else f"pid {pid}" + (" (this process)" if pid == os.getpid() else "")
    return RunDirError(f"{run_dir}: in use by another run: {who} holds its lock ({run_dir / LOCK_FILE}); "
                       "wait for that run to end (or stop it), or choose another output")


def lock_run_dir(run_dir: str | os.PathLike[str], join: bool = False) -> _Flock:
    """Hold the run directory's lock for this run: ``fedsup.lock``, flock'ed, with this process's pid in it.

    A second run on the directory, from any process, is refused with a RunDirError naming the pid that holds
    it. ``join``: where this thread already holds it (a federated run, whose supervisor opens the same
    directory), share that hold instead. The lock dies with the process that holds it: a SIGKILL never leaves
    the directory locked. Call ``release()`` when the run is done.
    """
    path = Path(run_dir).resolve()
    key = str(path)
    current = _LOCKS.get(key)
    if current is not None and current.fd >= 0:
        if join and current.thread == threading.get_ident():
            current.holders += 1
            return current
        raise _in_use(path, os.getpid())
    path.mkdir(parents=True, exist_ok=True)
    fd = os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        pid = _pid_in(path / LOCK_FILE)
        if pid is None:  # the holder has the lock but has not written its pid yet
            pid = next(iter(_flock_holders(path / LOCK_FILE) or []), None)
        raise _in_use(path, pid) from None
    except OSError as exc:
        if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            os.close(fd)
            raise
        log.warning("%s: this filesystem does not support locks (%s); nothing stops a second run here",
                    path, exc.strerror)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    lock = _Flock(path / LOCK_FILE, fd)
    _LOCKS[key] = lock
    return lock


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


def read_record_lines(path: Path) -> tuple[dict[str, TaskRecord], int]:
    """The records of a ``records/<group>.jsonl`` file by task id (the last line of a task wins), and how
    many lines could not be read (a torn last line left by a kill, or a damaged one: that work runs again)."""
    records: dict[str, TaskRecord] = {}
    bad = 0
    try:
        data = path.read_bytes()
    except OSError:
        return records, 0
    for line in data.splitlines():
        if not line.strip():
            continue
        try:
            record = TaskRecord.model_validate_json(line)
        except ValueError:
            bad += 1
            continue
        records[record.task_id] = record
    if bad:
        log.warning("%s: %d line(s) damaged or torn; those records are not used", path, bad)
    return records, bad


def read_records(run_dir: Path, folders: str = "*") -> list[TaskRecord]:
    """Every readable task record of a run directory (of the task folders matching ``folders``, and with the
    default ``*`` those of ``records/*.jsonl`` too); damaged ones are named in the log and left out."""
    found = (read_record(p) for p in sorted((run_dir / "tasks").glob(f"{folders}/record.json")))
    records = [r for r in found if r is not None]
    if folders == "*":
        for path in sorted((run_dir / "records").glob("*.jsonl")):
            records.extend(read_record_lines(path)[0].values())
    return records


class RunDir:
    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path).resolve()
        self._lock = lock_run_dir(self.path, join=True)  # one run at a time; a federated run already holds it
        try:
            (self.path / "tasks").mkdir(exist_ok=True)
            events = self.path / "events.jsonl"
            torn = events.exists() and events.stat().st_size > 0 and not events.read_bytes().endswith(b"\n")
            self._events: IO[str] = open(events, "a", encoding="utf-8")
        except BaseException:
            self._lock.release()
            raise
        if torn:  # a killed writer left half a line: end it, so that it stays the only bad line
            self._events.write("\n")
        self._writing = threading.Lock()
        self._group: str | None = None
        self._group_file: IO[str] | None = None
        self._group_records: dict[str, TaskRecord] | None = None  # the group's file as found, read on demand

    def use_records(self, group: str) -> None:
        """From now on write records to ``records/<group>.jsonl`` and read them from there (see the module
        docstring); a federated run calls it with ``round-R`` before each round's jobs."""
        if group == self._group:
            return
        self._close_group()
        self._group = group

    def records_path(self, group: str) -> Path:
        return self.path / "records" / f"{safe_name(group)}.jsonl"

    def _close_group(self) -> None:
        if self._group_file is not None:
            self._group_file.close()
        self._group_file, self._group_records = None, None

    def task_dir(self, task_id: str) -> Path:
        return self.path / "tasks" / safe_name(task_id)

    def event(self, **fields: Any) -> None:
        fields = {"time": round(time.time(), 6), **fields}
        line = json.dumps(fields, default=str) + "\n"
        with self._writing:  # a sweep's run writes from its thread, the scheduler from the main one
            if self._events.closed:
                log.warning("an event after its run directory was closed was not written: %s", line.strip()[:200])
                return
            self._events.write(line)
            self._events.flush()

    def write_record(self, record: TaskRecord) -> None:
        """Atomically (a whole file, or a whole line that a reader takes or leaves); durable at the next
        ``commit`` (a federated round's end, or the run's)."""
        with self._writing:
            if self._events.closed:
                log.warning("the record of %s came after its run directory was closed: not written", record.task_id)
                return
            self._write_record(record)

    def _write_record(self, record: TaskRecord) -> None:
        if self._group is None:
            path = self.task_dir(record.task_id) / "record.json"
            write_atomic(path, (record.model_dump_json(indent=2) + "\n").encode(), durable=False)
            return
        if self._group_file is None:
            path = self.records_path(self._group)
            path.parent.mkdir(exist_ok=True)
            torn = path.exists() and path.stat().st_size > 0 and not path.read_bytes().endswith(b"\n")
            self._group_file = open(path, "a", encoding="utf-8")
            if torn:  # a killed writer left half a line: end it, so that the next record is a line of its own
                self._group_file.write("\n")
        self._group_file.write(record.model_dump_json() + "\n")
        self._group_file.flush()
        if self._group_records is not None:
            self._group_records[record.task_id] = record

    def commit(self) -> None:
        """Make every record, event and file written so far durable, against a power cut too."""
        self._events.flush()
        sync_filesystem(self.path)

    def read_record(self, task_id: str) -> TaskRecord | None:
        """The task's record, or None when there is none or it is damaged (the task then runs again). A grouped
        run falls back on ``tasks/<task>/record.json``, where a run of an older layout left its records."""
        if self._group is not None:
            if self._group_records is None:
                self._group_records = read_record_lines(self.records_path(self._group))[0]
            found = self._group_records.get(task_id)
            if found is not None:
                return found
        return read_record(self.task_dir(task_id) / "record.json")

    def drop_empty_logs(self) -> None:
        """Remove the log files no task wrote to, and the task folders that leaves empty. Only once no task
        process runs: a process writing to a log removed under it would lose its output."""
        folder = self.path / "tasks"
        if not folder.is_dir():
            return
        for entry in os.scandir(folder):
            if not entry.is_dir(follow_symlinks=False):
                continue
            for name in ("stdout.log", "stderr.log"):
                log_file = Path(entry.path, name)
                try:
                    if log_file.stat().st_size == 0:
                        log_file.unlink()
                except OSError:
                    continue
            try:
                os.rmdir(entry.path)  # only where nothing is left in it
            except OSError:
                pass
        try:
            folder.rmdir()
        except OSError:
            pass

    def close(self) -> None:
        with self._writing:
            if self._events.closed:
                return
            grouped = self._group is not None
            self._close_group()
            if grouped:
                self.drop_empty_logs()
            self.commit()
            self._events.close()
            self._lock.release()
