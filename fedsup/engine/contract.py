"""A client's update against the federated contract: the global model's keys, shapes and dtypes, and finite
values.

Checked where the update arrives, in the client's own process (``worker.federated_result``, before the
update is saved and before the job can be recorded FINISHED), so that a broken update fails its job with the
``contract`` kind: never retried blindly, and run again by ``--resume`` once the client's code is fixed.
The main process checks every update it reads back once more (``fedsup.federated.rounds``): a resumed run
trusts no file it has not checked.

The contract travels to the child in the job's context, under ``UPDATE_CONTRACT``: a small dict made by
``update_contract`` from the round's global model, so that the child needs nothing else to check against.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

#: The job-context key that carries the contract to the client's process.
UPDATE_CONTRACT = "_fedsup_update_contract"
_SHOWN = 3  # problems named in one message; keys named per problem


def describe(state: Mapping[str, Any]) -> dict[str, tuple[list[int], str]]:
    """Each key's shape and dtype, as the contract holds them."""
    return {str(k): (list(v.shape), str(v.dtype)) for k, v in state.items()}


def update_contract(client: str, reference: Mapping[str, Any] | dict[str, tuple[list[int], str]] | None,
                    reject_nonfinite: bool = True) -> dict[str, Any]:
    """The contract for ``client``'s update: ``reference`` is the global model (tensors) or its ``describe``;
    None where there is no global model yet (the first round without ``initial_state``): finite values only."""
    keys = None
    if reference is not None:
        keys = {str(k): (list(v[0]), str(v[1])) if isinstance(v, tuple) else (list(v.shape), str(v.dtype))
                for k, v in reference.items()}
    return {"client": client, "keys": keys, "reject_nonfinite": bool(reject_nonfinite)}


def _names(keys: list[str]) -> str:
    shown = ", ".join(repr(k) for k in keys[:_SHOWN])
    return shown + (f" and {len(keys) - _SHOWN} more" if len(keys) > _SHOWN else "")


def _shape(shape: Any) -> str:
    return "[" + ", ".join(str(int(n)) for n in shape) + "]"


def check_update(state: Any, contract: Mapping[str, Any] | None) -> str | None:
    """What is wrong with ``state`` (a client's ``{"name": tensor}`` update) under ``contract``, as one line
    naming the client, the keys and the shapes; None when nothing is (or there is no contract to check).

    Anything that is not a dict of tensors is left to the caller's own checks (``federated_result``)."""
    if not contract or not isinstance(state, Mapping):
        return None
    import torch

    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        return None
    problems: list[str] = []
    expected = contract.get("keys")
    if expected is not None:
        missing = sorted(set(expected) - set(state))
        extra = sorted(set(state) - set(expected))
        if missing:
            problems.append(f"missing key(s) {_names(missing)}")
        if extra:
            problems.append(f"extra key(s) {_names(extra)} not in the global model")
        for key in sorted(set(state) & set(expected)):
            shape, dtype = expected[key]
            tensor = state[key]
            if list(tensor.shape) != list(shape):
                problems.append(f"key {key!r} has shape {_shape(tensor.shape)}, the global model's is {_shape(shape)}")
            elif str(tensor.dtype) != dtype:
                problems.append(f"key {key!r} has dtype {tensor.dtype}, the global model's is {dtype} "
                                f"(shape {_shape(shape)})")
    if contract.get("reject_nonfinite", True):
        for key in sorted(state):
            tensor = state[key]
            if tensor.layout != torch.strided or not (tensor.is_floating_point() or tensor.is_complex()):
                continue
            finite = torch.isfinite(tensor)
            if bool(finite.all()):
                continue
            nan = int(torch.isnan(tensor).sum())
            inf = int(tensor.numel() - int(finite.sum()) - nan)
            problems.append(f"key {key!r} (shape {_shape(tensor.shape)}) holds {nan} NaN and {inf} Inf of "
                            f"{tensor.numel()} values (federation.reject_nonfinite: false accepts them)")
    if not problems:
        return None
    more = f"; and {len(problems) - _SHOWN} more problem(s)" if len(problems) > _SHOWN else ""
    return (f"{contract.get('client', 'the client')}'s update breaks the federated contract: "
            + "; ".join(problems[:_SHOWN]) + more)
