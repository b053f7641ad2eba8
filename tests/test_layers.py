"""The package's folders are its layers: engine, then cluster, then federated, then ui. A module imports only
its own layer and the ones below it; nothing but the entry point imports the ui; no module inside the layers
goes through the top-level API or the compatibility modules (``fedsup.aggregation`` and friends).

Read from the source with ``ast``, so every import counts, those inside functions included."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "fedsup"

# Each layer, and the layers it may import (itself included).
ALLOWED: dict[str, set[str]] = {
    "engine": {"engine"},
    "cluster": {"engine", "cluster"},
    "federated": {"engine", "cluster", "federated"},
    "ui": {"engine", "cluster", "federated", "ui"},
    "examples": {"engine", "federated", "api", "examples"},  # user code: the public API, never the ui
    "api": {"engine", "cluster", "federated"},  # fedsup/__init__.py (it registers the ray backend) and the
    # compatibility modules
    "entry": {"ui"},  # fedsup/__main__.py
    "compat": {"engine", "compat"},  # other tools' APIs (fedflow's) on the engine
}
LAYERS = ("engine", "cluster", "federated", "ui", "examples")
TOP_LEVEL = {"__init__", "aggregation", "partition", "config", "algorithms"}


def layer_of_file(path: Path) -> str:
    """The layer of a source file under ``fedsup/``."""
    parts = path.relative_to(PACKAGE).parts
    if len(parts) > 1:
        return parts[0]
    return "entry" if parts[0] == "__main__.py" else "api"


def layer_of_module(name: str) -> str | None:
    """The layer a ``fedsup...`` module name belongs to, or None for a module outside fedsup."""
    parts = name.split(".")
    if parts[0] != "fedsup":
        return None
    if len(parts) == 1 or parts[1] in TOP_LEVEL:
        return "api"
    if parts[1] == "__main__":
        return "entry"
    return parts[1]


def imported_modules(tree: ast.AST, module: str, is_package: bool) -> Iterator[tuple[int, str]]:
    """Every module an ``import`` or ``from ... import`` in ``tree`` names, with its line."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            yield node.lineno, absolute(node, module, is_package)


def absolute(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def violations(source: str, path: Path) -> list[str]:
    """What the module at ``path`` imports that its layer may not."""
    relative = path.relative_to(PACKAGE).with_suffix("")
    is_package = relative.name == "__init__"
    module = ".".join(("fedsup", *relative.parts[:-1])) if is_package else ".".join(("fedsup", *relative.parts))
    layer = layer_of_file(path)
    found = []
    for line, name in imported_modules(ast.parse(source), module, is_package):
        target = layer_of_module(name)
        if target is not None and target not in ALLOWED[layer]:
            found.append(f"{path.relative_to(PACKAGE.parent)}:{line}: the {layer} layer imports {name} ({target})")
    return found


def sources() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_every_module_imports_only_its_own_layer_and_those_below() -> None:
    problems = [problem for path in sources() for problem in violations(path.read_text(), path)]
    assert not problems, "\n".join(problems)


def test_every_layer_says_what_it_holds_and_may_import() -> None:
    for layer in ("engine", "cluster", "federated", "ui"):
        docstring = ast.get_docstring(ast.parse((PACKAGE / layer / "__init__.py").read_text())) or ""
        assert "May import" in docstring, f"fedsup/{layer}/__init__.py: the docstring must say what it may import"


def test_every_source_file_belongs_to_a_known_layer() -> None:
    for path in sources():
        assert layer_of_file(path) in ALLOWED, path


@pytest.mark.parametrize(("where", "source", "expected"), [
    ("engine/scheduler.py", "from fedsup.federated.rounds import X\n", "engine layer imports fedsup.federated"),
    ("engine/scheduler.py", "def f():\n    import fedsup.ui.cli\n", "engine layer imports fedsup.ui.cli"),
    ("engine/scheduler.py", "from fedsup import Task\n", "engine layer imports fedsup (api)"),
    ("engine/scheduler.py", "from .. import federated\n", "engine layer imports fedsup (api)"),
    ("cluster/agent.py", "from fedsup.federated import rounds\n", "cluster layer imports fedsup.federated"),
    ("federated/rounds.py", "from fedsup.ui.live import LiveView\n", "federated layer imports fedsup.ui.live"),
    ("federated/rounds.py", "from fedsup.aggregation import FedAvg\n", "imports fedsup.aggregation (api)"),
    ("federated/rounds.py", "from ..ui import live\n", "federated layer imports fedsup.ui"),
    ("examples/synthetic.py", "from fedsup.ui import report\n", "examples layer imports fedsup.ui"),
    ("__init__.py", "from fedsup.ui.cli import main\n", "api layer imports fedsup.ui.cli"),
])
def test_the_check_sees_an_upward_import(where: str, source: str, expected: str) -> None:
    found = violations(source, PACKAGE / where)
    assert len(found) == 1 and expected in found[0], found


@pytest.mark.parametrize(("where", "source"), [
    ("federated/rounds.py", "from fedsup.engine.scheduler import Scheduler\nimport torch\n"),
    ("federated/rounds.py", "from . import strategies\nfrom .strategies import FedAvg\n"),
    ("ui/cli.py", "from fedsup.federated.runner import run\nfrom fedsup.engine import devices\n"),
    ("__main__.py", "from fedsup.ui.cli import main\n"),
    ("aggregation.py", "from fedsup.federated.strategies import Strategy\n"),
])
def test_the_check_lets_downward_imports_through(where: str, source: str) -> None:
    assert violations(source, PACKAGE / where) == []
