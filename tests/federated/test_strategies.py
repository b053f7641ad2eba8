"""fedsup.federated.strategies: FedAvg is the exact weighted mean in any arrival order; median and trimmed mean are
right on hand-computed cases; dtypes survive; integer tensors take the max; bad updates are named."""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsup.engine.errors import ConfigError
from fedsup.federated.registry import make_strategy
from fedsup.federated.strategies import (
    ClientUpdate,
    FedAvg,
    FedMedian,
    State,
    Strategy,
    TrimmedMean,
    weighted_metrics,
)

ALL_STRATEGIES = [FedAvg(), FedMedian(), TrimmedMean(0.2)]


class MyStrategy(Strategy):
    """A custom strategy for make_strategy("module:Class"): every tensor becomes ``fill``."""

    name = "fill"

    def __init__(self, fill: float = 0.0) -> None:
        self.fill = fill

    def aggregate(self, global_state: State, updates: Sequence[ClientUpdate]) -> State:
        return {key: torch.full_like(value, self.fill) for key, value in global_state.items()}


class NotAStrategy:
    pass


def column(values: list[float], dtype: torch.dtype = torch.float64) -> list[ClientUpdate]:
    """One update per value, each a state {"w": tensor([value])}, client ids 0.. and one example each."""
    return [ClientUpdate(i, {"w": torch.tensor([v], dtype=dtype)}, 1) for i, v in enumerate(values)]


def random_updates(dtype: torch.dtype, count: int = 5, seed: int = 0) -> tuple[State, list[ClientUpdate]]:
    generator = torch.Generator().manual_seed(seed)
    shapes = {"conv.weight": (4, 3, 3, 3), "conv.bias": (4,), "fc.weight": (10, 36), "scale": ()}
    global_state = {key: torch.zeros(shape, dtype=dtype) for key, shape in shapes.items()}
    updates = [
        ClientUpdate(
            client_id=10 * (i + 1),
            state={key: (torch.randn(shape, generator=generator) * 3).to(dtype) for key, shape in shapes.items()},
            num_examples=[7, 100, 1, 33, 64, 5, 12][i % 7],
        )
        for i in range(count)
    ]
    return global_state, updates


def numpy_weighted_mean(updates: Sequence[ClientUpdate], key: str) -> np.ndarray:
    """The reference: in client_id order, sum x * n in float64, then divide by the total."""
    ordered = sorted(updates, key=lambda u: u.client_id)
    total = np.zeros(ordered[0].state[key].shape, dtype=np.float64)
    for update in ordered:
        total = total + update.state[key].to(torch.float64).numpy() * update.num_examples
    return np.asarray(total / sum(u.num_examples for u in ordered))


# FedAvg


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_fedavg_is_exactly_the_weighted_mean_computed_in_float64(dtype: torch.dtype) -> None:
    global_state, updates = random_updates(dtype)
    result = FedAvg().aggregate(global_state, updates)
    assert list(result) == list(global_state)
    for key, tensor in result.items():
        expected = torch.from_numpy(numpy_weighted_mean(updates, key)).to(dtype)
        assert tensor.dtype == dtype
        assert tensor.shape == global_state[key].shape
        assert torch.equal(tensor, expected), key


def test_fedavg_is_bit_identical_whatever_order_the_updates_arrive_in() -> None:
    global_state, updates = random_updates(torch.float64, count=6)
    first = FedAvg().aggregate(global_state, updates)
    shuffler = random.Random(0)
    for _ in range(20):
        shuffled = updates[:]
        shuffler.shuffle(shuffled)
        again = FedAvg().aggregate(global_state, shuffled)
        assert all(torch.equal(again[key], first[key]) for key in first)


def test_fedavg_sums_in_client_id_order_where_float_addition_is_not_associative() -> None:
    # In client_id order (1e16 + 1) - 1e16 == 0.0; in the order 1e16, -1e16, 1 it would be 1.0.
    values = {0: 1e16, 1: 1.0, 2: -1e16}
    for order in itertools.permutations(values):
        updates = [ClientUpdate(cid, {"w": torch.tensor([values[cid]], dtype=torch.float64)}, 1) for cid in order]
        result = FedAvg().aggregate({"w": torch.zeros(1, dtype=torch.float64)}, updates)
        assert result["w"].item() == 0.0


