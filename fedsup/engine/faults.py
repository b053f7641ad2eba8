"""Fault injection: make tasks fail on purpose, reproducibly, to test that a run recovers.

The supervisor decides, from the seed, the task and the attempt, whether a phase fails and how; the child
stages the failure for real (a raised exception, ``os._exit``, a self-SIGKILL, a CUDA OOM, a hang). At most
``max_per_task`` faults land on one task, so injection alone never spends a task's retries.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from fedsup.engine.messages import Fault
from fedsup.engine.records import Phase

FAULT_KINDS: tuple[Fault, ...] = ("exception", "exit", "sigkill", "cuda_oom", "hang")


@dataclass(frozen=True)
class FaultPlan:
    """Inject a fault with ``probability`` per phase, chosen from ``kinds``, seeded by ``seed``.

    ``hang`` only ends through a phase timeout: leave it out unless ``load_timeout``/``train_timeout`` are set.
    """

    probability: float = 0.1
    seed: int = 0
    kinds: tuple[Fault, ...] = ("exception", "exit", "sigkill", "cuda_oom")
    phases: tuple[Phase, ...] = ("load", "train")
    max_per_task: int = 1

    def __post_init__(self) -> None:
        if not 0.0 <= self.probability <= 1.0:
            raise ValueError(f"faults.probability: expected a number from 0 to 1, got {self.probability!r}")
        unknown = [k for k in self.kinds if k not in FAULT_KINDS]
        if unknown or not self.kinds:
            raise ValueError(f"faults.kinds: expected some of {list(FAULT_KINDS)}, got {list(self.kinds)!r}")
        bad_phases = [p for p in self.phases if p not in ("load", "train")]
        if bad_phases:
            raise ValueError(f"faults.phases: expected 'load' and/or 'train', got {list(self.phases)!r}")
        if self.max_per_task < 0:
            raise ValueError(f"faults.max_per_task: expected a whole number >= 0, got {self.max_per_task!r}")

    def pick(self, task_id: str, attempt: int, phase: Phase, injected_so_far: int, round_: int = 0) -> Fault | None:
        """The fault for this phase of this attempt, or None. The same inputs always give the same answer."""
        if phase not in self.phases or injected_so_far >= self.max_per_task:
            return None
        rng = random.Random(f"{self.seed}:{task_id}:{round_}:{attempt}:{phase}")
        if rng.random() >= self.probability:
            return None
        return rng.choice(self.kinds)
