"""Aggregation of client model updates into the next global model, in the main process.

A ``Strategy`` turns the global state and the clients' ``ClientUpdate``s into a new global state.
Three come built in:

* ``FedAvg`` (``"fedavg"``): the mean weighted by ``num_examples``;
* ``FedMedian`` (``"fedmedian"``): the coordinate-wise median (unweighted; an even count averages the
  two middle values, like ``numpy.median``);
* ``TrimmedMean`` (``"trimmed_mean"``): per coordinate, drop the ``floor(beta * n)`` smallest and largest
  values and average the rest (unweighted).

Floating-point tensors are combined in float64 and cast back to the dtype of the global state's tensor.
Updates are taken in ``client_id`` order, so the result does not depend on the order they arrive in and
is bit-identical from one call to the next.

Integer and bool tensors (BatchNorm's ``num_batches_tracked``, masks, indices) are not averaged, since
a mean would invent values no client holds: every built-in strategy takes their element-wise maximum
(for bool, a logical OR). For ``num_batches_tracked`` that is the count of the client that trained longest.

Inputs are never modified, so updates may hold read-only tensors mapped from disk
(``torch.load(mmap=True)``). The result holds new tensors on the global state's devices.

Memory stays bounded whatever the number of clients: FedAvg reads the updates in one streaming pass, a
block of up to a million coordinates at a time, and keeps no float64 copy of the model; the median and the
trimmed mean (and the robust rules) stack the clients' values for ``CHUNK_BYTES`` of float64 at a time,
never all n updates of a whole key. Every coordinate is computed from its own values only, so the chunk
size never changes a result.
"""

from __future__ import annotations

import abc
import math
import numbers
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from fedsup.engine.errors import ConfigError

State = dict[str, torch.Tensor]

# What state_dict returns and load_state_dict takes: plain values and float64 tensors, torch.save-able.
StrategyState = dict[str, Any]

# Combines a chunk of one key's coordinates: a float64 tensor of shape (clients, coordinates), rows in
# client_id order, with the matching num_examples; returns a float64 tensor of shape (coordinates,).
Reducer = Callable[[torch.Tensor, list[int]], torch.Tensor]

# How much float64 one chunk holds, all clients together: the robust rules' working set is a small multiple
# of it (the sort's values and indices, a transposed copy), never the n clients' whole keys. Read at each
# call, so it can be changed at run time.
CHUNK_BYTES = 4 * 2**20

# Coordinates per block of the streaming mean (8 MiB of float64 for the accumulator, as much for the
# converted client block). Measured on 1,000 updates of 1M parameters: blocks of 2**15 (cache-sized) took
# 2x the time of these, the per-call cost of torch's ops on each client's block outweighing the cache.
BLOCK_ELEMENTS = 1 << 20


@dataclass(frozen=True)
class ClientUpdate:
    """What one client sends back after a round: its trained state and how many examples it saw."""

    client_id: int
    state: State
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)
    # What the client keeps across rounds (``self.client_state``): as it left it after this round, and as it
    # was before; for strategies that need it, such as SCAFFOLD's control variates.
    client_state: State = field(default_factory=dict)
    previous_client_state: State = field(default_factory=dict)