def test_fedavg_weights_by_num_examples() -> None:
    updates = [
        ClientUpdate(0, {"w": torch.tensor([0.0, 4.0])}, 1),
        ClientUpdate(1, {"w": torch.tensor([8.0, 0.0])}, 3),
    ]
    result = FedAvg().aggregate({"w": torch.zeros(2)}, updates)
    assert result["w"].tolist() == [6.0, 1.0]


def test_fedavg_of_identical_float32_states_is_that_state_bit_for_bit() -> None:
    # x * n and their sums are exact in float64 for float32 x and modest n, so the mean is x again.
    state = {"w": torch.randn(1000, generator=torch.Generator().manual_seed(3))}
    updates = [ClientUpdate(i, {"w": state["w"].clone()}, n) for i, n in enumerate([3, 17, 1, 250])]
    assert torch.equal(FedAvg().aggregate(state, updates)["w"], state["w"])


# Median


def test_median_of_an_odd_count_is_the_middle_value_per_coordinate() -> None:
    updates = [
        ClientUpdate(0, {"w": torch.tensor([1.0, 9.0, 2.0])}, 1),
        ClientUpdate(1, {"w": torch.tensor([5.0, -3.0, 2.0])}, 1000),
        ClientUpdate(2, {"w": torch.tensor([3.0, 4.0, 7.0])}, 1),
    ]
    result = FedMedian().aggregate({"w": torch.zeros(3)}, updates)
    assert result["w"].tolist() == [3.0, 4.0, 2.0]  # the last coordinate is a tie; weights play no part


def test_median_of_an_even_count_averages_the_two_middle_values() -> None:
    result = FedMedian().aggregate({"w": torch.zeros(1)}, column([20.0, 1.0, 10.0, 2.0], torch.float32))
    assert result["w"].tolist() == [6.0]
    result = FedMedian().aggregate({"w": torch.zeros(1)}, column([4.0, 4.0, 1.0, 9.0], torch.float32))
    assert result["w"].tolist() == [4.0]


@pytest.mark.parametrize("count", [1, 2, 5, 8])
def test_median_matches_numpy_median(count: int) -> None:
    global_state, updates = random_updates(torch.float64, count=count, seed=count)
    result = FedMedian().aggregate(global_state, updates)
    for key, tensor in result.items():
        stacked = np.stack([u.state[key].numpy() for u in updates])
        assert np.array_equal(tensor.numpy(), np.median(stacked, axis=0)), key


# Trimmed mean


def test_trimmed_mean_drops_the_outliers_at_both_ends() -> None:
    updates = column([1000.0, 2.0, 3.0, -1000.0, 4.0])
    result = TrimmedMean(beta=0.2).aggregate({"w": torch.zeros(1, dtype=torch.float64)}, updates)
    assert result["w"].tolist() == [3.0]


def test_trimmed_mean_trims_floor_of_beta_times_n_per_coordinate() -> None:
    updates = [
        ClientUpdate(0, {"w": torch.tensor([1.0, 50.0])}, 1),
        ClientUpdate(1, {"w": torch.tensor([2.0, 10.0])}, 1),
        ClientUpdate(2, {"w": torch.tensor([3.0, 20.0])}, 1),
        ClientUpdate(3, {"w": torch.tensor([100.0, 10.0])}, 1),
    ]
    global_state = {"w": torch.zeros(2)}
    assert TrimmedMean(beta=0.25).aggregate(global_state, updates)["w"].tolist() == [2.5, 15.0]  # one each end
    assert TrimmedMean(beta=0.2).aggregate(global_state, updates)["w"].tolist() == [26.5, 22.5]  # floor(0.8) = 0
    assert TrimmedMean(beta=0.0).aggregate(global_state, updates)["w"].tolist() == [26.5, 22.5]


