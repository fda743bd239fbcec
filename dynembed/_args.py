"""Checks of config arguments (policies, optimizers): Python and numpy numbers count, bools
do not (``decay=False`` is a mistake, not 0.0), and every refusal names the argument."""

from __future__ import annotations

import dataclasses
import math
import numbers

import numpy as np


def plain_fields(config) -> None:
    """Replaces numpy scalars among a frozen dataclass's fields with Python numbers, so the
    config prints, compares and serialises (JSON: checkpoints, packages) as if given so."""
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if isinstance(value, np.generic):
            object.__setattr__(config, field.name, value.item())
        elif isinstance(value, (tuple, list)) and any(isinstance(v, np.generic) for v in value):
            object.__setattr__(config, field.name, type(value)(
                v.item() if isinstance(v, np.generic) else v for v in value))


def is_real(value) -> bool:
    """Whether ``value`` is a real number that is not a bool (Python or numpy)."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def check_positive(name: str, value: float, *, allow_zero: bool = False) -> None:
    """Raises ValueError naming ``name`` unless ``value`` is a finite number > 0 (or >= 0).

    Python and numpy numbers count; bools do not (``lr=True`` is a mistake, not 1.0).
    """
    ok = is_real(value) and math.isfinite(value)
    ok = ok and (value >= 0 if allow_zero else value > 0)
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")


def check_bool(name: str, value) -> bool:
    """``value`` as a Python bool; raises TypeError naming ``name`` unless it is a bool
    (Python or numpy): ``read_only="false"`` is truthy, and would quietly do the opposite."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def check_names(name: str, value) -> tuple[str, ...]:
    """``value``, an iterable of str, as a tuple; raises TypeError naming ``name`` for a
    single str (iterating it would give its characters) or items that are not str."""
    if isinstance(value, (str, bytes)):
        raise TypeError(f"{name} must be a list of names, got the single string {value!r}; "
                        f"wrap it: [{value!r}]")
    try:
        names = tuple(value)
    except TypeError:
        raise TypeError(f"{name} must be a list of names, got {type(value).__name__}") from None
    bad = [v for v in names if not isinstance(v, str)]
    if bad:
        raise TypeError(f"{name} must hold str names, got {bad[0]!r}")
    return names


def check_int(name: str, value, minimum: int = 1) -> int:
    """``value`` as a Python int; raises ValueError naming ``name`` unless it is an integer
    (Python or numpy) >= ``minimum``."""
    if not isinstance(value, numbers.Integral) or isinstance(value, (bool, np.bool_)) \
            or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def check_in(name: str, value, low: float, high: float, *, low_open: bool = False,
             high_open: bool = False) -> None:
    """Raises ValueError naming ``name`` unless ``value`` is a number in the interval
    (``low_open``/``high_open`` exclude the bound)."""
    ok = is_real(value) and not math.isnan(value) and (
        value > low if low_open else value >= low) and (
        value < high if high_open else value <= high)
    if not ok:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be a number in {interval}, got {value!r}")


def check_score(name: str, value) -> None:
    """Raises ValueError naming ``name`` unless ``value`` is None or a number (not NaN:
    nothing compares below it, so it would silently never expire a row)."""
    if value is not None and (not is_real(value) or math.isnan(value)):
        raise ValueError(f"{name} must be None or a number, got {value!r}")
