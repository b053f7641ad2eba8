"""Containment: nothing a task starts outlives its task, its fork server or the supervisor.

Three nets, each catching what the one before it cannot (docs/reliability.md says where each is available):

* **Process groups.** Every task process leads its own group; when it ends, the supervisor kills the group,
  so a helper it started and did not stop (``subprocess.Popen``) goes with it.
* **Child subreapers** (``PR_SET_CHILD_SUBREAPER``, Linux 3.4+). Every task process and every fork server is
  a subreaper: a process orphaned below it (the middle of a double fork exits, a ``setsid()`` daemon) is
  reparented to it instead of to init, so it stays in fedsup's tree whatever group or session it moved to.
  A task process kills its descendants when its task ends (before it takes the next task, and before it
  exits); a fork server kills every child that is not one of its task processes (only a dead task's
  leftovers can be), and when the supervisor dies it kills its whole tree before it exits.
* **A cgroup v2 folder per task process**, where the cgroup v2 hierarchy is writable: the process moves
  itself into ``fedsup-<pid>-<n>/p<k>`` under the supervisor's own cgroup before any task code runs, so
  everything it ever starts is in that folder, wherever it was reparented. When the process ends, the
  folder is killed (``cgroup.kill``, atomic even against a process forking in a loop) and removed. This
  covers what the subreapers cannot: a fork server killed from outside takes its subreaper role with it.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import logging
import os
import select
import signal
from pathlib import Path

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36
_folders = itertools.count(1)


def _prctl(option: int, value: int) -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(option, value, 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


def set_parent_death_signal(sig: int) -> bool:
    """Ask the kernel for ``sig`` when the thread that forked us ends (in practice: our parent dies)."""
    return _prctl(_PR_SET_PDEATHSIG, sig)


def become_subreaper() -> bool:
    """Make orphans below this process its children instead of init's. Not inherited through fork."""
    return _prctl(_PR_SET_CHILD_SUBREAPER, 1)


def child_pids(pid: int | str = "self") -> list[int]:
    """The children of ``pid`` (every thread's), from /proc: cheap, no walk of the process table."""
    pids: list[int] = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return pids
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                pids.extend(int(p) for p in f.read().split())
        except OSError:
            continue
    return pids


def descendants(pid: int | str = "self") -> list[int]:
    """Every process below ``pid``, parents before their children."""
    found: list[int] = []
    todo = child_pids(pid)
    while todo:
        p = todo.pop()
        found.append(p)
        todo.extend(child_pids(p))
    return found


def kill_quietly(pid: int, sig: int = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


def _wait_for(pids: list[int], timeout: float) -> None:
    """Reap these children of ours, waiting at most ``timeout`` in all (a process stuck in the kernel may
    not die at once); pidfds make it a wait, not a poll."""
    fds: dict[int, int] = {}
    for pid in pids:
        try:
            fds[os.pidfd_open(pid)] = pid
        except OSError:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
    try:
        while fds:
            ready, _, _ = select.select(list(fds), [], [], timeout)
            if not ready:
                return
            for fd in ready:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(fds[fd], os.WNOHANG)
                os.close(fd)
                del fds[fd]
    finally:
        for fd in fds:
            os.close(fd)


def end_descendants(timeout: float = 10.0) -> int:
    """Kill and reap everything below this process, however it got there; return how many were killed.

    In a subreaper, what a killed child leaves behind comes back to us as our child: kill again until none
    is left. Each pass kills the whole tree at once, so a process forking in a loop runs out of parents.
    """
    killed = 0
    for _ in range(100):  # each pass ends a generation; a tree deeper than this is not a task's helpers
        tree = descendants()
        if not tree:
            break
        for pid in tree:
            kill_quietly(pid)
        killed += len(tree)
        _wait_for(child_pids(), timeout)
    return killed


# ---------------------------------------------------------------- cgroup v2


def _own_cgroup() -> Path | None:
    """This process's cgroup v2 folder, where the v2 hierarchy is mounted (unified or hybrid)."""
    try:
        with open("/proc/self/cgroup") as f:
            path = next((line.strip()[3:] for line in f if line.startswith("0::")), None)
        with open("/proc/self/mountinfo") as f:
            mounts = [line.split() for line in f]
    except OSError:
        return None
    if path is None:
        return None
    for fields in mounts:
        dash = fields.index("-") if "-" in fields else -1
        if dash > 0 and fields[dash + 1] == "cgroup2":
            return Path(fields[4]) / path.lstrip("/")
    return None


def join_cgroup(folder: str | None) -> bool:
    """Move this process into ``folder`` (created here): everything it starts from now on is in it."""
    if folder is None:
        return False
    try:
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))
        return True
    except OSError:
        return False  # no cgroup for this process: the subreapers and process groups still hold