class Strategy(abc.ABC):
    """Turns the global state and the clients' updates into the next global state."""

    name: ClassVar[str]

    @abc.abstractmethod
    def aggregate(self, global_state: State, updates: Sequence[ClientUpdate]) -> State:
        """Return a new state with the keys, shapes and dtypes of ``global_state``."""

    def setup(self, clients: int) -> None:
        """Told once, before the first round, how many clients the federation has (SCAFFOLD scales by it)."""
        del clients  # most strategies do not depend on it

    def broadcast(self, global_state: State | None) -> dict[str, State]:
        """Named states sent to every client with the round's model, each set as an attribute of the client
        (SCAFFOLD's ``server_control``); none by default."""
        return {}

    def state_dict(self) -> StrategyState:
        """Everything ``aggregate`` carries from one round to the next (server momentum, moments); ``{}`` for a
        rule that keeps none. Saved with each round's checkpoint, so a resumed run continues bit for bit."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned; a rule that keeps no state accepts only ``{}``."""
        if state:
            raise ValueError(f"{self.name}: keeps no state, got a state with keys {sorted(state)}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class FedAvg(Strategy):
    """The mean of the clients' tensors weighted by ``num_examples``."""

    name = "fedavg"

    def aggregate(self, global_state: State, updates: Sequence[ClientUpdate]) -> State:
        return streaming_weighted_mean(global_state, updates)


class FedMedian(Strategy):
    """The coordinate-wise median of the clients' tensors (unweighted)."""

    name = "fedmedian"

    def aggregate(self, global_state: State, updates: Sequence[ClientUpdate]) -> State:
        return combine(global_state, updates, _median)


class TrimmedMean(Strategy):
    """Per coordinate, the mean after dropping the ``floor(beta * n)`` smallest and largest values."""

    name = "trimmed_mean"

    def __init__(self, beta: float = 0.1) -> None:
        if isinstance(beta, bool) or not isinstance(beta, numbers.Real) or not 0 <= beta < 0.5:
            raise ConfigError(f"beta: must be a number in [0, 0.5), got {beta!r}")
        self.beta: float = float(beta)

    def aggregate(self, global_state: State, updates: Sequence[ClientUpdate]) -> State:
        n = len(updates)
        trim = math.floor(self.beta * n)
        if n and n - 2 * trim < 1:
            raise ValueError(f"trimmed_mean: beta={self.beta} with n={n} clients would drop every value")
        return combine(global_state, updates, lambda values, _: _trimmed_mean(values, trim))

    def __repr__(self) -> str:
        return f"TrimmedMean(beta={self.beta!r})"


def combine(global_state: State, updates: Sequence[ClientUpdate], reducer: Reducer) -> State:
    """Check ``updates`` against ``global_state``, then combine every key: floats with ``reducer``, the rest by max.

    ``reducer`` receives a chunk of one key's coordinates (the key flattened), as a float64 tensor of shape
    (clients, coordinates) with one row per client in ``client_id`` order, and the clients' ``num_examples``
    in the same order; it returns the chunk's combined values, a float64 tensor of shape (coordinates,).
    It must treat every coordinate on its own: chunks hold about ``CHUNK_BYTES`` of float64.
    """
    ordered = checked(global_state, updates)
    weights = [update.num_examples for update in ordered]
    result: State = {}
    for key, reference in global_state.items():
        if not reference.is_floating_point():
            result[key] = max_of(key, reference, ordered)
            continue
        combined = torch.empty(reference.shape, dtype=reference.dtype, device=reference.device)
        flat = combined.view(-1)
        for start, stop, values in stacked_chunks(key, reference, ordered):
            flat[start:stop] = reducer(values, weights)
        result[key] = combined
    return result


def stacked_chunks(
    key: str, reference: torch.Tensor, ordered: Sequence[ClientUpdate], columns: int | None = None
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """``(start, stop, values)`` for consecutive coordinate ranges of ``key`` flattened.

    ``values`` is float64 of shape (clients, stop - start), one row per update in order, on the reference's
    device; ``columns`` (default: what fits in ``CHUNK_BYTES``) bounds its width. A fresh tensor each time.
    """
    rows = len(ordered)
    width = columns if columns is not None else max(1, CHUNK_BYTES // (8 * max(rows, 1)))
    for start, stop in spans(reference.numel(), width):
        pieces = [flat_piece(update.state[key], start, stop).to(reference.device) for update in ordered]
        values = torch.empty((rows, stop - start), dtype=torch.float64, device=reference.device)
        # One call converts and copies every client's slice: no per-client float64 temporaries.
        yield start, stop, torch.stack(pieces, out=values)


def spans(numel: int, width: int) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` ranges of at most ``width`` covering ``range(numel)``."""
    for start in range(0, numel, width):
        yield start, min(start + width, numel)


def flat_piece(tensor: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Elements ``start:stop`` of ``tensor`` flattened in row-major order, without copying the whole tensor.

    A view when the tensor is contiguous (as loaded or mapped from disk) or has at most one dimension;
    otherwise a copy of at most the rows that the range touches, or of the range itself.
    """
    if tensor.dim() <= 1 or tensor.is_contiguous():
        return tensor.reshape(-1)[start:stop]
    row = tensor[0].numel()
    first, last = start // row, -(-stop // row)
    if row < stop - start:
        # The range spans several rows: copy only those (under three times the range).
        return tensor[first:last].reshape(-1)[start - first * row : stop - first * row]
    # Rows longer than the range: it lies within one or two of them.
    parts = [
        flat_piece(tensor[index], max(start, index * row) - index * row, min(stop, (index + 1) * row) - index * row)
        for index in range(first, last)
    ]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _median(values: torch.Tensor, weights: list[int]) -> torch.Tensor:
    return median_of(values)


def median_of(values: torch.Tensor) -> torch.Tensor:
    """Per column of ``values`` (clients, coordinates), the median; even counts average the middle two."""
    # kthvalue selects without sorting each column; NaN counts as the largest value, as in a sort.
    count = values.shape[0]
    middle = count // 2
    upper = values.kthvalue(middle + 1, dim=0).values
    if count % 2:
        return upper
    return (values.kthvalue(middle, dim=0).values + upper) / 2


def _trimmed_mean(values: torch.Tensor, trim: int) -> torch.Tensor:
    # Sorted along a contiguous dimension (several times faster than along dim 0), then summed in order.
    ordered = values.T.contiguous().sort(dim=1).values
    kept = ordered[:, trim : values.shape[0] - trim].T.contiguous()
    return sum_rows(kept) / kept.shape[0]


def sum_rows(rows: torch.Tensor) -> torch.Tensor:
    """Per column, ``((rows[0] + rows[1]) + rows[2]) + ...``: the association of numpy's sum along axis 0.

    Written out so that a column's sum depends on its own values only: torch's reduction along dim 0
    associates a column differently depending on where it falls among the tensor's columns (and threads).
    """
    total = rows[0].clone()
    for row in rows[1:]:
        total.add_(row)
    return total


def checked(global_state: State, updates: Sequence[ClientUpdate]) -> list[ClientUpdate]:
    """Return ``updates`` sorted by client_id; raise ValueError on anything that cannot be combined."""
    if not updates:
        raise ValueError("updates: need at least one client update, got none")
    for key, tensor in global_state.items():
        if not isinstance(tensor, torch.Tensor) or tensor.is_complex():
            raise ValueError(f"global state: {key!r} must be a real-valued tensor, got {describe(tensor)}")
    seen: set[int] = set()
    for update in updates:
        if update.client_id in seen:
            raise ValueError(f"updates: client_id {update.client_id!r} appears more than once")
        seen.add(update.client_id)
        _check_update(global_state, update)
    return sorted(updates, key=lambda update: update.client_id)


def _check_update(global_state: State, update: ClientUpdate) -> None:
    client = update.client_id
    n = update.num_examples
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n <= 0:
        raise ValueError(f"client {client}: num_examples must be a positive integer, got {n!r}")
    for key in update.state:
        if key not in global_state:
            raise ValueError(f"client {client}: state has key {key!r}, which the global state does not")
    for key, reference in global_state.items():
        if key not in update.state:
            raise ValueError(f"client {client}: state is missing key {key!r}")
        tensor = update.state[key]
        if not isinstance(tensor, torch.Tensor) or tensor.is_complex():
            raise ValueError(f"client {client}: {key!r} must be a real-valued tensor, got {describe(tensor)}")
        if tensor.shape != reference.shape:
            raise ValueError(
                f"client {client}: {key!r} has shape {tuple(tensor.shape)}, "
                f"the global state has {tuple(reference.shape)}"
            )


def describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor"
    return f"{type(value).__name__} {value!r}"


# -- options and the streaming pass, shared with fedsup.federated.optimizers and .robust


def real_option(option: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ConfigError(f"{option}: must be a finite number, got {value!r}")
    return float(value)


def positive_option(option: str, value: object) -> float:
    number = real_option(option, value)
    if number <= 0:
        raise ConfigError(f"{option}: must be a number > 0, got {value!r}")
    return number


def unit_interval_option(option: str, value: object) -> float:
    # [0, 1): at 1 a moment never forgets, and FedAdam's bias correction would divide by zero.
    number = real_option(option, value)
    if not 0 <= number < 1:
        raise ConfigError(f"{option}: must be a number in [0, 1), got {value!r}")
    return number


def count_option(option: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ConfigError(f"{option}: must be an integer >= {minimum}, got {value!r}")
    return int(value)


def mean64(key: str, reference: torch.Tensor, ordered: Sequence[ClientUpdate]) -> torch.Tensor:
    """One key's ``num_examples``-weighted mean in float64, in one streaming pass over the updates.

    Per coordinate: multiply, then add, each rounded once, in client_id order, then one division; so the
    result is bit-identical to FedAvg's.
    """
    total = torch.empty(reference.numel(), dtype=torch.float64, device=reference.device)
    for start, stop, block in weighted_totals(key, reference, ordered):
        total[start:stop] = block
    return total.div_(sum(update.num_examples for update in ordered)).view(reference.shape)


def weighted_totals(
    key: str, reference: torch.Tensor, ordered: Sequence[ClientUpdate]
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """``(start, stop, total)`` per block of ``key`` flattened: ``total = sum(x[start:stop] * num_examples)``.

    In client_id order, in float64, each product and each sum rounded once. ``total`` is one buffer reused
    for every block: use it before asking for the next.
    """
    assert ordered  # checked() rejects an empty round
    buffers = torch.empty((2, min(reference.numel(), BLOCK_ELEMENTS)), dtype=torch.float64, device=reference.device)
    values = [update.state[key] for update in ordered]
    # A float32 (or narrower) value times an integer below 2**29 fits float64's 53 bits exactly, so
    # add_(x, alpha=n), fused or not, rounds once, as x * n then + total does.
    fused = all(x.dtype in _EXACT_PRODUCT_DTYPES and u.num_examples < 2**29
                for x, u in zip(values, ordered, strict=True))
    for start, stop in spans(reference.numel(), BLOCK_ELEMENTS):
        total, work = buffers[0, : stop - start], buffers[1, : stop - start]
        for index, (update, value) in enumerate(zip(ordered, values, strict=True)):
            work.copy_(flat_piece(value, start, stop))  # converts (and moves) the client's block
            if index == 0:
                total.copy_(work).mul_(update.num_examples)
            elif fused:
                total.add_(work, alpha=update.num_examples)
            else:
                total.add_(work.mul_(update.num_examples))
        yield start, stop, total


# Float dtypes whose values times an integer below 2**29 are exact in float64.
_EXACT_PRODUCT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def max_of(key: str, reference: torch.Tensor, ordered: Sequence[ClientUpdate]) -> torch.Tensor:
    """One integer or bool key's element-wise max (OR for bool), as the built-in strategies do."""
    result: torch.Tensor | None = None
    for update in ordered:
        value = update.state[key].to(reference.device).to(reference.dtype)
        # The first value is copied: a result must never share memory with an update (or the global state).
        result = value.clone() if result is None else torch.maximum(result, value)
    assert result is not None
    return result.contiguous()


def cast_like(value: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    return value.to(reference.dtype).contiguous()


def streaming_weighted_mean(global_state: State, updates: Sequence[ClientUpdate]) -> State:
    """``FedAvg().aggregate(global_state, updates)``: one pass over the updates, none of them stacked.

    Extra memory: the result and two float64 blocks of at most ``BLOCK_ELEMENTS``; no float64 copy of a larger
    key.
    """
    ordered = checked(global_state, updates)
    total_examples = sum(update.num_examples for update in ordered)
    result: State = {}
    for key, reference in global_state.items():
        if not reference.is_floating_point():
            result[key] = max_of(key, reference, ordered)
            continue
        out = torch.empty(reference.shape, dtype=reference.dtype, device=reference.device)
        flat = out.view(-1)
        for start, stop, total in weighted_totals(key, reference, ordered):
            flat[start:stop] = total.div_(total_examples)
        result[key] = out
    return result


def weighted_metrics(updates: Sequence[tuple[int, dict[str, Any]]]) -> dict[str, float]:
    """Return the ``num_examples``-weighted mean of every numeric metric, keys sorted by name.

    Bools and non-numbers are skipped. A metric some clients lack is averaged over those that have it;
    clients with zero examples count for nothing.
    """
    sums: dict[str, list[float]] = {}
    counts: dict[str, list[int]] = {}
    for n, metrics in updates:
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0:
            raise ValueError(f"num_examples: must be a non-negative integer, got {n!r}")
        if n == 0:
            continue
        for key, value in metrics.items():
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                continue
            sums.setdefault(key, []).append(int(n) * float(value))
            counts.setdefault(key, []).append(int(n))
    # fsum rounds once, so the mean does not depend on the order the clients are listed in.
    return {key: math.fsum(sums[key]) / sum(counts[key]) for key in sorted(sums)}