def test_trimmed_mean_with_ties_and_an_odd_count() -> None:
    result = TrimmedMean(beta=0.4).aggregate({"w": torch.zeros(1)}, column([5.0, 5.0, 1.0, 5.0, 9.0], torch.float32))
    assert result["w"].tolist() == [5.0]  # trims two each end: the middle 5 stays


def test_trimmed_mean_is_unweighted() -> None:
    updates = [ClientUpdate(i, {"w": torch.tensor([v])}, n) for i, (v, n) in enumerate([(1.0, 1), (3.0, 99)])]
    assert TrimmedMean(beta=0.0).aggregate({"w": torch.zeros(1)}, updates)["w"].tolist() == [2.0]


@pytest.mark.parametrize("beta", [-0.1, 0.5, 1.0, float("nan"), True, "0.1", None])
def test_trimmed_mean_rejects_beta_outside_zero_to_a_half(beta: object) -> None:
    with pytest.raises(ConfigError, match=r"beta: must be a number in \[0, 0.5\), got"):
        TrimmedMean(beta)  # type: ignore[arg-type]


# dtypes and integer tensors


@pytest.mark.parametrize("strategy", ALL_STRATEGIES, ids=repr)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_every_strategy_keeps_float_dtypes(strategy: Strategy, dtype: torch.dtype) -> None:
    global_state, updates = random_updates(dtype)
    result = strategy.aggregate(global_state, updates)
    assert {key: t.dtype for key, t in result.items()} == {key: dtype for key in global_state}


@pytest.mark.parametrize("strategy", ALL_STRATEGIES, ids=repr)
def test_integer_and_bool_tensors_take_the_elementwise_max(strategy: Strategy) -> None:
    global_state = {
        "bn.num_batches_tracked": torch.tensor(100, dtype=torch.int64),
        "mask": torch.zeros(3, dtype=torch.bool),
        "codes": torch.zeros(2, dtype=torch.int32),
    }
    states = [
        {"bn.num_batches_tracked": 105, "mask": [True, False, False], "codes": [3, -7]},
        {"bn.num_batches_tracked": 112, "mask": [False, False, False], "codes": [1, 2]},
        {"bn.num_batches_tracked": 108, "mask": [False, True, False], "codes": [-5, 0]},
    ]
    updates = [
        ClientUpdate(i, {k: torch.tensor(v, dtype=global_state[k].dtype) for k, v in s.items()}, 10 * (i + 1))
        for i, s in enumerate(states)
    ]
    result = strategy.aggregate(global_state, updates)
    assert result["bn.num_batches_tracked"].dtype == torch.int64
    assert result["bn.num_batches_tracked"].item() == 112
    assert result["mask"].dtype == torch.bool and result["mask"].tolist() == [True, True, False]
    assert result["codes"].dtype == torch.int32 and result["codes"].tolist() == [3, 2]


# Inputs are left alone


@pytest.mark.parametrize("strategy", ALL_STRATEGIES, ids=repr)
def test_read_only_mmapped_updates_are_read_and_never_modified(strategy: Strategy, tmp_path: Path) -> None:
    global_state, updates = random_updates(torch.float32)
    global_state["steps"] = torch.tensor(0)
    loaded = []
    for update in updates:
        path = tmp_path / f"{update.client_id}.pt"
        torch.save({**update.state, "steps": torch.tensor(update.client_id)}, path)
        loaded.append(ClientUpdate(update.client_id, torch.load(path, mmap=True), update.num_examples))
    before = [{k: t.clone() for k, t in u.state.items()} for u in loaded]
    global_before = {k: t.clone() for k, t in global_state.items()}
    result = strategy.aggregate(global_state, loaded)
    for update, saved in zip(loaded, before, strict=True):
        assert all(torch.equal(update.state[k], saved[k]) for k in saved)
    assert all(torch.equal(global_state[k], global_before[k]) for k in global_before)
    assert result["steps"].item() == max(u.client_id for u in updates)


