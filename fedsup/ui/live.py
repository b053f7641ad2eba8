"""What the CLI shows while a federated run goes: a live panel on a terminal, plain log lines elsewhere.

This is rendering, so it lives beside the CLI: the core only reports events and keeps its state readable.
The panel is redrawn by rich's refresh thread, which starts only once the run's fork server exists.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from fedsup.engine.records import superseded
from fedsup.engine.states import TaskStatus
from fedsup.engine.units import format_bytes
from fedsup.federated.rounds import Federation

log = logging.getLogger("fedsup.run")


def _fmt_metrics(metrics: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, (int, float))) or "-"


def _heterogeneity(event: dict[str, Any]) -> str:
    """The round's stragglers and dropouts, where there were any: counts, or the lists of a finished round."""
    counts = [(len(v) if isinstance(v, (list, dict)) else int(v or 0), label) for v, label in (
        (event.get("stragglers"), "straggling"), (event.get("dropped"), "dropped as stragglers"),
        (event.get("dropped_out"), "dropped out"))]
    return "".join(f", {n} {label}" for n, label in counts if n)


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{seconds:.1f}s"


class LiveView:
    def __init__(self, console: Console) -> None:
        self.console = console
        self.federation: Federation | None = None
        self.live: Live | None = None
        self.started = time.monotonic()
        self.last_round: dict[str, Any] | None = None
        self.this_round: dict[str, Any] = {}

    def attach(self, federation: Federation) -> None:
        self.federation = federation

    def on_event(self, event: dict[str, Any]) -> None:
        kind = event.get("event")
        if kind == "run_started" and self.console.is_terminal:
            self.live = Live(get_renderable=self.render, console=self.console, refresh_per_second=4)
            self.live.start()
        elif kind == "round_started":
            self.this_round = event
        elif kind == "round_finished":
            self.last_round = event
            line = (f"round {event['round']}/{self.federation.spec.rounds if self.federation else '?'}: "
                    f"{len(event['finished'])} finished, {len(event['failed'])} failed, "
                    f"{len(event['retried'])} retried{_heterogeneity(event)} in {event['duration']:.1f}s; "
                    f"train {_fmt_metrics(event['train_metrics'])}; eval {_fmt_metrics(event['eval_metrics'])}")
            if self.live is not None:
                self.live.console.print(line, highlight=False)  # print, not log: log adds the caller's file:line
            else:
                log.warning(line) if event["failed"] else log.info(line)

    def stop(self) -> None:
        if self.live is not None:
            self.live.stop()
            self.live = None

    def render(self) -> Group:
        try:
            return self._render()
        except RuntimeError:  # the scheduler changed a dict under us; the next refresh will do
            return Group(Text("…"))

    def _render(self) -> Group:
        fed = self.federation
        if fed is None:
            return Group(Text("starting…"))
        # on Ray the supervisor has no scheduler of its own: the backend's driver knows the jobs and nodes
        driver = getattr(getattr(fed.supervisor, "backend", None), "driver", None)
        if driver is not None:
            return self._render_cluster(fed, driver)
        if fed.supervisor.scheduler is None:
            return Group(Text("starting…"))
        scheduler = fed.supervisor.scheduler
        head = self._head(fed)
        current = [h for h in list(scheduler.handles) if h.task_id.startswith(f"round-{fed.round}.")]
        retries = sum(max(0, len(h.history) - superseded(h.history) - 1) for h in current)
        devices = Table("device", "reserved", "used", "training", box=None, pad_edge=False)
        inventory = scheduler.inventory
        for gpu in inventory.gpus:
            reserved = sum(list(gpu.reservations.values()))
            free = inventory.probe.free(gpu.index) if inventory.probe and gpu.index is not None else None
            used = format_bytes(gpu.total - free) if free is not None else "-"
            devices.add_row(gpu.name, f"{format_bytes(reserved)} / {format_bytes(gpu.total)}", used,
                            str(len(gpu.reservations)))
        devices.add_row("cpu", f"{inventory.cpu.used_cores}/{inventory.cpu.cores} cores", "-",
                        str(scheduler.training))
        retried = Text(f"retries this round: {retries}{_heterogeneity(self.this_round)}   "
                       f"processes: {len(scheduler.procs)}")
        parts: list[Any] = [head, job_counts(current), retried, devices]
        return Group(*self._with_last_round(parts))

    def _head(self, fed: Federation) -> Text:
        elapsed = time.monotonic() - self.started
        done = fed.completed
        eta = (elapsed / done * (fed.spec.rounds - done)) if done else None
        return Text.assemble(
            ("fedsup ", "bold"), (fed.spec.name, "bold cyan"),
            f"   round {fed.round}/{fed.spec.rounds}   elapsed {_duration(elapsed)}",
            f"   ETA {_duration(eta)}" if eta is not None else "",
        )

    def _with_last_round(self, parts: list[Any]) -> list[Any]:
        if self.last_round is not None:
            parts.append(Text(f"last round: eval {_fmt_metrics(self.last_round['eval_metrics'])}", style="green"))
        return parts

    def _render_cluster(self, fed: Federation, driver: Any) -> Group:
        """The panel of a run on a Ray cluster (``fedsup.cluster.driver.Driver``): the round's jobs per state as
        the driver knows them, and a line of nodes with their jobs under way out of their job slots."""
        prefix = f"round-{fed.round}."
        current = [(task, _status(state)) for task, state in driver.jobs() if task.startswith(prefix)]
        nodes = driver.nodes()
        line = Text("nodes: ")
        line.append(", ".join(f"{n['node']} {n['jobs']}/{n['slots']}" for n in nodes) or "none yet")
        processes = sum(int(n.get("processes") or 0) for n in nodes)
        line.append(f"   processes: {processes}")
        lost = len(getattr(driver, "gone", ()))
        if lost:
            line.append(f"   nodes lost: {lost}", style="red")
        parts: list[Any] = [self._head(fed), count_table(current), line]
        return Group(*self._with_last_round(parts))


