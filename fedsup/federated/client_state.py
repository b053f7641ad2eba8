"""What each client keeps across rounds (``self.client_state``), committed with the round it came from.

A client's state reaches its next job in whatever process that job runs, and a ``--resume``, only through
the run directory:

    RUN_DIR/client_state/client-I.round-R.pt     the state client I left after round R (committed)
    RUN_DIR/updates/round-R/client-I.state.pt    what a finished job of round R left (pending)

The worker writes the pending file atomically before it reports the job finished. Just before a round's
line in ``rounds.jsonl`` (its commit point) the pending files of the round's finished clients are renamed
into ``client_state/``; after the line, each such client's older file is removed. A job that failed, or a
round that never reached its line, leaves nothing behind that a later round reads: ``recover`` drops the
files of rounds after the last complete one, and a client's state for round R is always its newest file
from a round before R. One file per client lives on, so the folder holds one entry per client with state.
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
        self.latest: dict[int, int] = {}  # client -> the round of its committed state

    def recover(self, done: int) -> None:
        """Index the committed states. Remove any written for a round after ``done`` (never committed), and
        any older than a client's newest (a kill between a round's commit line and its prune leaves two)."""
        self.latest.clear()
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
            self.latest[client] = max(rounds)
            for stale in rounds:
                if stale != self.latest[client]:
                    self._path(client, stale).unlink(missing_ok=True)

    def committed(self, client: int) -> Path | None:
        round_ = self.latest.get(client)
        return None if round_ is None else self._path(client, round_)

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

    def prune(self, round_: int, clients: list[int]) -> None:
        """After the round's commit line: each moved client's state of an earlier round is no longer needed."""
        for client in clients:
            previous = self.latest.get(client)
            if previous is not None and previous != round_:
                self._path(client, previous).unlink(missing_ok=True)
            self.latest[client] = round_

    def _path(self, client: int, round_: int) -> Path:
        return self.root / f"client-{client}.round-{round_}.pt"