def kill_cgroup(folder: str) -> None:
    """Kill every process in ``folder`` (cgroup.kill: Linux 5.14+; else one by one, a few passes)."""
    try:
        with open(os.path.join(folder, "cgroup.kill"), "w") as f:
            f.write("1")
        return
    except FileNotFoundError:
        if not os.path.isdir(folder):
            return
    except OSError:
        pass
    for _ in range(10):
        try:
            with open(os.path.join(folder, "cgroup.procs")) as f:
                pids = [int(p) for p in f.read().split()]
        except OSError:
            return
        if not pids:
            return
        for pid in pids:
            kill_quietly(pid)


def _populated(folder: str) -> bool:
    try:
        with open(os.path.join(folder, "cgroup.events")) as f:
            return any(line.split() == ["populated", "1"] for line in f)
    except OSError:
        return False


def _wait_unpopulated(folder: str, timeout: float) -> None:
    """Until the folder holds no process (the kernel signals cgroup.events with POLLPRI), or ``timeout``."""
    try:
        fd = os.open(os.path.join(folder, "cgroup.events"), os.O_RDONLY)
    except OSError:
        return
    try:
        poller = select.poll()
        poller.register(fd, select.POLLPRI)
        while _populated(folder):
            if not poller.poll(timeout * 1000):
                return
            os.lseek(fd, 0, os.SEEK_SET)
            os.read(fd, 4096)
    finally:
        os.close(fd)


class Cgroups:
    """The supervisor's side: one folder per run, one subfolder per task process, killed when it ends."""

    def __init__(self) -> None:
        self.root: Path | None = None
        self.reason: str | None = None
        self._next = itertools.count(1)
        self._pending: set[str] = set()   # killed, not yet removed (a process was still dying)
        base = _own_cgroup()
        if base is None:
            self.reason = "no cgroup v2 hierarchy is mounted"
            return
        sweep_stale(base)
        root = base / f"fedsup-{os.getpid()}-{next(_folders)}"
        try:
            root.mkdir()
        except OSError as exc:
            self.reason = f"cannot create a cgroup under {base}: {exc.strerror}"
            return
        if not os.access(root / "cgroup.procs", os.W_OK):
            self.reason = f"the cgroup {root} is not writable"
            with contextlib.suppress(OSError):
                root.rmdir()
            return
        self.root = root
        log.debug("task processes are contained in cgroups under %s", root)

    def folder(self) -> str | None:
        """A new folder name for the next task process (the process creates and joins it itself)."""
        if self.root is None:
            return None
        return str(self.root / f"p{next(self._next)}")

    def release(self, folder: str | None) -> None:
        """The process of ``folder`` has ended: kill what is left in it, and remove it."""
        if folder is None:
            return
        kill_cgroup(folder)
        self._pending.add(folder)
        for path in list(self._pending):
            self._remove(path)

    def _remove(self, folder: str) -> None:
        try:
            os.rmdir(folder)
        except FileNotFoundError:
            pass
        except OSError:
            return  # a process is still dying in it: removed at a later release, or at close
        self._pending.discard(folder)

    def close(self, timeout: float = 5.0) -> None:
        """At the end of a run: every folder killed and removed, then the run's own."""
        if self.root is None:
            return
        try:
            entries = list(self.root.iterdir())
        except OSError:
            entries = []
        for entry in entries:
            if entry.is_dir():
                kill_cgroup(str(entry))
                _wait_unpopulated(str(entry), timeout)
                self._remove(str(entry))
        with contextlib.suppress(OSError):
            self.root.rmdir()
        self.root = None


def remove_tree(root: str, timeout: float = 5.0) -> None:
    """Kill everything in a run's cgroup folder and remove it, subfolders first."""
    try:
        folders = [entry.path for entry in os.scandir(root) if entry.is_dir()]
    except OSError:
        return
    _kill_and_remove(folders, timeout)
    with contextlib.suppress(OSError):
        os.rmdir(root)


def remove_cgroups(folders: list[str], root: str | None, timeout: float = 5.0) -> None:
    """A fork server's last act: kill and remove its task processes' folders; when the supervisor is gone
    (``root`` given), the whole run's folder, whatever is left in it."""
    _kill_and_remove(folders, timeout)
    if root is not None:
        remove_tree(root, timeout)


def _kill_and_remove(folders: list[str], timeout: float) -> None:
    """Kill every folder's processes first, all at once, then wait for each to empty and remove it."""
    for folder in folders:
        kill_cgroup(folder)
    for folder in folders:
        _wait_unpopulated(folder, timeout)
        with contextlib.suppress(OSError):
            os.rmdir(folder)


def sweep_stale(base: Path) -> None:
    """Remove the run folders of supervisors that died without removing theirs (a SIGKILL before any fork
    server could clean up)."""
    try:
        entries = [e for e in os.scandir(base) if e.is_dir() and e.name.startswith("fedsup-")]
    except OSError:
        return
    for entry in entries:
        pid = entry.name.split("-")[1]
        if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            remove_tree(entry.path, timeout=1.0)
