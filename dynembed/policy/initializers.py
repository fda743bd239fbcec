"""Initializers of new rows.

An initializer is a frozen config; the table calls :meth:`Initializer.fill` with the new
rows and their ids. Random initializers are counter-based: with the table's seed, a key's
initial vector depends only on (seed, key), never on insertion order, process or shard.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from dynembed._args import is_real, plain_fields
from dynembed.kernels import init_rows as k

_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _finite(name: str, value: float) -> None:
    # Rows are float32: a parameter beyond its range filled new rows with inf.
    if not is_real(value) or not math.isfinite(value) or abs(value) > _FLOAT32_MAX:
        raise ValueError(f"{name} must be a finite number within the float32 range "
                         f"(|{name}| <= {_FLOAT32_MAX:.4g}), got {value!r}")


def _float32_inside(low: float, high: float, what: str, *,
                    high_open: bool = False) -> tuple[float, float]:
    """The least and greatest float32 values in [low, high] (or [low, high)): rows are
    rounded to float32, which can carry a value drawn inside the bounds outside them.

    The comparisons are made in float64: numpy compares a float32 with a Python float in
    float32, where a bound that is no float32 number equals its rounding, which is how
    Uniform once let values fall below ``low``.

    Raises:
        ValueError: no float32 value lies in the interval.
    """
    first, last = np.float32(low), np.float32(high)
    if float(first) < low:
        first = np.nextafter(first, np.float32(np.inf))
    if high_open or float(last) > high:  # open: the rounding of high is left out too
        last = np.nextafter(last, np.float32(-np.inf))
    if not first <= last:
        raise ValueError(f"no float32 value lies in {what} = [{low!r}, {high!r}"
                         f"{')' if high_open else ']'}; widen it")
    return float(first), float(last)


@dataclass(frozen=True, kw_only=True)
class Initializer:
    """Base of the initializers."""

    def _params(self, dim: int) -> tuple[int, float, float, float, float]:
        raise NotImplementedError

    def check(self, dim: int) -> None:
        """Raises ValueError if this initializer cannot fill rows of width ``dim`` (e.g. a
        Uniform bound left to its 1/sqrt(dim) default that crosses the other bound); tables
        call it when they are configured, before any row exists."""
        self._params(dim)

    def fill(self, weights: np.ndarray, slots: np.ndarray, ids: np.ndarray, seed: int) -> None:
        """Writes initial vectors in place.

        Args:
            weights: (capacity, dim) float32 arena weights.
            slots: (n,) int64 rows to fill.
            ids: (n,) int64 key of each row.
            seed: the table's seed, 0 <= seed < 2**64.
        """
        kind, p0, p1, p2, p3 = self._params(weights.shape[1])
        k.init_rows(weights, slots, ids, np.uint64(seed), kind, p0, p1, p2, p3)


@dataclass(frozen=True, kw_only=True)
class Zeros(Initializer):
    """Every new row starts at zero."""

    def _params(self, dim):
        return k.ZEROS, 0.0, 0.0, 0.0, 0.0


@dataclass(frozen=True, kw_only=True)
class Constant(Initializer):
    """Every element of a new row starts at ``value``."""

    value: float
    """The constant."""

    def __post_init__(self) -> None:
        plain_fields(self)
        _finite("value", self.value)

    def _params(self, dim):
        return k.CONSTANT, float(self.value), 0.0, 0.0, 0.0


@dataclass(frozen=True, kw_only=True)
class Uniform(Initializer):
    """Elements drawn uniformly from [low, high); the default bound is 1/sqrt(dim)."""

    low: float | None = None
    """Lower bound; None means ``-1/sqrt(dim)``."""
    high: float | None = None
    """Upper bound; None means ``1/sqrt(dim)``."""

    def __post_init__(self) -> None:
        plain_fields(self)
        for name in ("low", "high"):
            if getattr(self, name) is not None:
                _finite(name, getattr(self, name))
        if self.low is not None and self.high is not None and not self.low < self.high:
            raise ValueError(f"low must be < high, got low={self.low!r}, high={self.high!r}")

    def _params(self, dim):
        bound = 1.0 / math.sqrt(dim)
        low = -bound if self.low is None else float(self.low)
        high = bound if self.high is None else float(self.high)
        if not low < high:
            raise ValueError(f"low must be < high, got low={low!r}, high={high!r} (a bound "
                             f"left as None is -/+1/sqrt(dim) = -/+{bound:.4g} at dim={dim}); "
                             "give both bounds")
        first, last = _float32_inside(low, high, "[low, high)", high_open=True)
        return k.UNIFORM, low, high, first, last


@dataclass(frozen=True, kw_only=True)
class Normal(Initializer):
    """Elements drawn from N(mean, std^2); the default std is 1/sqrt(dim)."""

    mean: float = 0.0
    """Mean."""
    std: float | None = None
    """Standard deviation; None means ``1/sqrt(dim)``."""

    def __post_init__(self) -> None:
        plain_fields(self)
        _finite("mean", self.mean)
        if self.std is not None:
            _finite("std", self.std)
            if not self.std > 0:
                raise ValueError(f"std must be a finite number > 0, got {self.std!r}")

    def _std(self, dim: int) -> float:
        return 1.0 / math.sqrt(dim) if self.std is None else float(self.std)

    def _params(self, dim):
        return k.NORMAL, float(self.mean), self._std(dim), 0.0, 0.0


_TAIL_LIMIT = 35.0
"""TruncatedNormal cuts, in standard deviations, beyond which float64 quantiles break down
(the normal density underflows near 38)."""


@dataclass(frozen=True, kw_only=True)
class TruncatedNormal(Normal):
    """N(mean, std^2) restricted to [mean + a*std, mean + b*std] (a, b in std units)."""

    a: float = -2.0
    """Lower cut, in standard deviations."""
    b: float = 2.0
    """Upper cut, in standard deviations."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _finite("a", self.a)
        _finite("b", self.b)
        if not self.a < self.b:
            raise ValueError(f"a must be < b, got a={self.a!r}, b={self.b!r}")
        if self.a >= _TAIL_LIMIT or self.b <= -_TAIL_LIMIT:
            raise ValueError(f"the window [a, b] = [{self.a!r}, {self.b!r}] lies beyond "
                             f"{_TAIL_LIMIT:g} standard deviations, where the sampler's "
                             "float64 quantiles fail; shift mean instead")

    def _params(self, dim):
        # Cuts past the limit move to it: the mass beyond is below 1e-260 of the window's.
        a, b = max(float(self.a), -_TAIL_LIMIT), min(float(self.b), _TAIL_LIMIT)
        mean, std = float(self.mean), self._std(dim)
        self._window(mean, std, a, b)  # refuses a window that holds no float32 value
        return k.TRUNCATED_NORMAL, mean, std, a, b

    @staticmethod
    def _window(mean: float, std: float, a: float, b: float) -> tuple[float, float]:
        return _float32_inside(mean + a * std, mean + b * std, "the window "
                               "[mean + a*std, mean + b*std]")

    def fill(self, weights: np.ndarray, slots: np.ndarray, ids: np.ndarray, seed: int) -> None:
        """Writes initial vectors in place (see :meth:`Initializer.fill`), each element in
        [mean + a*std, mean + b*std] after its rounding to float32."""
        super().fill(weights, slots, ids, seed)
        _, mean, std, a, b = self._params(weights.shape[1])
        first, last = self._window(mean, std, a, b)
        # The kernel draws inside the window in float64; where a bound is no float32 number
        # the rounding can step past it (a narrow window: 0.3% of the values), so the new
        # rows are clamped to the float32 values inside, in one batched pass.
        if slots.shape[0]:
            weights[slots] = np.clip(weights[slots], first, last)
