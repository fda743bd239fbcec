"""Sparse SGD with optional lazy momentum."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dynembed.kernels.sparse_updates import sgd_update
from dynembed.optim.base import SparseOptimizer, check_positive


@dataclass(frozen=True, kw_only=True)
class SGD(SparseOptimizer):
    """Stochastic gradient descent on the touched rows, as ``torch.optim.SGD``.

    Momentum is lazy: a row's momentum buffer decays only when the row is touched, which is
    the standard choice for sparse tables (a dense buffer would move every row every step).
    """

    momentum: float = 0.0
    """Momentum factor in [0, 1)."""
    dampening: float = 0.0
    """Dampening for momentum, as in torch."""
    nesterov: bool = False
    """Nesterov momentum (needs momentum > 0 and dampening == 0)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("momentum", self.momentum, allow_zero=True)
        if self.momentum >= 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum!r}")
        check_positive("dampening", self.dampening, allow_zero=True)
        if not isinstance(self.nesterov, bool):
            raise TypeError(f"nesterov must be True or False, got {self.nesterov!r}")
        if self.nesterov and (self.momentum <= 0 or self.dampening != 0):
            raise ValueError("nesterov=True needs momentum > 0 and dampening == 0; "
                             f"got momentum={self.momentum!r}, dampening={self.dampening!r}")

    def state_width(self, dim: int) -> int:
        # With dampening, one more value per row records whether its buffer has started.
        if not self.momentum:
            return 0
        return dim + 1 if self.dampening else dim

    def apply(self, weights, state, slots, grads, step) -> None:
        f32 = np.float32
        sgd_update(weights, state, slots, grads, f32(self.lr), self._wd, self._clip,
                   f32(self.momentum), f32(1 - self.dampening), bool(self.nesterov))
