"""The public API where README.md documents it: the names at the top, the paths that stay importable,
the ``fedsup`` command, and the ``module:Class`` strings of the bundled configs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fedsup

ROOT = Path(__file__).resolve().parent.parent


def test_the_documented_names_are_exported_from_fedsup() -> None:
    for name in ("Task", "Supervisor", "run", "TaskStatus", "FaultPlan", "TaskRecord", "Strategy", "ClientUpdate",
                 "make_strategy", "ConfigError", "TaskFailed", "RunInterrupted"):
        assert hasattr(fedsup, name) and name in fedsup.__all__, name


def test_the_documented_module_paths_stay_importable_with_the_same_objects() -> None:
    import fedsup.aggregation
    import fedsup.config
    import fedsup.partition
    from fedsup.federated import config, partition, strategies

    assert fedsup.aggregation.Strategy is fedsup.Strategy is strategies.Strategy
    assert fedsup.aggregation.ClientUpdate is fedsup.ClientUpdate
    assert fedsup.aggregation.make_strategy is fedsup.make_strategy
    assert fedsup.aggregation.FedAvg is strategies.FedAvg
    assert fedsup.partition.dirichlet is partition.dirichlet
    assert fedsup.config.json_schema() == config.json_schema()


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_the_bundled_configs_resolve_their_classes(path: Path) -> None:
    if "digits" in path.name:
        pytest.importorskip("sklearn")
    config = fedsup.config.load_config(path)  # imports task.class and a custom strategy
    assert config.task.class_


class Halfway(fedsup.Strategy):
    """The README's custom strategy, as written there."""

    name = "halfway"

    def __init__(self, weight: float = 0.5) -> None:
        self.weight = weight

    def aggregate(self, global_state, updates):  # type: ignore[no-untyped-def]
        mean = fedsup.make_strategy("fedavg").aggregate(global_state, updates)
        return {k: (1 - self.weight) * global_state[k] + self.weight * mean[k] for k in global_state}


def test_the_readme_strategy_works_through_make_strategy() -> None:
    strategy = fedsup.make_strategy(f"{__name__}:Halfway", {"weight": 0.25})
    updates = [fedsup.ClientUpdate(0, {"w": torch.tensor([4.0])}, 1),
               fedsup.ClientUpdate(1, {"w": torch.tensor([8.0])}, 3)]
    assert strategy.aggregate({"w": torch.tensor([0.0])}, updates)["w"].item() == 0.25 * 7.0


def test_the_fedsup_command_and_python_m_fedsup_run() -> None:
    script = str(Path(sys.executable).parent / "fedsup")
    for command in ([script, "--help"], [sys.executable, "-m", "fedsup", "--help"]):
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and "validate" in done.stdout, done.stderr