@pytest.mark.parametrize("strategy", ALL_STRATEGIES, ids=repr)
def test_the_result_shares_no_memory_with_the_inputs(strategy: Strategy) -> None:
    global_state = {"w": torch.zeros(4, dtype=torch.float64), "n": torch.tensor(0)}
    update = ClientUpdate(0, {"w": torch.ones(4, dtype=torch.float64), "n": torch.tensor(5)}, 1)
    result = strategy.aggregate(global_state, [update])
    result["w"].add_(1)
    result["n"].add_(1)
    assert update.state["w"].tolist() == [1.0] * 4 and update.state["n"].item() == 5


@settings(max_examples=50, deadline=None)
@given(
    rows=st.lists(
        st.lists(st.floats(-1e6, 1e6, allow_nan=False, width=32), min_size=3, max_size=3), min_size=1, max_size=7
    ),
    weights=st.lists(st.integers(1, 10_000), min_size=7, max_size=7),
)
def test_every_strategy_stays_within_the_clients_range(rows: list[list[float]], weights: list[int]) -> None:
    updates = [ClientUpdate(i, {"w": torch.tensor(row)}, weights[i]) for i, row in enumerate(rows)]
    stacked = torch.tensor(rows)
    for strategy in ALL_STRATEGIES:
        result = strategy.aggregate({"w": torch.zeros(3)}, updates)["w"]
        assert torch.all(result >= stacked.amin(dim=0)) and torch.all(result <= stacked.amax(dim=0))


# Validation


def test_no_updates_is_an_error() -> None:
    for strategy in ALL_STRATEGIES:
        with pytest.raises(ValueError, match="need at least one client update, got none"):
            strategy.aggregate({"w": torch.zeros(1)}, [])


def test_a_shape_mismatch_names_the_key_the_client_and_both_shapes() -> None:
    updates = [ClientUpdate(0, {"w": torch.zeros(2, 3)}, 1), ClientUpdate(7, {"w": torch.zeros(3, 2)}, 1)]
    with pytest.raises(ValueError, match=r"client 7: 'w' has shape \(3, 2\), the global state has \(2, 3\)"):
        FedAvg().aggregate({"w": torch.zeros(2, 3)}, updates)


def test_a_missing_key_is_named() -> None:
    updates = [ClientUpdate(3, {"a": torch.zeros(1)}, 1)]
    with pytest.raises(ValueError, match=r"client 3: state is missing key 'b'"):
        FedMedian().aggregate({"a": torch.zeros(1), "b": torch.zeros(1)}, updates)


def test_an_extra_key_is_named() -> None:
    updates = [ClientUpdate(4, {"a": torch.zeros(1), "zz": torch.zeros(1)}, 1)]
    with pytest.raises(ValueError, match=r"client 4: state has key 'zz', which the global state does not"):
        FedAvg().aggregate({"a": torch.zeros(1)}, updates)


@pytest.mark.parametrize("num_examples", [0, -3, True, 2.5])
def test_num_examples_must_be_a_positive_integer(num_examples: object) -> None:
    updates = [ClientUpdate(0, {"w": torch.zeros(1)}, 1), ClientUpdate(9, {"w": torch.zeros(1)}, num_examples)]  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"client 9: num_examples must be a positive integer, got"):
        FedAvg().aggregate({"w": torch.zeros(1)}, updates)


def test_a_duplicate_client_id_is_an_error() -> None:
    updates = [ClientUpdate(2, {"w": torch.zeros(1)}, 1), ClientUpdate(2, {"w": torch.ones(1)}, 1)]
    with pytest.raises(ValueError, match="client_id 2 appears more than once"):
        FedAvg().aggregate({"w": torch.zeros(1)}, updates)


def test_a_value_that_is_not_a_tensor_is_named() -> None:
    updates = [ClientUpdate(5, {"w": [1.0]}, 1)]  # type: ignore[dict-item]
    with pytest.raises(ValueError, match=r"client 5: 'w' must be a real-valued tensor, got list \[1.0\]"):
        FedAvg().aggregate({"w": torch.zeros(1)}, updates)


def test_trimming_everything_is_an_error() -> None:
    # Unreachable with a validated beta (< 0.5); forced here to check the message.
    strategy = TrimmedMean(0.1)
    strategy.beta = 0.5
    with pytest.raises(ValueError, match=r"beta=0.5 with n=2 clients would drop every value"):
        strategy.aggregate({"w": torch.zeros(1)}, column([1.0, 2.0], torch.float32))


# make_strategy


def test_make_strategy_builds_the_builtins() -> None:
    assert isinstance(make_strategy("fedavg"), FedAvg)
    assert isinstance(make_strategy("fedmedian", {}), FedMedian)
    trimmed = make_strategy("trimmed_mean", {"beta": 0.3})
    assert isinstance(trimmed, TrimmedMean) and trimmed.beta == 0.3
    assert make_strategy("trimmed_mean").beta == 0.1  # type: ignore[attr-defined]
    assert [cls().name for cls in (FedAvg, FedMedian)] == ["fedavg", "fedmedian"]


def test_make_strategy_loads_a_module_class_with_options() -> None:
    strategy = make_strategy(f"{__name__}:MyStrategy", {"fill": 2.5})
    assert isinstance(strategy, MyStrategy)
    assert strategy.aggregate({"w": torch.zeros(2)}, column([1.0, 2.0]))["w"].tolist() == [2.5, 2.5]


def test_make_strategy_names_an_unknown_name_and_the_known_ones() -> None:
    known = "bulyan, fedadagrad, fedadam, fedavg, fedavgm, fedmedian, fedyogi, krum, multikrum, scaffold, trimmed_mean"
    with pytest.raises(ConfigError, match=rf"unknown name 'fedprox'; known names are {known}"):
        make_strategy("fedprox")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no_such_module_xyz:Thing", r"cannot load 'no_such_module_xyz:Thing'"),
        (f"{__name__}:Missing", r"cannot load '.*:Missing'"),
        (f"{__name__}:NotAStrategy", r"is <class .*NotAStrategy'>, not a subclass of fedsup.Strategy"),
        (f"{__name__}:column", r"not a subclass of fedsup.Strategy"),
    ],
)
def test_make_strategy_rejects_what_it_cannot_load(spec: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        make_strategy(spec)


def test_make_strategy_rejects_options_that_do_not_fit() -> None:
    with pytest.raises(ConfigError, match=r"strategy 'fedavg': options \{'beta': 0.2\} do not fit FedAvg"):
        make_strategy("fedavg", {"beta": 0.2})
    with pytest.raises(ConfigError, match=r"beta: must be a number in \[0, 0.5\), got 0.7"):
        make_strategy("trimmed_mean", {"beta": 0.7})


# weighted_metrics


def test_weighted_metrics_averages_numbers_by_num_examples() -> None:
    result = weighted_metrics(
        [
            (10, {"accuracy": 0.5, "loss": 2.0, "converged": True, "note": "ok", "steps": 4}),
            (30, {"accuracy": 0.9, "steps": 8, "converged": False}),
        ]
    )
    assert result == {"accuracy": 0.8, "loss": 2.0, "steps": 7.0}
    assert list(result) == ["accuracy", "loss", "steps"]


def test_weighted_metrics_does_not_depend_on_client_order() -> None:
    rng = random.Random(1)
    pairs = [(rng.randint(1, 1000), {"m": rng.uniform(-1, 1) * 10 ** rng.randint(-8, 8)}) for _ in range(50)]
    first = weighted_metrics(pairs)
    for _ in range(10):
        rng.shuffle(pairs)
        assert weighted_metrics(pairs) == first


def test_weighted_metrics_edge_cases() -> None:
    assert weighted_metrics([]) == {}
    assert weighted_metrics([(0, {"loss": 5.0}), (2, {"loss": 1.0})]) == {"loss": 1.0}
    assert weighted_metrics([(0, {"loss": 5.0})]) == {}
    assert weighted_metrics([(3, {"acc": np.float32(0.5), "n": np.int64(2)})]) == {"acc": 0.5, "n": 2.0}
    with pytest.raises(ValueError, match=r"num_examples: must be a non-negative integer, got -1"):
        weighted_metrics([(-1, {"loss": 1.0})])
