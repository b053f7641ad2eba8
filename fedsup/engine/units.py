"""Byte sizes written the way people write them: 512MiB, 2GiB, 1.5GB, or a plain int."""

from __future__ import annotations

import math
import re
from decimal import Decimal

from fedsup.engine.errors import ConfigError

_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3, "t": 1000**4, "tb": 1000**4,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?|\.\d+)\s*([a-zA-Z]*)\s*$")


def parse_bytes(value: int | float | str | None, field: str = "size") -> int:
    """Return ``value`` in bytes; raise ConfigError naming ``field`` and the value when it is not a size."""
    if value is None:
        return 0
    if isinstance(value, bool):
        raise ConfigError(f"{field}: expected a size such as 512MiB or 2GiB, got {value!r}")
    if isinstance(value, (int, float)):
        if not math.isfinite(value) or value < 0:
            raise ConfigError(f"{field}: a size must be a finite number >= 0, got {value!r}")
        return int(value)
    if isinstance(value, str):
        match = _SIZE.match(value)
        if match and match.group(2).lower() in _UNITS:
            return int(Decimal(match.group(1)) * _UNITS[match.group(2).lower()])
    raise ConfigError(
        f"{field}: expected a size such as 512MiB, 2GiB or 1.5GB (units B, KB, MB, GB, TB, KiB, MiB, GiB, TiB), "
        f"got {value!r}"
    )


def format_bytes(n: int | float | None) -> str:
    """Render bytes for people: 1.5 GiB, 512 MiB, 12 KiB."""
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(size) < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"
