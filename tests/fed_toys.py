"""Clients for the federated tests: known tensors, a contract breaker, and a client that says when it trains."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

import fedsup
from fedsup.examples.synthetic import SyntheticClient


class KnownClient(fedsup.Task):
    """Returns ``w`` filled with (round x 100 + client id) and ``num_examples`` = client id + 1."""

    def __init__(self, client_id: int) -> None:
        super().__init__()
        self.client_id = client_id

    def load(self) -> None:
        pass

    def initial_state(self) -> dict[str, Any]:
        return {"w": torch.zeros(4, dtype=torch.float32), "steps": torch.zeros((), dtype=torch.int64)}

    def train(self, device: str) -> dict[str, Any]:
        assert self.global_state is not None and set(self.global_state) == {"w", "steps"}
        value = float(self.round * 100 + self.client_id)
        return {"state": {"w": torch.full((4,), value), "steps": torch.tensor(self.client_id)},
                "num_examples": self.client_id + 1, "seen": float(self.global_state["w"][0])}


class NoStateClient(KnownClient):
    """Breaks the contract: train returns metrics but no state."""

    def train(self, device: str) -> dict[str, Any]:
        return {"loss": 1.0}


class SignallingClient(SyntheticClient):
    """Writes one line to a FIFO the first time client ``signal_client`` trains in round ``signal_round``,
    so a test can act at that exact moment; the marker file makes it happen once across restarts."""

    def __init__(self, client_id: int, fifo: str = "", signal_round: int = 2, signal_client: int = -1,
                 **args: Any) -> None:
        super().__init__(client_id, **args)
        self.fifo, self.signal_round, self.signal_client = fifo, signal_round, signal_client

    def train(self, device: str) -> dict[str, Any]:
        marker = Path(self.fifo + ".done")
        if self.round == self.signal_round and self.client_id == self.signal_client and not marker.exists():
            marker.touch()
            with open(self.fifo, "w") as f:  # blocks until the test reads: the test now holds the moment
                f.write(f"{os.getpid()}\n")
        return super().train(device)


class QuadraticClient(fedsup.Task):
    """Client i's loss is a_i / 2 * ||w - b_i||^2: curvatures differ, so many local steps drift each client
    toward its own b_i, and FedAvg settles away from the global optimum sum(a_i b_i) / sum(a_i). With
    ``scaffold`` the gradient is corrected by the control variates; with ``proximal_mu`` FedProx's term is
    added; ``work_fraction`` cuts the local steps of a straggler."""

    CURVATURES = (0.5, 1.0, 4.0)
    CENTRES = ((-2.0, 1.0), (0.0, 3.0), (3.0, -1.0))

    def __init__(self, client_id: int, steps: int = 10, lr: float = 0.1, scaffold: bool = False,
                 stateful: bool = False, fifo: str = "", signal_round: int = 0, signal_client: int = -1) -> None:
        super().__init__()
        self.client_id, self.steps, self.lr, self.scaffold = client_id, steps, lr, scaffold
        self.stateful = stateful  # keeps a count of its rounds, which slows its steps: a lost count shows
        self.fifo, self.signal_round, self.signal_client = fifo, signal_round, signal_client

    def load(self) -> None:
        self.a = self.CURVATURES[self.client_id % 3]
        self.b = torch.tensor(self.CENTRES[self.client_id % 3], dtype=torch.float64)

    def initial_state(self) -> dict[str, Any]:
        return {"w": torch.zeros(2, dtype=torch.float64)}

    def train(self, device: str) -> dict[str, Any]:
        from fedsup.algorithms import Scaffold, proximal_term

        self._signal()
        model = torch.nn.Module()
        model.w = torch.nn.Parameter(self.global_state["w"].clone())
        helper = Scaffold(self, model) if self.scaffold else None
        seen = int(self.client_state.get("rounds", torch.tensor(0)))
        lr = self.lr / (1 + 0.1 * seen) if self.stateful else self.lr
        optimizer = torch.optim.SGD(model.parameters(), lr=lr)
        for _ in range(max(1, round(self.steps * self.work_fraction))):
            optimizer.zero_grad()
            loss = 0.5 * self.a * ((model.w - self.b) ** 2).sum() + proximal_term(
                model, self.global_state, self.proximal_mu)
            loss.backward()
            if helper is not None:
                helper.correct()
            optimizer.step()
        if helper is not None:
            helper.finish(lr)
        if self.stateful:
            self.client_state = {**self.client_state, "rounds": torch.tensor(seen + 1)}
        return {"state": {"w": model.w.detach().clone()}, "num_examples": 1, "loss": float(loss)}

    def _signal(self) -> None:
        """Like SignallingClient: one line on the FIFO, once, when the chosen client trains in the chosen round."""
        marker = Path(self.fifo + ".done")
        if self.round == self.signal_round and self.client_id == self.signal_client and not marker.exists():
            marker.touch()
            with open(self.fifo, "w") as f:
                f.write(f"{os.getpid()}\n")


class HoldingClient(KnownClient):
    """Client ``hold_client`` of round ``hold_round`` says its pid on the FIFO ``announce`` and then waits until
    the test writes a byte to the FIFO ``go``: the run stays at that moment for as long as the test needs.
    The marker file makes it happen once across restarts."""

    def __init__(self, client_id: int, announce: str = "", go: str = "", hold_round: int = 1,
                 hold_client: int = 0) -> None:
        super().__init__(client_id)
        self.announce, self.go, self.hold_round, self.hold_client = announce, go, hold_round, hold_client

    def train(self, device: str) -> dict[str, Any]:
        if self.go and self.round == self.hold_round and self.client_id == self.hold_client:
            hold_once(self.announce, self.go)
        return super().train(device)


def hold_once(announce: str, go: str) -> None:
    """Say this process's pid on the FIFO ``announce``, then wait for a byte on the FIFO ``go``; once across
    restarts of the run (a marker file beside ``go``), so a resumed run trains on undisturbed."""
    marker = Path(go + ".done")
    if marker.exists():
        return
    marker.touch()
    fd = os.open(go, os.O_RDWR)  # read-write: never EOF, so the read below waits for the test
    try:
        with open(announce, "w") as f:
            f.write(f"{os.getpid()}\n")
        os.read(fd, 1)
    finally:
        os.close(fd)


class BadUpdateClient(KnownClient):
    """Client ``bad_client`` returns an update with one ``flaw`` (``shape``, ``missing``, ``extra``, ``dtype``,
    ``nan``, ``inf``) until the file ``fixed`` exists: its code "fixed" between a run and its resume."""

    def __init__(self, client_id: int, bad_client: int = 1, flaw: str = "shape", fixed: str = "") -> None:
        super().__init__(client_id)
        self.bad_client, self.flaw, self.fixed = bad_client, flaw, fixed

    def train(self, device: str) -> dict[str, Any]:
        result = super().train(device)
        if self.client_id != self.bad_client or (self.fixed and Path(self.fixed).exists()):
            return result
        state = dict(result["state"])
        if self.flaw == "shape":
            state["w"] = torch.zeros(5)
        elif self.flaw == "missing":
            del state["steps"]
        elif self.flaw == "extra":
            state["bias"] = torch.zeros(2)
        elif self.flaw == "dtype":
            state["w"] = state["w"].double()
        elif self.flaw == "nan":
            state["w"] = torch.tensor([1.0, float("nan"), 2.0, 3.0])
        elif self.flaw == "inf":
            state["w"] = torch.tensor([1.0, float("inf"), float("-inf"), 3.0])
        return {**result, "state": state}


class FailingClient(KnownClient):
    """Clients listed in ``failing`` raise in train(): a run that ends short of ``min_clients``."""

    def __init__(self, client_id: int, failing: tuple[int, ...] = (1,), from_round: int = 1) -> None:
        super().__init__(client_id)
        self.failing = tuple(failing)
        self.from_round = from_round

    def train(self, device: str) -> dict[str, Any]:
        if self.client_id in self.failing and self.round >= self.from_round:
            raise ValueError(f"client {self.client_id} always fails")
        return super().train(device)


class TalkingClient(KnownClient):
    """KnownClient whose client ``talker`` prints a line each round it trains: only its task folder (and log)
    should be left in the run directory."""

    def __init__(self, client_id: int, talker: int = 0) -> None:
        super().__init__(client_id)
        self.talker = talker

    def train(self, device: str) -> dict[str, Any]:
        if self.client_id == self.talker:
            print(f"client {self.client_id} trains in round {self.round}", flush=True)
        return super().train(device)


class StragglingClient(SyntheticClient):
    """A synthetic client that, on the first attempt of client ``slow_client``'s job in round ``slow_round``,
    trains ``delay`` seconds longer (its workload): a straggler whose speculative copy is not slow."""

    def __init__(self, client_id: int, marker_dir: str = "", slow_client: int = 0, slow_round: int = 1,
                 delay: float = 0.0, **args: Any) -> None:
        super().__init__(client_id, **args)
        self.marker_dir, self.slow_client, self.slow_round, self.delay = marker_dir, slow_client, slow_round, delay

    def train(self, device: str) -> dict[str, Any]:
        marker = os.path.join(self.marker_dir, f"slow-{self.round}-{self.client_id}")
        if self.client_id == self.slow_client and self.round == self.slow_round and self.delay:
            try:
                os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                import time

                time.sleep(self.delay)  # stands for slow work: the copy started meanwhile does not sleep
            except FileExistsError:
                pass
        return super().train(device)

