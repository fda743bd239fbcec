"""The sparse optimizer interface: a config that knows its state layout and update rule.

A sparse optimizer is a small frozen config object. It holds hyperparameters only; the
per-row state (accumulators, moments) lives in the table's row arena, next to the weights,
so one config can serve many tables and a row's state moves with the row (eviction, storage,
checkpoints).
"""

from __future__ import annotations

import abc
import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from dynembed._args import check_positive, is_real, plain_fields

_FLOAT32_TINY = float(np.finfo(np.float32).tiny)
_FLOAT32_MAX = float(np.finfo(np.float32).max)


def check_eps(name: str, value: float) -> None:
    """Raises ValueError naming ``name`` unless ``value`` is a finite number that float32,
    in which the kernels add it to a root, holds as a normal number: a smaller one rounds to
    0 (or nearly), and a zero gradient element then gives 0 / 0, a NaN weight."""
    check_positive(name, value)
    if value < _FLOAT32_TINY:
        raise ValueError(f"{name} must be at least {_FLOAT32_TINY:.4g} (float32's smallest "
                         f"normal number), got {value!r}: the kernels add it in float32, "
                         "where it rounds to 0 and a zero gradient makes the weight NaN; "
                         "use e.g. 1e-10")


@dataclass(frozen=True, kw_only=True)
class SparseOptimizer(abc.ABC):
    """Base of the sparse optimizers: hyperparameters shared by every rule."""

    lr: float
    """Learning rate."""
    weight_decay: float = 0.0
    """L2 penalty added to each touched row's gradient (``g + weight_decay * w``), as in torch
    (``Adam(decoupled_weight_decay=True)`` / ``AdamW`` decay the weights instead)."""
    max_grad_norm: float | None = None
    """If set, each row's combined gradient is rescaled to at most this L2 norm."""

    def __post_init__(self) -> None:
        plain_fields(self)
        check_positive("lr", self.lr)
        check_positive("weight_decay", self.weight_decay, allow_zero=True)
        if self.max_grad_norm is not None:
            check_positive("max_grad_norm", self.max_grad_norm)
        self._check_float32_range()

    def _check_float32_range(self) -> None:
        """Raises ValueError naming the first number field beyond float32's range: the
        kernels compute in float32, where ``lr=1e39`` is inf and every updated row becomes
        NaN or inf without a gradient being counted as bad."""
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if is_real(value) and math.isfinite(value) and abs(value) > _FLOAT32_MAX:
                raise ValueError(f"{field.name} must be within float32's range (about "
                                 f"3.4e38), got {value!r}: the kernels compute in float32, "
                                 "where it is inf")

    @property
    def _clip(self) -> float:
        return 0.0 if self.max_grad_norm is None else float(self.max_grad_norm)

    @property
    def _wd(self) -> np.float32:
        return np.float32(self.weight_decay)

    @abc.abstractmethod
    def state_width(self, dim: int) -> int:
        """Number of float32 state values per row for rows of width ``dim``."""

    def nonnegative_state(self, dim: int) -> slice | None:
        """The columns of a row's state that hold sums of squares (never negative; the
        update takes their square root), or None."""
        return None

    def initial_state(self, dim: int) -> np.ndarray:
        """(state_width,) float32 state of a new row; zeros unless the rule says otherwise."""
        return np.zeros(self.state_width(dim), dtype=np.float32)

    @abc.abstractmethod
    def apply(self, weights: np.ndarray, state: np.ndarray, slots: np.ndarray,
              grads: np.ndarray, step: int) -> None:
        """Updates rows in place.

        Args:
            weights: (capacity, dim) float32 arena weights.
            state: (capacity, state_width) float32 arena optimizer state.
            slots: (u,) int64 unique rows to update.
            grads: (u, dim) float32 combined gradient of each row.
            step: 1-based count of updates this table has applied (for bias correction
                and learning-rate decay).
        """
