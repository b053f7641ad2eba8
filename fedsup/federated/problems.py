"""Config problems: how everything wrong with a config is found and worded, one line per problem.

Every line reads ``<key.path>: <what is wrong> (got <value>)``: pydantic's errors are turned into such lines
(unknown keys with a did-you-mean, missing keys, wrong types), and so are YAML's (with the file, line and
column). A validator that finds several problems raises them together (``raise_problems``), each under
its own key path. Nothing here knows the config's schema: it is handed the root model.
"""

from __future__ import annotations

import difflib
import re
import types
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Union, get_args, get_origin

import yaml
from pydantic import BaseModel
from pydantic_core import ErrorDetails, PydanticCustomError

from fedsup.engine.errors import ConfigError
from fedsup.engine.yamlbounds import YamlBoundsError, YamlLimitError, parsed, read_bounded, size_problem

Loc = tuple[str | int, ...]


Problem = tuple[Loc, str, Any]


class ConfigProblems(ConfigError):
    """Everything wrong with one config; ``problems`` holds one ``<key.path>: <what> (got <value>)`` each."""

    def __init__(self, problems: Sequence[str], origin: str | None = None) -> None:
        self.problems = list(problems)
        self.origin = origin
        count = f"{len(self.problems)} problem{'s' if len(self.problems) != 1 else ''}"
        where = f"config {origin}" if origin else "config"
        super().__init__(f"{where} has {count}:\n" + "\n".join(f"  {p}" for p in self.problems))

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.problems, self.origin))


def show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 100 else text[:97] + "..."


def suggest(word: Any, choices: Sequence[str]) -> str | None:
    matches = difflib.get_close_matches(str(word), list(choices), n=1)
    return matches[0] if matches else None


def did_you_mean(word: Any, choices: Sequence[str]) -> str:
    match = suggest(word, choices)
    return f"; did you mean {match!r}?" if match else ""


def raise_problems(problems: list[Problem]) -> None:
    """Raise several problems from one validator; ``problem_lines`` unpacks them with their own key paths."""
    if problems:
        raise PydanticCustomError("fedsup_problems", "{count} problems", {"count": len(problems), "problems": problems})


_MESSAGES = {
    "int_type": "expected a whole number",
    "int_from_float": "expected a whole number",
    "float_type": "expected a number",
    "finite_number": "expected a finite number",
    "bool_type": "expected true or false",
    "string_type": "expected a string",
    "dict_type": "expected a mapping",
    "model_type": "expected a mapping of keys",
    "model_attributes_type": "expected a mapping of keys",
    "list_type": "expected a list",
    "invalid_key": "keys must be strings",
    "too_short": "expected at least {min_length} item(s)",
    "greater_than_equal": "must be at least {ge}",
    "greater_than": "must be more than {gt}",
    "less_than_equal": "must be at most {le}",
    "less_than": "must be less than {lt}",
    "literal_error": "expected {expected}",
}


def key_path(loc: Loc) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) and text else (f".{part}" if text else str(part))
    return text or "(top level)"


def _clean_loc(loc: tuple[Any, ...], union_tags: Mapping[str, Collection[str]]) -> Loc:
    """Drop the union tags pydantic puts into locations (``supervisor.devices.described.0``)."""
    out: list[str | int] = []
    for part in loc:
        if out and part in union_tags.get(str(out[-1]), ()):
            continue
        out.append(part if isinstance(part, (str, int)) else str(part))
    return tuple(out)


def section_at(root: type[BaseModel], loc: Loc) -> type[BaseModel] | None:
    """The model that describes the mapping at ``loc`` (list positions included), or None where none does."""
    model: type[BaseModel] | None = root
    for part in loc:
        if isinstance(part, int):
            continue
        field = fields_of(model).get(part)
        model = model_in(field, through_lists=True) if field is not None else None
    return model


def fields_of(model: type[BaseModel] | None) -> dict[str, Any]:
    """A model's keys as written in YAML (aliases), each with its annotation."""
    if model is None:
        return {}
    return {f.alias or name: f.annotation for name, f in model.model_fields.items()}


def model_in(annotation: Any, through_lists: bool) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    origin = get_origin(annotation)
    if origin not in (Union, types.UnionType, Annotated, list) or (origin is list and not through_lists):
        return None
    found = [m for arg in get_args(annotation) if (m := model_in(arg, through_lists)) is not None]
    return found[0] if found else None


def _unknown_key_line(root: type[BaseModel], loc: Loc) -> tuple[str, str | None]:
    known = list(fields_of(section_at(root, loc[:-1])))
    match = suggest(loc[-1], known)
    hint = f"; did you mean {match!r}?" if match else f" (known keys: {', '.join(known)})"
    return f"{key_path(loc)}: unknown key{hint}", match


def _message(error: ErrorDetails, shapes: Mapping[str, str]) -> str:
    kind = error["type"]
    if kind not in _MESSAGES:
        return error["msg"]
    shape = shapes.get(str((error.get("ctx") or {}).get("class_name")))
    if kind == "model_type" and shape:
        return shape
    message = _MESSAGES[kind].format_map(error.get("ctx") or {})
    if kind == "literal_error" and isinstance(error["input"], str):
        choices = re.findall(r"'([^']*)'", str((error.get("ctx") or {}).get("expected", "")))
        message += did_you_mean(error["input"], choices)
    return message


