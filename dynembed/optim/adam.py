"""Lazy (sparse) Adam, with L2 or decoupled (AdamW) weight decay."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np

from dynembed.kernels.sparse_updates import adam_update
from dynembed.optim.base import _FLOAT32_TINY, SparseOptimizer, check_eps


@dataclass(frozen=True, kw_only=True)
class Adam(SparseOptimizer):
    """Lazy Adam, as ``torch.optim.SparseAdam``: moments of touched rows only, global step.

    The bias correction uses the table's update count, like SparseAdam and TensorFlow's
    LazyAdam.

    ``weight_decay`` is an L2 penalty added to the gradient, as in ``torch.optim.Adam``; with
    ``decoupled_weight_decay=True`` (or :func:`AdamW`) each touched row is instead multiplied
    by ``1 - lr * weight_decay`` before its Adam step, and ``eps`` is added after the bias
    correction, both as in ``torch.optim.AdamW``. Like the moments, the decay is lazy: rows
    a batch does not touch keep their values.
    """

    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    """Decay rates of the first and second moments, each in [0, 1)."""
    eps: float = 1e-8
    """Added to the root of the second moment."""
    decoupled_weight_decay: bool = False
    """Apply ``weight_decay`` to the weights directly (AdamW) instead of to the gradient."""

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
        if not isinstance(self.decoupled_weight_decay, bool):
            raise TypeError(f"decoupled_weight_decay must be True or False, got "
                            f"{self.decoupled_weight_decay!r}")

    def state_width(self, dim: int) -> int:
        return 2 * dim

    def nonnegative_state(self, dim: int) -> slice:
        return slice(dim, 2 * dim)  # the second moments

    def apply(self, weights, state, slots, grads, step) -> None:
        beta1, beta2 = (float(b) for b in self.betas)
        step_size = self.lr * math.sqrt(1 - beta2**step) / (1 - beta1**step)
        f32 = np.float32
        if self.decoupled_weight_decay:
            # torch's AdamW: w *= 1 - lr * wd, then the step, whose eps is added after the
            # bias correction (sqrt(v) / sqrt(1 - beta2**t) + eps), where SparseAdam adds it
            # before: the kernel's form with eps * sqrt(1 - beta2**t) (with gradients near
            # 1e-7 the two differ by 3x at step 1)
            l2, keep = f32(0), f32(1 - self.lr * self.weight_decay)
            eps = max(self.eps * math.sqrt(1 - beta2**step), _FLOAT32_TINY)
        else:
            l2, keep, eps = self._wd, f32(1), self.eps
        adam_update(weights, state, slots, grads, f32(step_size), l2, keep, self._clip,
                    f32(1 - beta1), f32(1 - beta2), f32(eps))


def AdamW(*, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
          weight_decay: float = 1e-2, max_grad_norm: float | None = None) -> Adam:
    """Lazy Adam with decoupled weight decay, as ``torch.optim.AdamW`` (same defaults).

    Returns ``Adam(..., decoupled_weight_decay=True)``: checkpoints and serving packages
    record it as that Adam, and its rows' state is Adam's.

    Raises:
        ValueError: a bad hyperparameter (named).
    """
    return Adam(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                max_grad_norm=max_grad_norm, decoupled_weight_decay=True)
