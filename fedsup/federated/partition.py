"""Split a data set's sample indices among clients: IID, Dirichlet label skew, or label shards.

Every function is deterministic for a seed (``numpy.random.default_rng(seed)``) and returns one int64
index array per client: disjoint, together covering every sample exactly once, sorted within a client.
``label_histogram`` counts each client's labels, for reports and tests.
"""

from __future__ import annotations

import numbers

import numpy as np

from fedsup.engine.errors import ConfigError

# Enough for any setting where a valid draw is not rare; past it the request is unreasonable, not unlucky.
_MAX_ATTEMPTS = 1000


def iid(num_samples: int, num_clients: int, seed: int = 0) -> list[np.ndarray]:
    """Shuffle ``range(num_samples)`` and deal it into ``num_clients`` parts whose sizes differ by at most one."""
    _check_int("num_samples", num_samples, 1)
    _check_clients(num_clients, num_samples)
    order = np.random.default_rng(seed).permutation(num_samples)
    return [_sorted(part) for part in np.array_split(order, num_clients)]


def dirichlet(labels: np.ndarray, num_clients: int, alpha: float, seed: int = 0, min_size: int = 1) -> list[np.ndarray]:
    """Label skew: each class is split among the clients in proportions drawn from Dir(alpha).

    Small ``alpha`` (0.1) gives each client few classes; large ``alpha`` (1000) is close to IID. Draws are
    repeated until every client holds at least ``min_size`` samples; ConfigError after too many attempts.
    """
    labels = _check_labels(labels)
    _check_clients(num_clients, len(labels))
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not 0 < alpha < float("inf"):
        raise ConfigError(f"alpha: must be a finite number above 0, got {alpha!r}")
    _check_int("min_size", min_size, 0)
    if min_size * num_clients > len(labels):
        raise ConfigError(
            f"min_size: {min_size} samples for each of {num_clients} clients needs {min_size * num_clients}, "
            f"but there are only {len(labels)}"
        )
    rng = np.random.default_rng(seed)
    classes = [rng.permutation(members) for members in _by_class(labels)]
    counts = np.array([len(members) for members in classes])
    for _ in range(_MAX_ATTEMPTS):
        proportions = rng.dirichlet(np.full(num_clients, float(alpha)), size=len(classes))
        cuts = _cuts(proportions, counts)
        if np.diff(cuts, axis=1).sum(axis=0).min() >= min_size:
            return _assemble(classes, cuts, num_clients)
    raise ConfigError(
        f"dirichlet: no split gave every one of {num_clients} clients at least min_size={min_size} samples "
        f"in {_MAX_ATTEMPTS} attempts (alpha={alpha}, {len(labels)} samples, {len(classes)} classes); "
        "raise alpha, lower min_size or use fewer clients"
    )


def _by_class(labels: np.ndarray) -> list[np.ndarray]:
    """The sample indices of each distinct label, in label order, ascending within a class."""
    inverse = np.unique(labels, return_inverse=True)[1].reshape(-1)
    grouped = np.argsort(inverse, kind="stable")
    return np.split(grouped, np.cumsum(np.bincount(inverse))[:-1])


