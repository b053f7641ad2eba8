"""Small deterministic inputs shared by the Flower reference script and ``test_server_rules.py``.

Pure Python on purpose: ``flower_reference.py`` runs in a venv with Flower and numpy but no torch, and the
tests run in fedsup's venv without Flower, so neither library may be imported here.

Every value is a multiple of 1/64 with a small numerator, so it is exact in float64 and in float32, and
the only rounding in a reference number comes from the rule being tested.
"""

from __future__ import annotations

# A model of two floating tensors, in this key order (the order matters for Flower's flattened distances).
SHAPES: dict[str, tuple[int, ...]] = {"layer.weight": (2, 3), "layer.bias": (2,)}

# Flat, row-major values for each key.
Model = dict[str, list[float]]

# (client_id, num_examples) for the server-optimizer rounds, deliberately not in client_id order.
OPT_CLIENTS: list[tuple[int, int]] = [(3, 5), (0, 2), (2, 7), (1, 3)]
OPT_ROUNDS = 3


def _size(shape: tuple[int, ...]) -> int:
    size = 1
    for dim in shape:
        size *= dim
    return size


def _lcg(seed: int, count: int, span: int) -> list[float]:
    """``count`` values in [-span/64, span/64], multiples of 1/64, from a fixed linear congruential generator."""
    state = seed * 2654435761 % 2**32 + 1
    values = []
    for _ in range(count):
        state = (1103515245 * state + 12345) % 2**31
        values.append(((state >> 8) % (2 * span + 1) - span) / 64)
    return values


def _model(seed: int, span: int, offset: float = 0.0) -> Model:
    model: Model = {}
    for index, (key, shape) in enumerate(SHAPES.items()):
        model[key] = [value + offset for value in _lcg(seed * 31 + index, _size(shape), span)]
    return model


def opt_initial() -> Model:
    """The global model before the first server-optimizer round."""
    return _model(seed=7, span=64)


def opt_client_state(round_number: int, client_id: int) -> Model:
    """What ``client_id`` sends back in ``round_number`` (1-based); independent of the global model."""
    return _model(seed=100 * round_number + client_id, span=96)


# Robust rules: (client_id, num_examples); the last two ids are outliers far from the rest.
ROBUST_CLIENTS: list[tuple[int, int]] = [(0, 4), (1, 9), (2, 1), (3, 6), (4, 3), (5, 8), (6, 2), (7, 5), (8, 7)]
ROBUST_OUTLIERS = (7, 8)


def robust_state(seed: int, client_id: int) -> Model:
    """A client's model for the robust-rule cases: honest ones near zero, outliers shifted by +6."""
    offset = 6.0 if client_id in ROBUST_OUTLIERS else 0.0
    return _model(seed=1000 * seed + client_id, span=64, offset=offset)


# Seeds of the robust cases. On BULYAN_DIFFERS_SEED (as on every seed `flower_reference.py --search` tried,
# 1 to 199, with f=1) Flower's one-shot flwr.serverapp.strategy.Bulyan and the iterative aggregate_bulyan
# select different updates: near its end the iterative one scores the few remaining updates against a
# single neighbour, and the two outliers are each other's. flower_reference.py checks that they differ.
ROBUST_SEED = 1
BULYAN_DIFFERS_SEED = 3
