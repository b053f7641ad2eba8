"""fedsup.federated.strategies: FedAvg is the exact weighted mean in any arrival order; median and trimmed mean are
right on hand-computed cases; dtypes survive; integer tensors take the max; bad updates are named."""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsup.engine.errors import ConfigError
from fedsup.federated import robust as robust_module
from fedsup.federated import strategies as strategies_module
from fedsup.federated.registry import make_strategy
from fedsup.federated.robust import Bulyan, Krum, MultiKrum, squared_distances
from fedsup.federated.strategies import (
    ClientUpdate,
    FedAvg,
    FedMedian,
    State,
    Strategy,
    TrimmedMean,
    flat_piece,
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


# Bounded memory: every rule works a chunk of coordinates at a time, and the chunk size changes no bit


def odd_updates(count: int, seed: int = 0) -> tuple[State, list[ClientUpdate]]:
    """Keys of awkward shapes and dtypes, some client tensors non-contiguous, client ids out of order."""
    generator = torch.Generator().manual_seed(seed)
    shapes = {"conv": (5, 3, 3, 2), "odd": (7, 13), "scalar": (), "one": (1,), "empty": (0, 4), "long": (257,)}
    global_state: State = {key: torch.randn(shape, generator=generator) for key, shape in shapes.items()}
    global_state["half"] = torch.randn(3, 11, generator=generator).to(torch.bfloat16)
    global_state["steps"] = torch.tensor(0)
    global_state["mask"] = torch.zeros(6, dtype=torch.bool)
    updates = []
    for i in range(count):
        state = {key: value + torch.randn(value.shape, generator=generator).to(value.dtype) * (1 + i % 3)
                 for key, value in global_state.items() if value.is_floating_point()}
        # The same values, stored transposed: chunks must follow row-major order through any strides.
        state["odd"] = state["odd"].T.contiguous().T
        state["conv"] = state["conv"].permute(3, 1, 2, 0).contiguous().permute(3, 1, 2, 0)
        state["steps"] = torch.tensor(10 + (7 * i) % 5)
        state["mask"] = torch.rand(6, generator=generator) > 0.7
        updates.append(ClientUpdate(100 - 3 * i, state, 1 + (5 * i) % 9))
    # Two updates exactly equal, so that Krum's ties are exercised too.
    updates.append(ClientUpdate(1, {key: value.clone() for key, value in updates[0].state.items()}, 4))
    return global_state, updates


def every_builtin(count: int) -> list[Strategy]:
    names = ("fedavg", "fedmedian", "fedavgm", "fedadam", "fedyogi", "fedadagrad")
    strategies = [make_strategy(name) for name in names]
    strategies += [
        TrimmedMean(0.2),
        make_strategy("fedavgm", {"server_learning_rate": 0.5, "server_momentum": 0.9}),
        make_strategy("krum", {"num_malicious_nodes": 2}),
        make_strategy("multikrum", {"num_malicious_nodes": 1, "num_nodes_to_select": 4}),
        make_strategy("bulyan", {"num_malicious_nodes": 1}),
        make_strategy("scaffold", {"server_learning_rate": 0.7}),
    ]
    for strategy in strategies:
        strategy.setup(count)
    return strategies


def tiny_chunks(monkeypatch: pytest.MonkeyPatch, clients: int) -> None:
    """Chunks of 3 coordinates, streaming blocks of 4, distance chunks of 2: many chunks per key."""
    monkeypatch.setattr(strategies_module, "CHUNK_BYTES", 8 * clients * 3)
    monkeypatch.setattr(strategies_module, "BLOCK_ELEMENTS", 4)
    monkeypatch.setattr(robust_module, "DISTANCE_COLUMNS", 2)


def bits(state: State) -> dict[str, torch.Tensor]:
    """Each tensor's raw bytes, so that equality is bit for bit (0.0 against -0.0 counts, NaN equals NaN)."""
    return {key: value.contiguous().reshape(-1).view(torch.uint8) for key, value in state.items()}


def assert_same_bits(left: State, right: State) -> None:
    assert list(left) == list(right)
    for key in left:
        assert left[key].dtype == right[key].dtype and left[key].shape == right[key].shape, key
    assert all(torch.equal(a, b) for a, b in zip(bits(left).values(), bits(right).values(), strict=True))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tiny_chunks_give_the_same_bits_as_one_chunk(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    global_state, updates = odd_updates(11, seed)
    whole = [s.aggregate(global_state, updates) for s in every_builtin(len(updates))]
    with monkeypatch.context() as patch:
        tiny_chunks(patch, len(updates))
        chunked = [s.aggregate(global_state, updates) for s in every_builtin(len(updates))]
    for one, many in zip(whole, chunked, strict=True):
        assert_same_bits(one, many)


def test_the_distances_do_not_depend_on_the_chunk_size(monkeypatch: pytest.MonkeyPatch) -> None:
    global_state, updates = odd_updates(9)
    ordered = sorted(updates, key=lambda u: u.client_id)
    whole = squared_distances(global_state, ordered)
    with monkeypatch.context() as patch:
        tiny_chunks(patch, len(updates))
        chunked = squared_distances(global_state, ordered)
    # Chunk sums are added to a pair's total one by one, so the association (only) changes with the chunk size.
    assert torch.allclose(chunked, whole, rtol=1e-13, atol=0.0)
    assert torch.equal(chunked, chunked.T) and not chunked.diagonal().any()
    assert chunked[ordered.index(updates[0]), ordered.index(updates[-1])] == 0.0  # the two equal updates
    flat = torch.stack([torch.cat([u.state[k].double().reshape(-1) for k in global_state
                                   if global_state[k].is_floating_point()]) for u in ordered])
    assert torch.allclose(chunked, torch.cdist(flat, flat, compute_mode="donot_use_mm_for_euclid_dist") ** 2,
                          rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "strategy",
    [FedMedian(), TrimmedMean(0.2), Bulyan(num_malicious_nodes=1), Krum(num_malicious_nodes=1),
     MultiKrum(num_malicious_nodes=1, num_nodes_to_select=3)],
    ids=repr,
)
def test_the_robust_rules_never_stack_more_than_a_chunk(strategy: Strategy, monkeypatch: pytest.MonkeyPatch) -> None:
    global_state = {"big": torch.zeros(40, 50), "bias": torch.zeros(50)}
    generator = torch.Generator().manual_seed(0)
    updates = [ClientUpdate(i, {k: torch.randn(v.shape, generator=generator) for k, v in global_state.items()}, 1)
               for i in range(9)]
    limit = 8 * 9 * 64  # 64 coordinates of 9 clients; one key is 2,000 coordinates
    monkeypatch.setattr(strategies_module, "CHUNK_BYTES", limit)
    stacked: list[int] = []
    real_stack = torch.stack

    def recording_stack(tensors: Sequence[torch.Tensor], *args: object, **kwargs: object) -> torch.Tensor:
        out = real_stack(tensors, *args, **kwargs)  # type: ignore[arg-type]
        stacked.append(out.numel() * out.element_size())
        return out

    monkeypatch.setattr(torch, "stack", recording_stack)
    strategy.aggregate(global_state, updates)
    assert stacked and max(stacked) <= limit


def test_trimmed_mean_is_numpys_mean_of_the_sorted_values_bit_for_bit() -> None:
    # numpy (Flower's FedTrimmedAvg) sums along axis 0 row after row; so does fedsup, whatever the column.
    generator = torch.Generator().manual_seed(1)
    updates = [ClientUpdate(i, {"w": torch.randn(37, 29, generator=generator, dtype=torch.float64)}, 1)
               for i in range(11)]
    stacked = np.stack([u.state["w"].numpy() for u in updates])
    expected = np.mean(np.sort(stacked, axis=0)[2:9], axis=0)
    result = TrimmedMean(0.2).aggregate({"w": torch.zeros(37, 29, dtype=torch.float64)}, updates)["w"].numpy()
    assert np.array_equal(result.view(np.int64), expected.view(np.int64))


def naive_bulyan_selection(distances: torch.Tensor, f: int) -> list[int]:
    """Repeated Krum written plainly: re-sort every remaining row's distances at every pick."""
    table = distances.tolist()
    remaining, picked = list(range(len(table))), []
    for _ in range(len(table) - 2 * f):
        neighbours = max(1, len(remaining) - f - 2)
        scores = [math.fsum(sorted(table[i][j] for j in remaining if j != i)[:neighbours]) for i in remaining]
        best = min(range(len(remaining)), key=lambda p: (scores[p], p))
        picked.append(remaining.pop(best))
    return sorted(picked)


@settings(max_examples=60, deadline=None)
@given(
    count=st.integers(3, 14),
    f=st.integers(0, 3),
    values=st.lists(st.integers(0, 6), min_size=14 * 14, max_size=14 * 14),
)
def test_bulyans_incremental_selection_is_repeated_krum(count: int, f: int, values: list[int]) -> None:
    # Small integer distances: many ties, which must go to the lower position exactly as before.
    upper = torch.tensor(values[: count * count], dtype=torch.float64).reshape(count, count).triu(1)
    distances = upper + upper.T
    assert Bulyan(num_malicious_nodes=f).select(distances) == naive_bulyan_selection(distances, f)


def test_a_non_finite_update_does_not_break_the_selection() -> None:
    global_state = {"w": torch.zeros(3)}
    updates = [ClientUpdate(i, {"w": torch.full((3,), float(i))}, 1) for i in range(7)]
    updates[3] = ClientUpdate(3, {"w": torch.tensor([float("nan"), 0.0, float("inf")])}, 1)
    result = Bulyan(num_malicious_nodes=1).aggregate(global_state, updates)
    assert result["w"].shape == (3,)


@pytest.mark.parametrize("shape", [(6, 5), (3, 4, 5), (2, 1, 7), (5,), ()])
def test_flat_piece_is_the_flattened_range_for_any_strides(shape: tuple[int, ...]) -> None:
    base = torch.arange(math.prod(shape), dtype=torch.float32).reshape(shape)
    variants = [base]
    if base.dim() >= 2:
        reverse = tuple(range(base.dim() - 1, -1, -1))
        variants += [base.permute(reverse).contiguous().permute(reverse),
                     base.transpose(0, 1).contiguous().transpose(0, 1)]
    if base.dim() == 1:
        variants.append(torch.arange(2 * base.numel(), dtype=torch.float32)[::2])
    numel = base.numel()
    for tensor in variants:
        for start in range(numel):
            for stop in range(start + 1, numel + 1):
                assert torch.equal(flat_piece(tensor, start, stop), tensor.reshape(-1)[start:stop])


def test_bulyans_nearest_values_break_ties_by_client_id() -> None:
    # Integer values: many are equally far from the median, and which of them are kept changes the mean.
    generator = torch.Generator().manual_seed(3)
    values = torch.randint(-4, 5, (41, 64), generator=generator).to(torch.float64)
    beta = 17
    result = robust_module._mean_nearest_median(values, beta)
    for column in range(values.shape[1]):
        col = values[:, column].tolist()
        median = sorted(col)[len(col) // 2]
        nearest = sorted(range(len(col)), key=lambda i: (abs(col[i] - median), i))[:beta]
        assert result[column].item() == math.fsum(col[i] for i in nearest) / beta
