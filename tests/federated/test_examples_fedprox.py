"""The FedProx Synthetic(1, 1) example: its generator is deterministic and has the paper's shapes; its config
is accepted both ways (FedProx, and FedAvg with stragglers dropped) and two short rounds of it run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import fedsup
from fedsup import ConfigError
from fedsup.examples.fedprox_synthetic import FedProxSyntheticClient, federation, generate_synthetic
from fedsup.federated.config import load_config

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "fedprox_synthetic.yaml"
FEDAVG = ["federation.proximal_mu=0", "federation.stragglers.mode=drop"]


def test_generator_is_deterministic_with_the_papers_shapes() -> None:
    xs, ys = generate_synthetic(1.0, 1.0, seed=1)
    again_x, again_y = generate_synthetic(1.0, 1.0, seed=1)
    assert len(xs) == len(ys) == 30
    for x, y, x2, y2 in zip(xs, ys, again_x, again_y, strict=True):
        assert x.shape == (len(y), 60) and len(y) >= 50  # lognormal(4, 2) + 50 samples
        assert y.min() >= 0 and y.max() < 10
        np.testing.assert_array_equal(x, x2)
        np.testing.assert_array_equal(y, y2)
    assert len(np.unique(np.concatenate(ys))) == 10
    other_x, _ = generate_synthetic(1.0, 1.0, seed=2)
    assert not np.array_equal(xs[0][:5], other_x[0][:5])


def test_train_test_split_keeps_every_sample_once() -> None:
    xs, _ = generate_synthetic(1.0, 1.0, seed=1)
    parts, merged = federation(1.0, 1.0, 30, 60, 10, 1, 0.9)
    for x, part in zip(xs, parts, strict=True):
        train_x, _, test_x, _ = part
        assert len(train_x) == int(0.9 * len(x)) and len(train_x) + len(test_x) == len(x)
    assert len(merged[0]) == sum(len(p[0]) for p in parts)


def test_a_straggler_runs_its_share_of_the_epochs() -> None:
    client = FedProxSyntheticClient(0, epochs=20)
    for fraction, epochs in [(1.0, 20), (0.5, 10), (0.01, 1), (0.24, 5)]:
        client.work_fraction = fraction
        assert client.local_epochs() == epochs


def test_config_is_accepted_as_fedprox_and_as_fedavg() -> None:
    prox = load_config(CONFIG)
    assert prox.federation.proximal_mu == 1.0 and prox.federation.stragglers.mode == "partial"
    avg = load_config(CONFIG, FEDAVG)
    assert avg.federation.proximal_mu == 0 and avg.federation.stragglers.mode == "drop"
    assert avg.federation.min_clients == 1
    with pytest.raises(ConfigError, match="min_clients"):
        load_config(CONFIG, [*FEDAVG, "federation.min_clients=2"])


@pytest.mark.timeout(60)
@pytest.mark.parametrize("overrides", [[], FEDAVG], ids=["fedprox", "fedavg"])
def test_two_short_rounds_run(tmp_path: Path, overrides: list[str]) -> None:
    small = ["federation.clients=4", "federation.clients_per_round=2", "federation.rounds=2",
             "task.args.epochs=2", "supervisor.max_loaded=4",
             "federation.stragglers.fraction=0.5"]  # one straggler of the two
    summary = fedsup.run(str(CONFIG), overrides=[*small, *overrides], output=tmp_path / "run")
    assert summary["status"] == "finished" and summary["rounds_completed"] == 2
    rows = [json.loads(line) for line in (tmp_path / "run" / "rounds.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    for row in rows:
        assert 0 < row["eval_metrics"]["train_loss"] < 10
        assert 0 <= row["eval_metrics"]["train_accuracy"] <= 1
