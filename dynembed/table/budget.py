"""Memory budgets: "2GiB"-style sizes and how many rows fit in them."""

from __future__ import annotations

import re

import numpy as np

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")


def parse_bytes(value: str | int, arg: str = "memory_budget") -> int:
    """Bytes of a size given as an int or a string such as "2GiB", "512MB" or "1.5 GiB".

    Raises:
        ValueError: not a positive size with a known unit (B, KB, MB, GB, TB, KiB, MiB, GiB,
            TiB).
    """
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        value = int(value)
        if value <= 0:
            raise ValueError(f"{arg} must be > 0 bytes, got {value}")
        return value
    match = _SIZE.match(value) if isinstance(value, str) else None
    if match is None or match.group(2).upper() not in _UNITS:
        raise ValueError(f"{arg} must be a size such as '2GiB', '512MB' or an int of bytes, "
                         f"got {value!r}")
    unit = _UNITS[match.group(2).upper()]
    if unit == 1 and not float(match.group(1)).is_integer():
        raise ValueError(f"{arg} of {value!r} is a fraction of a byte; give a whole number of "
                         "bytes or a unit, e.g. '1.5GiB'")
    size = int(float(match.group(1)) * unit)
    if size <= 0:
        raise ValueError(f"{arg} must be > 0 bytes, got {value!r}")
    return size


def rows_within(budget: int, cost) -> int:
    """The largest row count whose ``cost(rows)`` (bytes, non-decreasing) fits ``budget``."""
    lo, hi = 0, max(1, budget)
    while lo < hi:  # cost(rows) >= rows, so the answer is below budget
        mid = (lo + hi + 1) // 2
        if cost(mid) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo
