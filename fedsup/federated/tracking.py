"""Experiment trackers a run reports to, as configured in ``tracking:`` (optional extras).

    tracking:
      tensorboard: {dir: null}                        # default: <run dir>/tensorboard
      mlflow: {tracking_uri: mlruns, experiment: null}   # a folder, a sqlite file, or a server's URI

TensorBoard gets each round's train and eval metrics and its duration and job counts as scalars at step =
round (``torch.utils.tensorboard``). MLflow gets one run per fedsup run (found again on ``--resume`` by the
run directory it is tagged with), the resolved config as params, the same per-round metrics, and at the end
the HTML report and the final model as artifacts. A ``tracking_uri`` that is a folder holds an MLflow sqlite
store (``mlflow.db``) and its artifacts, since MLflow no longer writes its old file store.

A tracker is never in the way of the run: one that fails (its server gone, its disk full) is a warning and the
run goes on. What it missed is kept and sent, in order, as soon as a call to it succeeds again; what is still
unsent when the run ends is listed in one warning.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

EXTRAS = {"tensorboard": ("tensorboard", "fedsup[tensorboard]"), "mlflow": ("mlflow", "fedsup[mlflow]")}
STATE_FILE = "tracking.json"   # in the run directory: the MLflow run id and the last round each tracker has
RETRY_FIRST, RETRY_MAX = 5.0, 120.0   # s: a failing tracker is asked again after this back-off, doubling
_STORES = threading.Lock()


def missing_extra(name: str) -> str | None:
    """Why tracker ``name`` cannot run here (its package is not installed), or None."""
    module, extra = EXTRAS[name]
    if importlib.util.find_spec(module) is None:
        return f"needs the {module} package, which is not installed: pip install '{extra}'"
    return None


def flatten(data: Any, prefix: str = "") -> dict[str, str]:
    """The resolved config as MLflow params: dotted keys, values as text (cut to MLflow's length limit)."""
    if isinstance(data, dict) and data:
        out: dict[str, str] = {}
        for key, value in data.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): json.dumps(data, default=str)[:6000]}


def round_scalars(result: dict[str, Any]) -> dict[str, float]:
    """What a round's line (rounds.jsonl) gives a tracker: metrics, duration and job counts."""
    out = {f"train/{k}": float(v) for k, v in (result.get("train_metrics") or {}).items()}
    out.update({f"eval/{k}": float(v) for k, v in (result.get("eval_metrics") or {}).items()})
    out["round/duration_s"] = float(result.get("duration") or 0.0)
    out["round/finished"] = float(len(result.get("finished") or []))
    out["round/failed"] = float(len(result.get("failed") or []))
    return out


class _Tracker:
    """One tracker: its calls, each guarded, and what it missed while failing."""

    name = "tracker"

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.backlog: list[tuple[str, Callable[[], None]]] = []
        self.failing = False
        self.retry_at = 0.0       # while failing: not asked again before this (monotonic), so a tracker that
        self.delay = RETRY_FIRST  # is down costs the run one try per back-off, not one per round

    @property
    def last_round(self) -> int:
        """The newest round this tracker has taken, from the run directory (a resumed run catches it up)."""
        return int(_state(self.run_dir).get(f"{self.name}_round", 0))

    def round(self, result: dict[str, Any]) -> None:
        step = int(result["round"])

        def send() -> None:
            self.send_round(result)
            _save_state(self.run_dir, **{f"{self.name}_round": step})
        self.call(f"round {step}", send)

    def send_round(self, result: dict[str, Any]) -> None:
        raise NotImplementedError

    def call(self, what: str, action: Callable[[], None], force: bool = False) -> None:
        """Do ``action`` after whatever the tracker missed, in order; ``force``: try now even while backing off
        (the run's end)."""
        self.backlog.append((what, action))
        if self.failing and not force and time.monotonic() < self.retry_at:
            return
        while self.backlog:
            label, pending = self.backlog[0]
            try:
                pending()
            except Exception as exc:  # noqa: BLE001 - a tracker's failure never ends the run
                if not self.failing:
                    log.warning("%s: %s failed (%s: %s); the run goes on, and what it misses is sent when it "
                                "answers again", self.name, label, type(exc).__name__, exc)
                self.failing = True
                self.retry_at = time.monotonic() + self.delay
                self.delay = min(2 * self.delay, RETRY_MAX)
                return
            self.backlog.pop(0)
            if self.failing:
                log.warning("%s: answering again; sent %s, which it had missed", self.name, label)
                self.failing = bool(self.backlog)
                self.delay = RETRY_FIRST

    def missed(self) -> list[str]:
        return [label for label, _ in self.backlog]


