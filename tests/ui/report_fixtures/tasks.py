"""Tiny tasks for a real engine run: one that succeeds, one that fails once, one that always fails."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import fedsup


class Sleepy(fedsup.Task):
    """Loads for ``load_s`` and trains for ``train_s`` seconds, then returns a loss."""

    def __init__(self, task_id: str, load_s: float = 0.05, train_s: float = 0.1) -> None:
        super().__init__(task_id)
        self.load_s = load_s
        self.train_s = train_s

    def load(self) -> None:
        time.sleep(self.load_s)

    def train(self, device: str) -> dict[str, Any]:
        time.sleep(self.train_s)
        return {"loss": 0.5}


class FailsOnce(Sleepy):
    """Raises on its first train; the marker file it leaves makes the retry succeed."""

    def __init__(self, task_id: str, marker_dir: str) -> None:
        super().__init__(task_id)
        self.marker = str(Path(marker_dir) / f"{task_id}.tried")

    def train(self, device: str) -> dict[str, Any]:
        time.sleep(self.train_s)
        marker = Path(self.marker)
        if not marker.exists():
            marker.touch()
            raise RuntimeError("first attempt fails on purpose")
        return {"loss": 0.25}


class AlwaysFails(Sleepy):
    """Raises on every train, with a message that needs escaping in HTML."""

    def train(self, device: str) -> dict[str, Any]:
        time.sleep(self.train_s)
        raise ValueError("always <broken> & never fixed")
