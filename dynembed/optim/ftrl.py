"""FTRL-Proximal."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dynembed.kernels.sparse_updates import ftrl_update
from dynembed.optim.base import SparseOptimizer, check_positive


@dataclass(frozen=True, kw_only=True)
class FTRL(SparseOptimizer):
    """FTRL-Proximal (McMahan et al., "Ad Click Prediction", KDD 2013), per coordinate.

    ``lr`` is the paper's alpha. L1 drives rarely useful coordinates to exactly zero.
    """

    beta: float = 1.0
    """The paper's beta, smoothing the per-coordinate learning rate."""
    l1: float = 0.0
    """L1 regularisation strength (sparsity)."""
    l2: float = 0.0
    """L2 regularisation strength."""
    initial_accumulator_value: float = 0.1
    """Starting value of n, as in TensorFlow's Ftrl."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("beta", self.beta, allow_zero=True)
        check_positive("l1", self.l1, allow_zero=True)
        check_positive("l2", self.l2, allow_zero=True)
        check_positive("initial_accumulator_value", self.initial_accumulator_value,
                       allow_zero=True)
        if self.beta == 0 and self.l2 == 0 and self.initial_accumulator_value == 0:
            # The weight's denominator is (beta + sqrt(n)) / alpha + l2: with all three 0 it
            # is 0 for a coordinate whose squared gradients underflow (n stays 0, z not).
            raise ValueError("beta, l2 and initial_accumulator_value are all 0, so a weight "
                             "can divide by zero; make beta > 0 (the default is 1.0), l2 > 0 "
                             "or initial_accumulator_value > 0")

    def state_width(self, dim: int) -> int:
        return 2 * dim

    def nonnegative_state(self, dim: int) -> slice:
        return slice(dim, 2 * dim)  # n, the sums of squared gradients

    def initial_state(self, dim: int) -> np.ndarray:
        state = np.zeros(2 * dim, dtype=np.float32)
        state[dim:] = self.initial_accumulator_value
        return state

    def apply(self, weights, state, slots, grads, step) -> None:
        ftrl_update(weights, state, slots, grads, float(self.lr), float(self.weight_decay),
                    self._clip, float(self.beta), float(self.l1), float(self.l2))
