"""Reading YAML with bounds: a config is data from anywhere, so reading it must not cost more than its size
suggests. A size limit on the file, and a limit on the values aliases add, checked on the parsed nodes
before anything is expanded; both can be raised through environment variables.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from fedsup.engine.errors import ConfigError

MAX_BYTES_VARIABLE = "FEDSUP_YAML_MAX_BYTES"
MAX_ALIAS_VALUES_VARIABLE = "FEDSUP_YAML_MAX_ALIAS_VALUES"
DEFAULT_MAX_BYTES = 2**20  # a config is a few KiB: 1 MiB leaves room and reads in about a second
DEFAULT_MAX_ALIAS_VALUES = 100_000

# libyaml's parser when PyYAML has it: it reads a large file tens of times faster than the pure-Python one
Loader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class YamlBoundsError(ValueError):
    """YAML that is over a limit: too large, or aliases that expand it far beyond what is written."""


class YamlLimitError(ConfigError):
    """A limit's environment variable that is not a whole number >= 0."""


def yaml_limit(variable: str, default: int) -> int:
    """A bound on reading YAML: ``default``, or the whole number in the environment variable ``variable``."""
    raw = os.environ.get(variable)
    if raw is None or not raw.strip():
        return default
    try:
        value = int(raw.replace("_", ""))
    except ValueError:
        value = -1
    if value < 0:
        raise YamlLimitError(f"{variable}: expected a whole number of at least 0 (got {raw[:100]!r})")
    return value


def expanded_size(root: yaml.Node) -> tuple[int, int]:
    """The node count of ``root`` with every alias expanded, and the count of nodes written. Each collection
    is sized once (memoised), so this takes time in the nodes written, not in the expansion."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()
    written = 0

    def size(node: yaml.Node) -> int:
        nonlocal written
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in open_nodes:
            raise YamlBoundsError("a value contains itself through an alias (a recursive structure)")
        open_nodes.add(key)
        children = node.value if isinstance(node, yaml.SequenceNode) else [p for pair in node.value for p in pair]
        written += len(children)  # the node itself was counted by its parent, the root below
        total = 1
        for child in children:  # scalars are most nodes: counted here rather than in a call each
            total += 1 if isinstance(child, yaml.ScalarNode) else size(child)
        open_nodes.discard(key)
        sizes[key] = total
        return total

    if isinstance(root, yaml.ScalarNode):
        return 1, 1
    total = size(root)
    return total, written + 1


def check_aliases(node: yaml.Node) -> None:
    limit = yaml_limit(MAX_ALIAS_VALUES_VARIABLE, DEFAULT_MAX_ALIAS_VALUES)
    expanded, written = expanded_size(node)
    if expanded - written > limit:
        extra = expanded - written
        raise YamlBoundsError(f"its aliases expand it by {extra:,} value{'s' if extra != 1 else ''}, more than "
                              f"the limit of {limit:,} (set {MAX_ALIAS_VALUES_VARIABLE} to raise it)")


def size_problem(size: int) -> str | None:
    limit = yaml_limit(MAX_BYTES_VARIABLE, DEFAULT_MAX_BYTES)
    if size > limit:
        return f"more than the limit of {limit:,} bytes of YAML (set {MAX_BYTES_VARIABLE} to raise it)"
    return None


def read_bounded(path: Path) -> bytes:
    """The file's bytes, no more than one past the size limit (a FIFO or /dev/zero has no size to check)."""
    limit = yaml_limit(MAX_BYTES_VARIABLE, DEFAULT_MAX_BYTES)
    with path.open("rb") as file:
        return file.read(limit + 1)


@contextmanager
def parsed(text: str) -> Iterator[tuple[Any, yaml.Node | None]]:
    """The loader and the document's node (None for an empty one), within the bounds: YamlBoundsError where
    ``text`` is over the size limit or its aliases add more values than the limit, before anything is
    expanded; yaml.YAMLError where it is not YAML."""
    problem = size_problem(len(text))
    if problem:
        raise YamlBoundsError(problem)
    loader = Loader(text)
    try:
        node = loader.get_single_node()
        if node is not None:
            check_aliases(node)
        yield loader, node
    finally:
        loader.dispose()


def safe_load_bounded(text: str) -> Any:
    """``yaml.safe_load(text)`` within the bounds (see ``parsed``)."""
    with parsed(text) as (loader, node):
        return None if node is None else loader.construct_document(node)