def problem_lines(errors: list[ErrorDetails], root: type[BaseModel],
                  union_tags: Mapping[str, Collection[str]] | None = None,
                  shapes: Mapping[str, str] | None = None) -> list[str]:
    """One line per problem in pydantic's ``errors`` for a model ``root``. ``union_tags``: per key, the tags of
    a discriminated union to leave out of key paths; ``shapes``: per model class, what a value should look like."""
    lines: list[str] = []
    suggested: set[Loc] = set()  # keys an unknown key was taken for: their "missing" would only repeat it
    missing: list[Loc] = []
    for error in errors:
        loc = _clean_loc(error["loc"], union_tags or {})
        if error["type"] == "fedsup_problems":
            ctx = error.get("ctx") or {}
            lines += [f"{key_path(loc + sub)}: {what} (got {show(value)})" for sub, what, value in ctx["problems"]]
        elif error["type"] == "extra_forbidden":
            line, match = _unknown_key_line(root, loc)
            lines.append(line)
            if match:
                suggested.add((*loc[:-1], match))
        elif error["type"] == "missing":
            missing.append(loc)
        else:
            if loc and loc[-1] == "[key]":
                loc = loc[:-1]
            lines.append(f"{key_path(loc)}: {_message(error, shapes or {})} (got {show(error['input'])})")
    lines += [f"{key_path(loc)}: required key is missing" for loc in missing if loc not in suggested]
    return lines


def _mark(origin: str, mark: Any) -> str:
    return f"{origin}, line {mark.line + 1}, column {mark.column + 1}" if mark is not None else origin


def yaml_reason(exc: yaml.YAMLError) -> str:
    if isinstance(exc, yaml.constructor.ConstructorError) and "constructor for the tag" in str(exc.problem):
        found = re.search(r"'([^']*)'", str(exc.problem))
        tag = found.group(1).replace("tag:yaml.org,2002:", "!!") if found else ""
        return (f"unsafe or unknown YAML tag {tag!r}: unsafe tags such as "
                "!!python/object are not allowed (configs are read with yaml.safe_load)")
    if isinstance(exc, yaml.MarkedYAMLError):
        return "YAML syntax error: " + " ".join(f"{exc.context or ''} {exc.problem or ''}".split())
    return f"not valid YAML: {' '.join(str(exc).split())}"


def _yaml_problem(exc: yaml.YAMLError, origin: str) -> str:
    return f"{_mark(origin, getattr(exc, 'problem_mark', None))}: {yaml_reason(exc)}"


def _duplicate_keys(node: Any, loc: Loc, seen_nodes: set[int]) -> list[str]:
    """Keys written twice in one mapping: yaml.safe_load keeps the last silently, which hides a typo."""
    if isinstance(node, yaml.ScalarNode) or id(node) in seen_nodes:
        return []
    seen_nodes.add(id(node))
    lines: list[str] = []
    if isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines += _duplicate_keys(item, (*loc, i), seen_nodes)
    if isinstance(node, yaml.MappingNode):
        first_line: dict[str, int] = {}
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            if key is None or key == "<<":
                continue
            line = key_node.start_mark.line + 1
            if key in first_line:
                lines.append(f"{key_path((*loc, key))}: key written twice (lines {first_line[key]} and {line})")
            first_line.setdefault(key, line)
            lines += _duplicate_keys(value_node, (*loc, key), seen_nodes)
    return lines


def load_yaml(text: str) -> tuple[Any, list[str]]:
    """The data in ``text`` (as yaml.safe_load reads it) and a line per key written twice, parsed once.

    Raises YamlBoundsError where ``text`` is over the size limit or its aliases expand it by more values
    than the limit, before anything is expanded; yaml.YAMLError where it is not YAML.
    """
    with parsed(text) as (loader, node):
        if node is None:
            return None, []
        duplicates = _duplicate_keys(node, (), set())  # before constructing: merge keys rewrite the nodes
        return loader.construct_document(node), duplicates


def parse_yaml(text: str, origin: str) -> Any:
    try:
        data, duplicates = load_yaml(text)
    except yaml.YAMLError as exc:
        raise ConfigProblems([_yaml_problem(exc, origin)], origin) from None
    except YamlBoundsError as exc:
        raise ConfigProblems([f"{origin}: {exc}"], origin) from None
    except YamlLimitError as exc:
        raise ConfigProblems([str(exc)]) from None
    except RecursionError:
        raise ConfigProblems([f"{origin}: the YAML is nested too deeply"], origin) from None
    if duplicates:
        raise ConfigProblems(duplicates, origin)
    return data


def read_file(path: Path) -> Any:
    origin = str(path)
    try:
        raw = read_bounded(path)
    except FileNotFoundError:
        raise ConfigProblems([f"{origin}: no such config file"], origin) from None
    except IsADirectoryError:
        raise ConfigProblems([f"{origin}: is a directory, not a config file"], origin) from None
    except OSError as exc:
        raise ConfigProblems([f"{origin}: cannot be read ({exc.strerror})"], origin) from None
    except YamlLimitError as exc:  # a ValueError too: before the next clause
        raise ConfigProblems([str(exc)]) from None
    except ValueError as exc:  # a path with a NUL byte in it
        raise ConfigProblems([f"{origin!r}: cannot be read ({exc})"], origin) from None
    problem = size_problem(len(raw))
    if problem:
        raise ConfigProblems([f"{origin}: {problem}"], origin)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigProblems([f"{origin}: not a YAML file (it is not UTF-8 text)"], origin) from None
    data = parse_yaml(text, origin)
    if data is None:
        raise ConfigProblems([f"{origin}: the file is empty; expected a mapping with name, task and federation"],
                             origin)
    return data
