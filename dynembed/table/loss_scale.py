"""Mixed precision with loss scaling: gradients reach the tables unscaled.

With ``torch.amp.GradScaler`` a model's backward runs on ``scaler.scale(loss)``; the scaler
unscales the gradients of the torch optimizer's parameters before their step and skips the
step when they overflowed. A table's update runs inside backward (fused) or is queued there
(deferred), before the scaler sees anything, so it would apply gradients ``scale`` times too
large (65,536 by default). Within :func:`loss_scale`, every table divides its gradient by the
current scale first and, when it overflowed (inf or NaN), skips its update for that backward
(counted in ``nonfinite_gradients`` and ``skipped_gradients``) as the scaler skips its step,
instead of raising :class:`~dynembed.errors.NonFiniteGradientError`, and tells the scaler,
so that its next ``update()`` lowers the scale even when only a table's gradient overflowed
(else every later step would overflow in that table too and it would never train).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections import defaultdict
from collections.abc import Iterator

import torch

from dynembed._args import is_real

_OVERFLOW_KEY = "dynembed tables"
"""Under which a GradScaler holds the tables' overflow among its optimizers' inf checks."""

_ACTIVE: list = []
"""The scales of the open :func:`loss_scale` blocks, innermost last. Process-wide, not a
context variable: autograd may run a node on one of its own threads, which would not see
the caller's context."""


@contextlib.contextmanager
def loss_scale(scale) -> Iterator[None]:
    """Backward passes within this block give tables their gradient divided by ``scale``.

    Args:
        scale: a ``torch.amp.GradScaler`` (its scale is read at each backward, so the block
            may hold the whole loop, across the scaler's updates; a disabled scaler changes
            nothing), or a fixed finite number > 0.

    Raises:
        TypeError: ``scale`` is neither a number nor a scaler (an object with
            ``get_scale()`` and ``is_enabled()``).
        ValueError: a number that is not finite and > 0.

    Example:
        >>> scaler = torch.amp.GradScaler("cuda")
        >>> with de.loss_scale(scaler):
        ...     with torch.autocast("cuda", dtype=torch.float16):
        ...         loss = loss_fn(model(batch))
        ...     scaler.scale(loss).backward()      # tables update with the true gradient
        >>> scaler.step(opt); scaler.update()
    """
    if hasattr(scale, "get_scale") and hasattr(scale, "is_enabled"):
        pass
    elif not is_real(scale):
        raise TypeError("scale must be a torch.amp.GradScaler or a number > 0, got "
                        f"{type(scale).__name__}")
    elif not 0 < scale < math.inf:
        raise ValueError(f"scale must be a finite number > 0, got {scale!r}")
    _ACTIVE.append(scale)
    try:
        yield
    finally:
        for i in range(len(_ACTIVE) - 1, -1, -1):  # this block's entry (by identity)
            if _ACTIVE[i] is scale:
                del _ACTIVE[i]
                break


def current_loss_scale() -> float | None:
    """The scale a gradient arriving now carries, or None outside :func:`loss_scale` (or
    with a disabled scaler): then gradients are used as they are."""
    if not _ACTIVE:
        return None
    scale = _ACTIVE[-1]
    if is_real(scale):
        return float(scale)
    if not scale.is_enabled():
        return None
    return float(scale.get_scale())


def report_inf_check(overflowed: bool) -> None:
    """Tells the innermost block's GradScaler whether a table's gradient overflowed in this
    backward, so that its next ``update()`` backs the scale off as for an optimizer whose
    gradients overflowed. Nothing to do for a fixed scale or outside a block.

    A GradScaler learns of overflows only from the optimizers it unscales; a table updates
    inside backward, so it records its check where ``update()`` reads them (one inf check
    among the optimizers', which ``update()`` clears; an overflow stays recorded until
    then). Every backward records one, overflow or not: ``update()`` refuses to run
    without any ("No inf checks were recorded"), so a model of tables alone could call it
    only after an overflow. torch is pinned, and a scaler that does not keep them so is
    warned about at an overflow rather than left silently at a scale that overflows every
    step.
    """
    if not _ACTIVE or is_real(_ACTIVE[-1]) or not _ACTIVE[-1].is_enabled():
        return
    scaler = _ACTIVE[-1]
    states, scale = getattr(scaler, "_per_optimizer_states", None), getattr(scaler, "_scale", None)
    if not isinstance(states, defaultdict) or not isinstance(scale, torch.Tensor):
        if overflowed:
            warnings.warn(f"a table's gradient overflowed, but this {type(scaler).__name__} "
                          "does not take inf checks as torch.amp.GradScaler 2.13 does, so its "
                          "scale stays as it is; lower it with scaler.update(new_scale)",
                          RuntimeWarning, stacklevel=2)
        return
    checks = states[_OVERFLOW_KEY]["found_inf_per_device"]
    if overflowed or scale.device not in checks:
        checks[scale.device] = torch.full((), float(overflowed), dtype=torch.float32,
                                          device=scale.device)
