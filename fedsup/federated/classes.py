"""``module:Class`` and ``path/to/file.py:Class`` strings, resolved to classes and checked against their use.

A config names its client class and, optionally, a custom strategy this way. A file is imported under its
own name with its directory on ``sys.path``, so that a process started with spawn can import it too.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import sys
import types
from pathlib import Path
from typing import Any

from fedsup.engine.errors import ConfigError
from fedsup.engine.task import Task
from fedsup.federated.problems import did_you_mean, show
from fedsup.federated.strategies import Strategy


def one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"


def is_file_spec(target: str) -> bool:
    return target.endswith(".py") or "/" in target or os.sep in target


def _import_module(name: str) -> types.ModuleType:
    try:
        return importlib.import_module(name)
    except Exception as exc:  # noqa: BLE001 - a module can fail to import in any way; report it as the cause
        raise ConfigError(f"cannot import module {name!r} ({one_line(exc)})") from exc


def _import_file(path: Path) -> types.ModuleType:
    """Import ``path`` under its own name, with its directory on sys.path.

    Tasks are pickled to their processes by reference to their class's module, so a process started with
    spawn must be able to import that module by name: hence the plain name and the sys.path entry.
    """
    if not path.is_file():
        raise ConfigError(f"file {str(path)!r} does not exist")
    name = path.stem
    if not name.isidentifier():
        raise ConfigError(f"{path.name!r} cannot be imported: its name is not a valid Python module name")
    other = _other_module(name, path)
    if other is not None:
        raise ConfigError(f"cannot import {str(path)!r} as module {name!r}: another module of that name exists "
                          f"({other}); rename the file")
    if str(path.parent) not in sys.path:
        sys.path.append(str(path.parent))
    return _import_module(name)


def _other_module(name: str, path: Path) -> str | None:
    """Where a module called ``name`` that is not ``path`` comes from, if there is one."""
    loaded = sys.modules.get(name)
    if loaded is not None:
        origin = getattr(loaded, "__file__", None)
    else:
        importlib.invalidate_caches()  # the file may be new since the last import from its directory
        try:
            found = importlib.util.find_spec(name)
        except Exception:  # noqa: BLE001 - a module that cannot even be found cleanly is still in the way
            return "a module that cannot be inspected"
        if found is None:
            return None
        origin = found.origin
    if origin is None or Path(origin).resolve() != path.resolve():
        return origin or "built in"
    return None


def _attribute(module: types.ModuleType, name: str) -> Any:
    obj: Any = module
    for part in name.split("."):
        if not hasattr(obj, part):
            public = [n for n in dir(obj) if not n.startswith("_")]
            raise ConfigError(f"module {module.__name__!r} has no attribute {name!r}{did_you_mean(part, public)}")
        obj = getattr(obj, part)
    return obj


def _public_name(cls: type) -> str:
    """The name a user imports ``cls`` by: the bases a config names are exported at the top as ``fedsup.X``."""
    if cls in (Task, Strategy):
        return f"fedsup.{cls.__qualname__}"
    return f"{cls.__module__}.{cls.__qualname__}"


def resolve_class(spec: str, base_dir: Path | None, base: type = Task) -> type:
    """The class ``spec`` names: ``"module:Class"`` or ``"path/to/file.py:Class"`` (relative to ``base_dir``).

    It must be a concrete subclass of ``base`` (``fedsup.Task`` unless told otherwise); ConfigError says why not.
    A file is imported under its own name with its directory added to sys.path (see ``_import_file``).
    """
    target, _, name = spec.rpartition(":")
    if not target or not name:
        raise ConfigError(f"expected 'module:Class' or 'path/to/file.py:Class', got {spec!r}")
    if is_file_spec(target):
        module = _import_file(Path(base_dir or Path.cwd(), target))
    else:
        module = _import_module(target)
    obj = _attribute(module, name)
    full = f"{getattr(obj, '__module__', module.__name__)}.{getattr(obj, '__qualname__', name)}"
    if not isinstance(obj, type):
        raise ConfigError(f"{full} is not a class")
    if not issubclass(obj, base):
        raise ConfigError(f"{full} is not a subclass of {_public_name(base)}")
    if inspect.isabstract(obj):
        missing = ", ".join(f"{m}()" for m in sorted(getattr(obj, "__abstractmethods__", ())))
        raise ConfigError(f"{full} is abstract: it does not define {missing}")
    return obj


def class_problems(key: str, spec: str, base: type, args_key: str, args: dict[str, Any],
                    fixed: dict[str, Any]) -> list[str]:
    """What stops ``spec`` from being imported, or from being called with ``fixed`` and ``args``."""
    try:
        cls = resolve_class(spec, None, base=base)
    except ConfigError as exc:
        return [f"{key}: {exc} (got {spec!r})"]
    call = f"{cls.__name__}({', '.join([*(f'{k}={v!r}' for k, v in fixed.items()), f'**{args_key}'])})"
    try:
        inspect.signature(cls).bind(**fixed, **args)
    except TypeError as exc:
        return [f"{args_key}: {call} would fail: {exc} (got {show(args)})"]
    except ValueError:
        pass  # no signature to check against (a class built in C)
    return []
