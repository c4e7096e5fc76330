"""Memory sizes as ints or strings with a unit: ``parse_bytes("24GiB")``, ``format_bytes(3 << 30)``.

Binary units (KiB, MiB, GiB, TiB) are powers of 1024; decimal units (KB, MB, GB, TB) are powers of 1000, as
on a GPU's box ("24 GB") and in ``nvidia-smi``. A bare number is bytes; ``B`` is accepted as a suffix.
"""
from __future__ import annotations

import math
import re

_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3, "t": 1000**4, "tb": 1000**4,
    "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40,
}
MAX_BYTES = 1 << 60  # 1 EiB: anything larger is a typo, not a machine
_PATTERN = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*$")


def parse_bytes(value: int | float | str) -> int:
    """Bytes from an int, or a string such as ``"24GiB"``, ``"512 MiB"``, ``"64KiB"``, ``"24GB"``, ``"1.5e9"``."""
    if isinstance(value, bool):
        raise ValueError(f"memory size must be an int or a string with a unit, got {value!r}")
    if isinstance(value, (int, float)):
        return _checked(value, value)
    if not isinstance(value, str):
        raise ValueError(f"memory size must be an int or a string with a unit, got {type(value).__name__} {value!r}")
    m = _PATTERN.match(value)
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _UNITS:
        raise ValueError(
            f"cannot parse memory size {value!r}: expected a number with an optional unit "
            f"(B, KB, MB, GB, TB, KiB, MiB, GiB, TiB), e.g. '24GiB'"
        )
    return _checked(float(m.group(1)) * _UNITS[unit], value)


def _checked(n: int | float, given) -> int:
    if isinstance(n, float) and not math.isfinite(n):
        raise ValueError(f"memory size must be a finite number of bytes, got {given!r}")
    if n < 0:
        raise ValueError(f"memory size must be >= 0, got {given!r}")
    if n > MAX_BYTES:
        raise ValueError(f"memory size {given!r} is larger than 1 EiB: check the number and its unit")
    return int(round(n))


def format_bytes(n: int | float, binary: bool = True) -> str:
    """``format_bytes(25769803776) == "24.0 GiB"``; ``binary=False`` gives GB/MB (powers of 1000)."""
    step, names = (1024.0, ("B", "KiB", "MiB", "GiB", "TiB", "PiB")) if binary else (
        1000.0, ("B", "KB", "MB", "GB", "TB", "PB"))
    x = float(n)
    sign = "-" if x < 0 else ""
    x = abs(x)
    for name in names:
        if x < step or name == names[-1]:
            return f"{sign}{int(x)} B" if name == "B" else f"{sign}{x:.1f} {name}"
        x /= step
    raise AssertionError("unreachable")
