"""A task whose module, imported in a fork server started with spawn, makes that server's warm-up report
that it initialised CUDA, as a warm-up can on a CUDA machine: imported by the servers themselves (the
tasks' modules are preloaded), so the stand-in reaches a spawned interpreter, where a test's monkeypatch
does not. Only in a process whose parent's pid is in ``WARMUP_CUDA`` (the test's servers): the test process
imports this module too, and what it forks later must stay as it was."""

from __future__ import annotations

import os
import sys
from typing import Any

import fedsup
from fedsup.engine import launch

WARMUP_CUDA = "FEDSUP_TEST_WARMUP_CUDA"
_warmed = {"done": False}
_warm_torch = launch.warm_torch


def _warm_and_mark() -> None:
    _warm_torch()
    _warmed["done"] = True


if os.environ.get(WARMUP_CUDA) == str(os.getppid()):
    launch.warm_torch = _warm_and_mark
    launch.cuda_problem = lambda: "CUDA initialised in the warm-up" if _warmed["done"] else None


class Reports(fedsup.Task):
    def load(self) -> None:
        self.warmed = "torch._dynamo" in sys.modules

    def train(self, device: str) -> dict[str, Any]:
        return {"ppid": os.getppid(), "warmed": self.warmed}
