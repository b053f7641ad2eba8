"""``--set KEY=VALUE`` overrides: each sets one key of a config's data before it is checked.

The value is read as YAML (``10``, ``cpu``, ``[0, 1]``); the key path is checked against the schema as it
is walked, so a misspelt key is named with a did-you-mean instead of being added silently.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any, get_origin

import yaml
from pydantic import BaseModel

from fedsup.federated.problems import YamlBoundsError, did_you_mean, fields_of, load_yaml, model_in, show, yaml_reason


def _override_target(data: dict[str, Any], parts: list[str]) -> tuple[dict[str, Any] | None, str | None]:
    """The mapping the last key of ``parts`` goes into, made where missing; or a problem."""
    target = data
    for i, part in enumerate(parts[:-1]):
        child = target.get(part)
        if child is None:
            child = target[part] = {}
        if not isinstance(child, dict):
            path = ".".join(parts[:i + 1])
            return None, f"{path}: cannot set keys inside it: it is not a mapping (got {show(child)})"
        target = child
    return target, None


def _override_path_problem(root: type[BaseModel], parts: list[str]) -> str | None:
    model: type[BaseModel] | None = root
    for i, part in enumerate(parts):
        if model is None:
            return None  # inside a free-form mapping such as task.args
        fields = fields_of(model)
        path = ".".join(parts[:i + 1])
        if part not in fields:
            return f"{path}: unknown key{did_you_mean(part, list(fields))}"
        annotation = fields[part]
        model = model_in(annotation, through_lists=False)
        if model is None and get_origin(annotation) is not dict and i < len(parts) - 1:
            return f"{path}: holds a single value; set it whole, as {path}=VALUE"
    return None


def _apply_one(root: type[BaseModel], data: dict[str, Any], override: str) -> str | None:
    key, sep, raw = override.partition("=")
    key = key.strip()
    if not sep or not key:
        return f"{override!r}: expected an override KEY=VALUE such as federation.rounds=10"
    try:
        value, _ = load_yaml(raw)  # bounded like a config file: a value can be an alias bomb too
    except yaml.YAMLError as exc:
        return f"{key}: the value is not YAML: {yaml_reason(exc)} (got {raw!r})"
    except YamlBoundsError as exc:
        return f"{key}: {exc} (got {show(raw)})"
    parts = key.split(".")
    problem = _override_path_problem(root, parts)
    if problem:
        return problem
    target, problem = _override_target(data, parts)
    if target is not None:
        target[parts[-1]] = value
    return problem


def apply(root: type[BaseModel], data: dict[str, Any], overrides: Sequence[str]) -> tuple[dict[str, Any], list[str]]:
    """A copy of ``data`` with each ``"a.b.c=value"`` set (the value read as YAML), and a line per override
    that could not be: a malformed one, or a key path the model ``root`` does not have."""
    data = copy.deepcopy(data)
    problems = [p for override in overrides if (p := _apply_one(root, data, override))]
    return data, problems
