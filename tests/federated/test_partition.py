"""fedsup.federated.partition: every split is disjoint, complete, sorted and seed-deterministic; Dirichlet skews with
small alpha and not with large; shards give few labels per client; bad arguments are named."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsup.engine.errors import ConfigError
from fedsup.federated.partition import dirichlet, iid, label_histogram, shards

# 10 balanced classes of 100 samples, interleaved so that index order says nothing about the label.
LABELS = np.tile(np.arange(10), 100)


def assert_partition(parts: list[np.ndarray], num_samples: int) -> None:
    """Disjoint, covering range(num_samples) exactly once, int64 and sorted within each part."""
    for part in parts:
        assert part.dtype == np.int64 and part.ndim == 1
        assert np.all(np.diff(part) > 0)
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(num_samples))


def same(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def top_share(histogram: np.ndarray, top: int) -> np.ndarray:
    """Per client, the share of its samples in its ``top`` largest classes."""
    return np.sort(histogram, axis=1)[:, -top:].sum(axis=1) / histogram.sum(axis=1)


SPLITS: dict[str, Callable[[int], list[np.ndarray]]] = {
    "iid": lambda seed: iid(len(LABELS), 10, seed=seed),
    "dirichlet": lambda seed: dirichlet(LABELS, 10, alpha=0.5, seed=seed),
    "shards": lambda seed: shards(LABELS, 10, shards_per_client=3, seed=seed),
}


@pytest.mark.parametrize("name", SPLITS)
def test_each_split_is_deterministic_for_a_seed_and_differs_across_seeds(name: str) -> None:
    split = SPLITS[name]
    first = split(0)
    assert_partition(first, len(LABELS))
    assert same(split(0), first)
    assert not same(split(1), first)


# Properties over many shapes


@settings(max_examples=40, deadline=None)
@given(num_samples=st.integers(1, 300), data=st.data(), seed=st.integers(0, 2**32 - 1))
def test_iid_is_a_partition_with_sizes_within_one(num_samples: int, data: st.DataObject, seed: int) -> None:
    num_clients = data.draw(st.integers(1, num_samples))
    parts = iid(num_samples, num_clients, seed)
    assert len(parts) == num_clients
    assert_partition(parts, num_samples)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1


@settings(max_examples=40, deadline=None)
@given(
    labels=st.lists(st.integers(0, 6), min_size=1, max_size=300).map(np.array),
    data=st.data(),
    alpha=st.floats(0.05, 100),
    seed=st.integers(0, 2**32 - 1),
)
def test_dirichlet_is_a_partition(labels: np.ndarray, data: st.DataObject, alpha: float, seed: int) -> None:
    num_clients = data.draw(st.integers(1, min(len(labels), 12)))
    parts = dirichlet(labels, num_clients, alpha, seed=seed, min_size=0)
    assert len(parts) == num_clients
    assert_partition(parts, len(labels))


@settings(max_examples=40, deadline=None)
@given(
    labels=st.lists(st.integers(-3, 6), min_size=1, max_size=300).map(np.array),
    data=st.data(),
    seed=st.integers(0, 2**32 - 1),
)
def test_shards_is_a_partition(labels: np.ndarray, data: st.DataObject, seed: int) -> None:
    num_clients = data.draw(st.integers(1, len(labels)))
    per_client = data.draw(st.integers(1, len(labels) // num_clients))
    parts = shards(labels, num_clients, per_client, seed=seed)
    assert len(parts) == num_clients
    assert_partition(parts, len(labels))


# IID


def test_iid_sizes() -> None:
    assert [len(p) for p in iid(10, 3)] == [4, 3, 3]
    assert [len(p) for p in iid(1000, 10)] == [100] * 10
    assert [len(p) for p in iid(5, 5)] == [1] * 5
    assert [p.tolist() for p in iid(4, 1)] == [[0, 1, 2, 3]]


def test_iid_shuffles() -> None:
    parts = iid(100, 2, seed=0)
    assert not np.array_equal(parts[0], np.arange(50))


# Dirichlet


@pytest.mark.parametrize("seed", range(5))
def test_dirichlet_with_small_alpha_gives_most_clients_few_classes(seed: int) -> None:
    histogram = label_histogram(LABELS, dirichlet(LABELS, 10, alpha=0.1, seed=seed))
    # Uniform would put 20% of a client's samples in its top two of ten classes.
    assert np.sum(top_share(histogram, 2) >= 0.6) >= 5
    assert np.sum(histogram == 0) >= 30  # many (client, class) pairs hold nothing at all


@pytest.mark.parametrize("seed", range(5))
def test_dirichlet_with_large_alpha_is_near_uniform(seed: int) -> None:
    histogram = label_histogram(LABELS, dirichlet(LABELS, 10, alpha=1000, seed=seed))
    assert histogram.min() >= 7 and histogram.max() <= 13  # 10 expected in every cell
    assert np.all(top_share(histogram, 2) < 0.25)


def test_dirichlet_gives_every_client_at_least_min_size() -> None:
    parts = dirichlet(LABELS, 20, alpha=0.3, seed=4, min_size=20)
    assert_partition(parts, len(LABELS))
    assert min(len(p) for p in parts) >= 20


def test_dirichlet_gives_up_with_a_clear_error() -> None:
    with pytest.raises(ConfigError, match=r"no split gave every one of 100 clients at least min_size=10 samples"):
        dirichlet(LABELS, 100, alpha=0.01, min_size=10)


def test_dirichlet_accepts_labels_of_any_kind() -> None:
    labels = np.array(["cat", "dog", "cat", "bird", "dog", "cat"])
    assert_partition(dirichlet(labels, 2, alpha=1.0, seed=3), len(labels))


# Shards


@pytest.mark.parametrize(("num_clients", "per_client"), [(20, 2), (50, 1), (25, 4), (10, 5), (5, 4)])
def test_shards_give_each_client_at_most_its_shard_count_of_labels(num_clients: int, per_client: int) -> None:
    # Each case's shard size (1000 / shards) divides the class size (100), so every shard holds one label.
    histogram = label_histogram(LABELS, shards(LABELS, num_clients, per_client, seed=1))
    assert np.all(np.count_nonzero(histogram, axis=1) <= per_client)


def test_shards_that_straddle_classes_hold_at_most_two_labels_each() -> None:
    histogram = label_histogram(LABELS, shards(LABELS, 10, 3, seed=1))  # 30 shards of 33 or 34 samples
    assert np.all(np.count_nonzero(histogram, axis=1) <= 6)


def test_shards_with_class_sizes_a_multiple_of_the_shard_size_hold_one_label_each() -> None:
    parts = shards(LABELS, 20, shards_per_client=2, seed=7)  # 40 shards of 25; each class is four shards
    histogram = label_histogram(LABELS, parts)
    assert [len(p) for p in parts] == [50] * 20
    assert np.all(np.count_nonzero(histogram, axis=1) <= 2)
    assert np.all(np.isin(histogram, [0, 25, 50]))


# label_histogram


def test_label_histogram_counts_labels_per_part() -> None:
    labels = np.array([0, 1, 1, 2, 2, 2])
    parts = [np.array([0, 1]), np.array([2, 3, 4, 5]), np.array([], dtype=np.int64)]
    assert label_histogram(labels, parts).tolist() == [[1, 1, 0], [0, 1, 3], [0, 0, 0]]
    assert label_histogram(labels, parts, num_classes=5).shape == (3, 5)
    assert label_histogram(labels, parts).dtype == np.int64
    assert label_histogram(np.array([], dtype=np.int64), []).shape == (0, 0)


@pytest.mark.parametrize(
    ("labels", "parts", "num_classes", "message"),
    [
        (np.array([0, 3]), [np.array([0, 1])], 2, r"num_classes: is 2, but the labels go up to 3"),
        (np.array([0, -1]), [np.array([0])], None, r"labels: label_histogram needs non-negative integer labels"),
        (np.array([0.5, 1.0]), [np.array([0])], None, r"needs non-negative integer labels, got dtype float64"),
        (np.array([0, 1]), [np.array([0, 2])], None, r"parts\[0\]: indices must lie in \[0, 2\), got 0..2"),
        (np.array([0, 1]), [np.array([[0]])], None, r"parts\[0\]: expected a 1-D array of indices"),
        (np.array([[0, 1]]), [], None, r"labels: expected a 1-D array, got shape \(1, 2\)"),
    ],
)
def test_label_histogram_errors(
    labels: np.ndarray, parts: list[np.ndarray], num_classes: int | None, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        label_histogram(labels, parts, num_classes)


# Argument errors


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: iid(10, 0), r"num_clients: must be an integer >= 1, got 0"),
        (lambda: iid(10, True), r"num_clients: must be an integer >= 1, got True"),
        (lambda: iid(10, 2.0), r"num_clients: must be an integer >= 1, got 2.0"),  # type: ignore[arg-type]
        (lambda: iid(3, 4), r"num_clients: 4 clients but only 3 samples"),
        (lambda: iid(0, 1), r"num_samples: must be an integer >= 1, got 0"),
        (lambda: dirichlet(LABELS, 0, 1.0), r"num_clients: must be an integer >= 1, got 0"),
        (lambda: dirichlet(LABELS[:5], 6, 1.0), r"num_clients: 6 clients but only 5 samples"),
        (lambda: dirichlet(LABELS, 5, 0.0), r"alpha: must be a finite number above 0, got 0.0"),
        (lambda: dirichlet(LABELS, 5, -1), r"alpha: must be a finite number above 0, got -1"),
        (lambda: dirichlet(LABELS, 5, float("inf")), r"alpha: must be a finite number above 0, got inf"),
        (lambda: dirichlet(LABELS, 5, float("nan")), r"alpha: must be a finite number above 0, got nan"),
        (lambda: dirichlet(LABELS, 5, 1.0, min_size=-1), r"min_size: must be an integer >= 0, got -1"),
        (lambda: dirichlet(LABELS, 5, 1.0, min_size=201), r"min_size: 201 samples for each of 5 clients needs 1005"),
        (lambda: dirichlet(np.array([]), 1, 1.0), r"labels: expected at least one sample"),
        (lambda: dirichlet(LABELS.reshape(10, 100), 2, 1.0), r"labels: expected a 1-D array, got shape \(10, 100\)"),
        (lambda: shards(LABELS, 0), r"num_clients: must be an integer >= 1, got 0"),
        (lambda: shards(LABELS, 2, 0), r"shards_per_client: must be an integer >= 1, got 0"),
        (lambda: shards(LABELS, 600), r"shards_per_client: 600 clients x 2 shards = 1200 shards, more than the 1000"),
        (lambda: shards(LABELS, 1001, 1), r"num_clients: 1001 clients but only 1000 samples"),
    ],
)
def test_bad_arguments_are_named(call: Callable[[], object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        call()