def _status(state: str) -> TaskStatus:
    """A job's state as a node reported it; INIT for one this version does not know (a newer agent's)."""
    try:
        return TaskStatus(state)
    except ValueError:
        return TaskStatus.INIT


def job_counts(handles: list[Any]) -> Table:
    """The round's jobs in each state, a row for its train jobs and one for its evaluate jobs (task ids
    ``round-R.client-I`` and ``round-R.client-I.evaluate``)."""
    return count_table([(handle.task_id, handle.status) for handle in handles])


def count_table(jobs: list[tuple[str, TaskStatus]]) -> Table:
    """``job_counts`` for (task id, state) pairs: what a cluster's driver gives, which has no handles."""
    kinds = {"train jobs": Counter[TaskStatus](), "evaluate jobs": Counter[TaskStatus]()}
    for task_id, status in jobs:
        kinds["evaluate jobs" if task_id.endswith(".evaluate") else "train jobs"][status] += 1
    shown = [s for s in TaskStatus if any(counts.get(s) for counts in kinds.values())]
    table = Table.grid(padding=(0, 2))
    table.add_row("", *[Text(s.value, style=_STYLE.get(s, "")) for s in shown])
    for label, counts in kinds.items():
        if sum(counts.values()):
            table.add_row(label, *[str(counts[s]) if counts[s] else "-" for s in shown])
    return table


_STYLE = {TaskStatus.TRAINING: "yellow", TaskStatus.FINISHED: "green", TaskStatus.FAILED: "bold red",
          TaskStatus.EXCEPTION: "red", TaskStatus.CRASHED: "red", TaskStatus.TIMEOUT: "red",
          TaskStatus.INTERRUPT: "magenta", TaskStatus.LOADING: "blue", TaskStatus.WAITING: "cyan"}


class SweepView:
    """A sweep as it goes: on a terminal a live panel (runs done, running and queued, each running run's
    round); elsewhere a log line per finished round. Its events come from the runs' threads."""

    def __init__(self, console: Console, runs: list[str]) -> None:
        self.console = console
        self.lock = threading.Lock()
        self.state: dict[str, tuple[str, int, int]] = {name: ("queued", 0, 0) for name in runs}
        self.started = time.monotonic()
        self.live: Live | None = None
        if console.is_terminal:
            self.live = Live(get_renderable=self.render, console=console, refresh_per_second=4)
            self.live.start()

    def on_event(self, outcome: Any, event: dict[str, Any]) -> None:
        name, kind = outcome.run.name, event.get("event")
        with self.lock:
            _, done, rounds = self.state.get(name, ("queued", 0, outcome.rounds))
            if kind == "run_started":
                self.state[name] = ("running", int(event.get("from_round", 1)) - 1, outcome.rounds)
            elif kind == "round_finished":
                done = int(event.get("round") or done)
                self.state[name] = ("done" if done >= outcome.rounds else "running", done, outcome.rounds)
            else:
                return
            counts = Counter(status for status, _, _ in self.state.values())
        if kind == "round_finished":
            line = (f"{name}: round {done}/{outcome.rounds} in {float(event.get('duration', 0)):.1f}s; eval "
                    f"{_fmt_metrics(event.get('eval_metrics') or {})}; runs {counts['done']} done, "
                    f"{counts['running']} running, {counts['queued']} queued")
            if self.live is not None:
                self.live.console.print(line, highlight=False)
            else:
                logging.getLogger("fedsup.sweep").info(line)

    def stop(self) -> None:
        if self.live is not None:
            self.live.stop()
            self.live = None

    def render(self) -> Group:
        with self.lock:
            state = dict(self.state)
        counts = Counter(status for status, _, _ in state.values())
        head = Text(f"fedsup sweep: {counts['done']} done, {counts['running']} running, {counts['queued']} queued "
                    f"of {len(state)} runs   {_duration(time.monotonic() - self.started)}", style="bold")
        table = Table(box=None, show_header=False, pad_edge=False)
        for name, (status, done, rounds) in state.items():
            if status == "running":
                table.add_row(name, f"round {done + 1}/{rounds}" if done < rounds else "finishing")
        return Group(head, table)