def _cuts(proportions: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Per class (row), num_clients + 1 boundaries into its shuffled members, from 0 to its count."""
    column = counts[:, None]
    inner = np.clip((np.cumsum(proportions, axis=1)[:, :-1] * column).astype(np.int64), 0, column)
    return np.concatenate((np.zeros_like(column), inner, column), axis=1)


def _assemble(classes: list[np.ndarray], cuts: np.ndarray, num_clients: int) -> list[np.ndarray]:
    """Each client's samples, ascending: every sample is given its owner (one array operation per class, none
    per client and class: 10,000 clients cost what 10 do), then one stable sort by owner groups them."""
    total = sum(len(members) for members in classes)
    owner = np.empty(total, dtype=np.int64)
    clients = np.arange(num_clients, dtype=np.int64)
    for members, cut in zip(classes, cuts, strict=True):
        owner[members] = np.repeat(clients, np.diff(cut))
    by_owner = np.argsort(owner, kind="stable")  # ascending sample index within each client
    sizes = np.bincount(owner, minlength=num_clients)
    return [part.astype(np.int64) for part in np.split(by_owner, np.cumsum(sizes)[:-1])]


def shards(labels: np.ndarray, num_clients: int, shards_per_client: int = 2, seed: int = 0) -> list[np.ndarray]:
    """Sort the samples by label, cut them into ``num_clients * shards_per_client`` shards, deal them out.

    Shard sizes differ by at most one. When every class's size is a multiple of the shard size, each
    shard holds one label, so each client holds at most ``shards_per_client`` labels.
    """
    labels = _check_labels(labels)
    _check_int("shards_per_client", shards_per_client, 1)
    _check_clients(num_clients, len(labels))
    num_shards = num_clients * shards_per_client
    if num_shards > len(labels):
        raise ConfigError(
            f"shards_per_client: {num_clients} clients x {shards_per_client} shards = {num_shards} shards, "
            f"more than the {len(labels)} samples"
        )
    rng = np.random.default_rng(seed)
    # Shuffle before the stable sort so which samples of a class land in which shard is random too.
    shuffled = rng.permutation(len(labels))
    by_label = shuffled[np.argsort(labels[shuffled], kind="stable")]
    pieces = np.array_split(by_label, num_shards)
    dealt = rng.permutation(num_shards).reshape(num_clients, shards_per_client)
    return [_sorted(np.concatenate([pieces[s] for s in row])) for row in dealt]


def label_histogram(labels: np.ndarray, parts: list[np.ndarray], num_classes: int | None = None) -> np.ndarray:
    """Return a (clients x classes) int64 array: how many samples of each label each part holds.

    Labels must be integers in ``[0, num_classes)``; ``num_classes`` defaults to the largest label + 1.
    """
    labels = _check_labels(labels, allow_empty=True)
    if not np.issubdtype(labels.dtype, np.integer) or (len(labels) and labels.min() < 0):
        raise ConfigError(f"labels: label_histogram needs non-negative integer labels, got dtype {labels.dtype}")
    if num_classes is None:
        num_classes = int(labels.max()) + 1 if len(labels) else 0
    _check_int("num_classes", num_classes, 0)
    if len(labels) and labels.max() >= num_classes:
        raise ConfigError(f"num_classes: is {num_classes}, but the labels go up to {int(labels.max())}")
    histogram = np.zeros((len(parts), num_classes), dtype=np.int64)
    for row, part in enumerate(parts):
        histogram[row] = np.bincount(labels[_check_part(row, part, len(labels))], minlength=num_classes)
    return histogram


def _check_part(row: int, part: np.ndarray, num_samples: int) -> np.ndarray:
    part = np.asarray(part)
    if part.ndim != 1 or (part.size and not np.issubdtype(part.dtype, np.integer)):
        raise ConfigError(f"parts[{row}]: expected a 1-D array of indices, got shape {part.shape} {part.dtype}")
    if part.size and (part.min() < 0 or part.max() >= num_samples):
        raise ConfigError(f"parts[{row}]: indices must lie in [0, {num_samples}), got {part.min()}..{part.max()}")
    return part.astype(np.int64)


def _check_labels(labels: np.ndarray, allow_empty: bool = False) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ConfigError(f"labels: expected a 1-D array, got shape {labels.shape}")
    if not allow_empty and labels.size == 0:
        raise ConfigError("labels: expected at least one sample, got an empty array")
    return labels


def _check_clients(num_clients: int, num_samples: int) -> None:
    _check_int("num_clients", num_clients, 1)
    if num_clients > num_samples:
        raise ConfigError(f"num_clients: {num_clients} clients but only {num_samples} samples")


def _check_int(name: str, value: int, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ConfigError(f"{name}: must be an integer >= {minimum}, got {value!r}")


def _sorted(indices: np.ndarray) -> np.ndarray:
    return np.sort(indices).astype(np.int64)
