"""Which round checkpoints a run keeps: the newest few, for resume; every k-th, for analysis; the first and
the last always.

```
RUN_DIR/checkpoints/initial.pt  final.pt                 always
                    round-N.pt  round-N.strategy.pt      N among the newest ``keep_last`` complete rounds,
                                                         or N a multiple of ``every``
```

A round's files are pruned only after a newer round's line in ``rounds.jsonl`` is on disk (its commit
point), and the model before its strategy state, so that whatever a kill leaves, the newest complete
round's checkpoint is there, and every model kept has its strategy state beside it. A kill in the middle
of pruning leaves files that ``sweep`` removes when the run is resumed.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)
_ROUND_FILE = re.compile(r"^round-(\d+)\.(pt|strategy\.pt)$")
_TEMP_FILE = re.compile(r"^\.round-\d+\.(pt|strategy\.pt)\..*\.tmp$")  # write_atomic's, left by a kill


@dataclass(frozen=True)
class Retention:
    keep_last: int | None = 3  # None: every round
    every: int | None = 50     # None: no periodic checkpoints

    def oldest_resumable(self, done: int) -> int:
        """The oldest round a resume may start from while ``done`` is the newest complete round: the
        checkpoint, strategy state and client states of every round from it to ``done`` are kept."""
        return 1 if self.keep_last is None else max(1, done - self.keep_last + 1)

    def keeps(self, round_: int, done: int) -> bool:
        if round_ > done:
            return False
        return round_ >= self.oldest_resumable(done) or (self.every is not None and round_ % self.every == 0)

    def dropped_by(self, done: int) -> int | None:
        """The round whose checkpoint stops being kept once round ``done`` is committed (one at most)."""
        if self.keep_last is None:
            return None
        old = done - self.keep_last
        return old if old >= 1 and not self.keeps(old, done) else None


def round_files(folder: Path, round_: int) -> tuple[Path, Path]:
    return folder / f"round-{round_}.pt", folder / f"round-{round_}.strategy.pt"


def prune(folder: Path, retention: Retention, done: int) -> None:
    """After round ``done``'s commit line: remove the one round's files that it makes unneeded."""
    old = retention.dropped_by(done)
    if old is not None:
        for path in round_files(folder, old):  # the model first: a model kept always has its strategy state
            path.unlink(missing_ok=True)


def sweep(folder: Path, retention: Retention, done: int) -> None:
    """On resume, once: remove what a kill in the middle of pruning or writing left, and the files of rounds
    after ``done`` (never committed), so that the folder holds what an undisturbed run's would."""
    if not folder.is_dir():
        return
    for entry in os.scandir(folder):
        match = _ROUND_FILE.match(entry.name)
        if (match is not None and not retention.keeps(int(match.group(1)), done)) or _TEMP_FILE.match(entry.name):
            log.info("%s: removed (not kept once round %d is complete)", entry.path, done)
            os.unlink(entry.path)
