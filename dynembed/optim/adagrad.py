"""Sparse Adagrad, element-wise and row-wise."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dynembed.kernels.sparse_updates import adagrad_update, rowwise_adagrad_update
from dynembed.optim.base import SparseOptimizer, check_eps, check_positive


@dataclass(frozen=True, kw_only=True)
class Adagrad(SparseOptimizer):
    """Element-wise Adagrad on the touched rows, as ``torch.optim.Adagrad`` with sparse grads."""

    eps: float = 1e-10
    """Added to the root of the accumulator."""
    initial_accumulator_value: float = 0.0
    """Starting value of each row's accumulator."""
    lr_decay: float = 0.0
    """``lr / (1 + (step - 1) * lr_decay)``, with ``step`` counted per table."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_eps("eps", self.eps)
        check_positive("initial_accumulator_value", self.initial_accumulator_value,
                       allow_zero=True)
        check_positive("lr_decay", self.lr_decay, allow_zero=True)

    def state_width(self, dim: int) -> int:
        return dim

    def nonnegative_state(self, dim: int) -> slice:
        return slice(0, dim)

    def initial_state(self, dim: int) -> np.ndarray:
        return np.full(dim, self.initial_accumulator_value, dtype=np.float32)

    def apply(self, weights, state, slots, grads, step) -> None:
        clr = self.lr / (1.0 + (step - 1) * self.lr_decay)
        adagrad_update(weights, state, slots, grads, np.float32(clr), self._wd, self._clip,
                       np.float32(self.eps))


@dataclass(frozen=True, kw_only=True)
class RowWiseAdagrad(SparseOptimizer):
    """Row-wise Adagrad: one accumulator per row (the mean of squared gradients), as FBGEMM.

    It needs one float of state per row instead of ``dim``, the usual choice for large tables.
    """

    eps: float = 1e-8
    """Added to the root of the accumulator."""
    initial_accumulator_value: float = 0.0
    """Starting value of each row's accumulator."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_eps("eps", self.eps)
        check_positive("initial_accumulator_value", self.initial_accumulator_value,
                       allow_zero=True)

    def state_width(self, dim: int) -> int:
        return 1

    def nonnegative_state(self, dim: int) -> slice:
        return slice(0, 1)

    def initial_state(self, dim: int) -> np.ndarray:
        return np.full(1, self.initial_accumulator_value, dtype=np.float32)

    def apply(self, weights, state, slots, grads, step) -> None:
        rowwise_adagrad_update(weights, state, slots, grads, np.float32(self.lr), self._wd,
                               self._clip, np.float32(self.eps))
