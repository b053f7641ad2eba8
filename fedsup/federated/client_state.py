"""What each client keeps across rounds (``self.client_state``), committed with the round it came from.

A client's state reaches its next job in whatever process that job runs, and a ``--resume``, only through
the run directory:

    RUN_DIR/client_state/client-I.round-R.pt     the state client I left after round R (committed)
    RUN_DIR/updates/round-R/client-I.state.pt    what a finished job of round R left (pending)

The worker writes the pending file atomically before it reports the job finished. Just before a round's
line in ``rounds.jsonl`` (its commit point) the pending files of the round's finished clients are renamed
into ``client_state/``; after the line, each such client's files that no resumable round needs any more are
removed. A resume may start from any of the newest ``checkpoints.keep_last`` complete rounds (from the
oldest of them, ``oldest``), and a client's state for round R is its newest file from a round before R: so
a client keeps its newest file from round ``oldest`` or before, and every newer one, at most ``keep_last``
+ 1 files (one with ``keep_last: 1``). A job that failed, or a round that never reached its line, leaves
nothing behind that a later round reads: ``recover`` drops the files of rounds after the one resumed from.
Nothing here loops over all clients: a client's files are pruned when it trains again.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

_NAME = re.compile(r"^client-(\d+)\.round-(\d+)\.pt$")


class ClientStates:
    """The committed client states of one run directory, indexed once at start-up."""

    def __init__(self, run_dir: Path) -> None:
        self.root = run_dir / "client_state"
        self.kept: dict[int, list[int]] = {}  # client -> the rounds of its committed states, oldest first

    def recover(self, done: int, oldest: int | None = None) -> None:
        """Index the committed states of a run resumed from round ``done`` whose oldest resumable round is now
        ``oldest`` (default ``done``). Remove any written for a round after ``done`` (never committed, or
        given up by the resume), and any that no round from ``oldest`` on needs (a kill between a round's
        commit line and its prune leaves them)."""
        self.kept.clear()
        if not self.root.is_dir():
            return
        found: dict[int, list[int]] = {}
        for entry in os.scandir(self.root):
            match = _NAME.match(entry.name)
            if match is None:
                continue
            client, round_ = int(match.group(1)), int(match.group(2))
            if round_ > done:
                os.unlink(entry.path)
            else:
                found.setdefault(client, []).append(round_)
        for client, rounds in found.items():
            self.kept[client] = sorted(rounds)
            self._drop_unneeded(client, done if oldest is None else oldest)

    def committed(self, client: int) -> Path | None:
        rounds = self.kept.get(client)
        return None if not rounds else self._path(client, rounds[-1])

    @staticmethod
    def pending(update_dir: Path, client: int) -> Path:
        return update_dir / f"client-{client}.state.pt"

    def commit(self, round_: int, update_dir: Path, clients: list[int]) -> list[int]:
        """Move the round's pending states into place (before the round's commit line); return whose moved."""
        moved = []
        for client in clients:
            pending = self.pending(update_dir, client)
            if pending.exists():
                self.root.mkdir(exist_ok=True)
                os.replace(pending, self._path(client, round_))
                moved.append(client)
        return moved

    def prune(self, round_: int, clients: list[int], oldest: int | None = None) -> None:
        """After the round's commit line: each moved client's states that no round from ``oldest`` (default
        ``round_``: only the newest is kept) to ``round_`` needs are removed."""
        for client in clients:
            rounds = self.kept.setdefault(client, [])
            if not rounds or rounds[-1] != round_:
                rounds.append(round_)
            self._drop_unneeded(client, round_ if oldest is None else oldest)

    def _drop_unneeded(self, client: int, oldest: int) -> None:
        """Keep the client's newest state from round ``oldest`` or before, and every newer one."""
        rounds = self.kept[client]
        base = max((r for r in rounds if r <= oldest), default=None)
        while rounds and base is not None and rounds[0] < base:
            self._path(client, rounds.pop(0)).unlink(missing_ok=True)

    def _path(self, client: int, round_: int) -> Path:
        return self.root / f"client-{client}.round-{round_}.pt"