class TensorBoard(_Tracker):
    name = "tensorboard"

    def __init__(self, folder: Path, run_dir: Path) -> None:
        super().__init__(run_dir)
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: steps after the last one it took, written before a kill, are dropped (no duplicates)
        self.writer = SummaryWriter(log_dir=str(folder), purge_step=self.last_round + 1)

    def send_round(self, result: dict[str, Any]) -> None:
        for tag, value in round_scalars(result).items():
            self.writer.add_scalar(tag, value, global_step=int(result["round"]))
        self.writer.flush()

    def end(self, summary: dict[str, Any], report: Path | None) -> None:
        self.call("the end of the run", self.writer.close, force=True)


class Mlflow(_Tracker):
    name = "mlflow"

    def __init__(self, uri: str, experiment: str, run_dir: Path, params: dict[str, str]) -> None:
        super().__init__(run_dir)
        # a server that is gone: one quick try per back-off, not MLflow's minutes of retries per call
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        self.uri, artifacts = store_uri(uri)
        self.client: Any = None
        self.run_id: str | None = None
        self.call("the run's start", lambda: self._start(experiment, artifacts, params))

    def _start(self, experiment: str, artifacts: str | None, params: dict[str, str]) -> None:
        import mlflow
        from mlflow.entities import Param

        with _STORES:  # the runs of a sweep start together: one creates a new sqlite store's tables at a time
            self.client = mlflow.MlflowClient(tracking_uri=self.uri)
            found = self.client.get_experiment_by_name(experiment)
            experiment_id = (found.experiment_id if found is not None
                             else self.client.create_experiment(experiment, artifact_location=artifacts))
        state = _state(self.run_dir)
        self.run_id = state.get("mlflow_run_id") if state.get("mlflow_uri") == self.uri else None
        if self.run_id is not None and self._exists(self.run_id):
            self.client.update_run(self.run_id, status="RUNNING")
            return
        run = self.client.create_run(experiment_id, tags={"fedsup.run_dir": str(self.run_dir)},
                                     run_name=self.run_dir.name)
        items = [Param(k, v) for k, v in params.items()]
        for start in range(0, len(items), 100):  # MLflow takes at most 100 params a batch
            self.client.log_batch(run.info.run_id, params=items[start:start + 100])
        self.run_id = run.info.run_id
        # a new run (or a new store) has taken no round yet: the resumed run's earlier rounds are caught up
        _save_state(self.run_dir, mlflow_run_id=self.run_id, mlflow_uri=self.uri, mlflow_round=0)

    def _exists(self, run_id: str) -> bool:
        try:
            self.client.get_run(run_id)
        except Exception:  # noqa: BLE001 - a run the store does not know: a new one is made
            return False
        return True

    def send_round(self, result: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        assert self.run_id is not None
        step, now = int(result["round"]), int(1000 * float(result.get("ended") or 0))
        metrics = [Metric(k.replace("/", "_"), v, now, step) for k, v in round_scalars(result).items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def end(self, summary: dict[str, Any], report: Path | None) -> None:
        def finish() -> None:
            assert self.run_id is not None
            for path in (report, self.run_dir / "checkpoints" / "final.pt"):
                if path is not None and path.is_file():
                    self.client.log_artifact(self.run_id, str(path))
            status = {"finished": "FINISHED", "interrupted": "KILLED"}.get(summary.get("status", ""), "FAILED")
            self.client.set_terminated(self.run_id, status=status)
        self.call("the report and the final model", finish, force=True)


def store_uri(uri: str) -> tuple[str, str | None]:
    """MLflow's URI for ``tracking_uri``, and where a new experiment keeps its artifacts (None: the server's
    choice). A plain path is a folder: an sqlite store in it, artifacts beside. An sqlite file keeps its
    artifacts in a folder beside it (MLflow's own default would be ./mlruns wherever the run was started)."""
    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///"):])
        return uri, path.with_name(f"{path.stem}-artifacts").resolve().as_uri()
    if "://" in uri:
        return uri, None
    path = Path(uri)
    if path.suffix == ".db":
        path.parent.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{path.resolve()}", path.with_name(f"{path.stem}-artifacts").resolve().as_uri()
    path.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(path / 'mlflow.db').resolve()}", (path / "artifacts").resolve().as_uri()


def _state(run_dir: Path) -> dict[str, Any]:
    try:
        data = json.loads((run_dir / STATE_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _save_state(run_dir: Path, **values: Any) -> None:
    from fedsup.engine.rundir import write_atomic

    write_atomic(run_dir / STATE_FILE, (json.dumps({**_state(run_dir), **values}) + "\n").encode())


class Trackers:
    """The run's trackers, called by the Federation at its start, after each round and at its end.

    ``report``: writes the run's HTML report and returns its path, for MLflow's artifacts (given by the entry
    point, which may draw pages; the federated layer does not)."""

    def __init__(self, config: dict[str, Any] | None, run_dir: Path, name: str, resolved: dict[str, Any] | None,
                 report: Callable[[Path], Path] | None = None) -> None:
        self.trackers: list[Any] = []
        self.run_dir = run_dir
        self.report = report
        if not config:
            return
        board = config.get("tensorboard")
        if board is not None:
            folder = Path(board.get("dir") or run_dir / "tensorboard")
            self.trackers.append(_guarded_start("tensorboard", lambda: TensorBoard(folder, run_dir)))
        flow = config.get("mlflow")
        if flow is not None:
            experiment = flow.get("experiment") or name
            params = flatten(resolved or {})
            uri = os.fspath(flow.get("tracking_uri") or "mlruns")
            self.trackers.append(_guarded_start("mlflow", lambda: Mlflow(uri, experiment, run_dir, params)))
        self.trackers = [t for t in self.trackers if t is not None]

    def catch_up(self, lines: list[dict[str, Any]]) -> None:
        """On resume: the complete rounds a tracker had not taken before the run stopped."""
        for tracker in self.trackers:
            last = tracker.last_round
            for line in lines:
                if int(line.get("round", 0)) > last:
                    tracker.round(line)

    def round(self, result: dict[str, Any]) -> None:
        for tracker in self.trackers:
            tracker.round(result)

    def end(self, summary: dict[str, Any]) -> None:
        if not self.trackers:
            return
        report = None
        if self.report is not None and any(isinstance(t, Mlflow) for t in self.trackers):
            try:
                report = self.report(self.run_dir)
            except Exception as exc:  # noqa: BLE001 - no report is a missing artifact, not a failed run
                log.warning("the run's report could not be written for MLflow: %s", exc)
        for tracker in self.trackers:
            tracker.end(summary, report)
            missed = tracker.missed()
            if missed:
                log.warning("%s never answered again: it missed %s", tracker.name, ", ".join(missed))


def _guarded_start(name: str, start: Callable[[], Any]) -> Any:
    try:
        return start()
    except Exception as exc:  # noqa: BLE001 - a tracker that cannot start is a warning, not a failed run
        log.warning("%s could not start (%s: %s); the run goes on without it", name, type(exc).__name__, exc)
        return None
