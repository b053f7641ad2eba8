"""Experiment tracking (``tracking:``): TensorBoard event files and an MLflow store, read back with their own
readers; a tracker that fails mid-run costs the run nothing and gets what it missed when it answers again."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest

import fedsup
from fedsup.federated import tracking
from fedsup.federated.config import load_config

ROUNDS = 3


def config(tmp_path: Path, tracking_section: dict[str, Any]) -> dict[str, Any]:
    return {"name": "tracked", "seed": 1,
            "task": {"class": "fedsup.examples.synthetic:SyntheticClient",
                     "args": {"samples": 200, "test_samples": 100, "features": 8, "hidden": 16, "lr": 0.05}},
            "federation": {"clients": 4, "rounds": ROUNDS, "clients_per_round": 2},
            "supervisor": {"devices": "cpu", "max_retries": 0},
            "tracking": tracking_section, "output": str(tmp_path / "run")}


def rounds(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "rounds.jsonl").read_text().splitlines()]


@pytest.mark.timeout(180)
def test_tensorboard_event_files_hold_every_round(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    fedsup.run(config(tmp_path, {"tensorboard": {}}))
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    lines = rounds(tmp_path / "run")
    for tag, key, name in (("train/accuracy", "train_metrics", "accuracy"), ("eval/loss", "eval_metrics", "loss")):
        got = [(e.step, e.value) for e in events.Scalars(tag)]
        assert got == [(r["round"], pytest.approx(r[key][name], rel=1e-6)) for r in lines], tag
    assert [e.step for e in events.Scalars("round/duration_s")] == [1, 2, 3]


@pytest.mark.timeout(180)
@pytest.mark.parametrize("where", ["store.db", "folder"])
def test_mlflow_store_holds_params_metrics_and_artifacts(tmp_path: Path, where: str,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("mlflow")
    import mlflow

    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)  # nothing may land where the run was started (MLflow's default ./mlruns)
    from fedsup.ui.report import write_report

    fedsup.run(config(tmp_path, {"mlflow": {"tracking_uri": str(tmp_path / where), "experiment": "exp"}}),
               report=write_report)
    assert list(cwd.iterdir()) == []
    uri, _ = tracking.store_uri(str(tmp_path / where))
    client = mlflow.MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("exp").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["fedsup.run_dir"] == str((tmp_path / "run").resolve())
    assert run.data.params["task.args.lr"] == "0.05" and run.data.params["federation.rounds"] == "3"
    lines = rounds(tmp_path / "run")
    history = client.get_metric_history(run.info.run_id, "eval_accuracy")
    assert [(m.step, m.value) for m in history] == [(r["round"], pytest.approx(r["eval_metrics"]["accuracy"]))
                                                    for r in lines]
    assert len(client.get_metric_history(run.info.run_id, "round_duration_s")) == ROUNDS
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"report.html", "final.pt"} <= artifacts


@pytest.mark.timeout(180)
def test_a_tracker_that_fails_mid_run_gets_what_it_missed_when_it_answers_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    pytest.importorskip("mlflow")
    import mlflow

    sent = tracking.Mlflow.send_round
    down = {"round": 2}

    def flaky(self: tracking.Mlflow, result: dict[str, Any]) -> None:
        if result["round"] == down["round"]:
            down["round"] = -1  # back after this one failure
            raise ConnectionError("the tracking server went away")
        sent(self, result)

    monkeypatch.setattr(tracking.Mlflow, "send_round", flaky)
    caplog.set_level(logging.WARNING, logger="fedsup.federated.tracking")
    summary = fedsup.run(config(tmp_path, {"mlflow": {"tracking_uri": str(tmp_path / "m.db")}}))
    assert summary["status"] == "finished"
    messages = " ".join(caplog.messages)
    assert "round 2 failed (ConnectionError: the tracking server went away); the run goes on" in messages
    assert "answering again; sent round 2" in messages
    client = mlflow.MlflowClient(tracking_uri=tracking.store_uri(str(tmp_path / "m.db"))[0])
    (run,) = client.search_runs([client.get_experiment_by_name("tracked").experiment_id])
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "train_accuracy")) == [1, 2, 3]


def test_a_tracker_whose_package_is_missing_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(fedsup.ConfigError, match=r"tracking\.mlflow: needs the mlflow package, which is not "
                                                 r"installed: pip install 'fedsup\[mlflow\]'"):
        load_config(config(tmp_path, {"mlflow": {}}))
