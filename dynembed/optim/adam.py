"""Lazy (sparse) Adam."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np

from dynembed.kernels.sparse_updates import adam_update
from dynembed.optim.base import SparseOptimizer, check_eps


@dataclass(frozen=True, kw_only=True)
class Adam(SparseOptimizer):
    """Lazy Adam, as ``torch.optim.SparseAdam``: moments of touched rows only, global step.

    The bias correction uses the table's update count, like SparseAdam and TensorFlow's
    LazyAdam.
    """

    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    """Decay rates of the first and second moments, each in [0, 1)."""
    eps: float = 1e-8
    """Added to the root of the second moment."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_eps("eps", self.eps)
        if (not isinstance(self.betas, (tuple, list)) or len(self.betas) != 2
                or not all(isinstance(b, numbers.Real) and not isinstance(b, bool) and 0 <= b < 1
                            for b in self.betas)):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        # A tuple whatever was given (a list comes back from JSON manifests), so that equal
        # configs compare equal and the frozen config stays hashable.
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))

    def state_width(self, dim: int) -> int:
        return 2 * dim

    def apply(self, weights, state, slots, grads, step) -> None:
        beta1, beta2 = (float(b) for b in self.betas)
        step_size = self.lr * math.sqrt(1 - beta2**step) / (1 - beta1**step)
        f32 = np.float32
        adam_update(weights, state, slots, grads, f32(step_size), self._wd, self._clip,
                    f32(1 - beta1), f32(1 - beta2), f32(self.eps))
