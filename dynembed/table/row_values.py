"""Checks of row values given to a table (assigned rows, loaded state dicts): values that
would poison every later lookup and update of their keys are refused before anything is
written."""

from __future__ import annotations

import torch

from dynembed.errors import StateDictError


def checked_rows(name: str, rows, n: int, width: int, device: torch.device) -> torch.Tensor:
    """``rows`` as a detached (n, width) float32 tensor on ``device`` (the arena's: values
    may come from a GPU model).

    Raises:
        TypeError: not a tensor or array of floats, or on the meta device.
        ValueError: another shape, or a row holding NaN or inf (float64 values beyond
            float32's range become inf).
    """
    if rows is None or isinstance(rows, (str, bytes)):
        raise TypeError(f"{name} must be a ({n}, {width}) float tensor (or array), got "
                        f"{type(rows).__name__}")
    try:
        rows = torch.as_tensor(rows).detach()  # values, never a link into the caller's graph
    except (TypeError, ValueError, RuntimeError) as e:  # an object array, a list of str
        raise TypeError(f"{name} must be a ({n}, {width}) float tensor (or array): {e}") \
            from None
    if rows.device.type == "meta":
        raise TypeError(f"{name} is on the meta device, which holds no values; pass them "
                        "on the cpu")
    if rows.shape != (n, width):
        raise ValueError(f"{name} must have shape ({n}, {width}), got {tuple(rows.shape)}")
    if not rows.dtype.is_floating_point:
        raise TypeError(f"{name} must be floating point, got {rows.dtype}")
    rows = rows.to(device=device, dtype=torch.float32)
    bad = ~torch.isfinite(rows).all(dim=1)
    if bool(bad.any()):  # such a row poisons every later lookup and update of its key
        raise ValueError(
            f"{name} holds NaN or inf in {int(bad.sum())} of {n} rows (the first is row "
            f"{int(bad.nonzero()[0, 0])}); fix those values or leave their keys out "
            "(float64 values beyond float32's range become inf). Nothing was written.")
    return rows


def _negative_accumulator(optimizer, dim: int, state: torch.Tensor) -> slice | None:
    """The optimizer's sum-of-squares columns if ``state`` (n, width) holds a negative
    value in them (the square root at the row's next update would be NaN), else None."""
    columns = optimizer.nonnegative_state(dim) if optimizer is not None else None
    if columns is not None and state.numel() and bool((state[:, columns] < 0).any()):
        return columns
    return None


def check_accumulators(optimizer, dim: int, state: torch.Tensor) -> None:
    """Raises ValueError where ``state`` (n, width) gives a negative sum of squares."""
    columns = _negative_accumulator(optimizer, dim, state)
    if columns is not None:
        raise ValueError(
            f"optimizer_state holds negative values in columns {columns.start}:"
            f"{columns.stop}, where {type(optimizer).__name__} keeps sums of squared "
            "gradients (>= 0); give state exported from a table with this optimizer. "
            "Nothing was written.")


def check_state_dict_rows(weights: torch.Tensor, state: torch.Tensor, optimizer) -> None:
    """Raises StateDictError where a state dict's rows would poison training: NaN or inf
    weights, NaN optimizer state, or a negative accumulator. The optimizer state may hold
    +inf: sums of squares that overflowed, which the kernels read as float32's largest
    value."""
    if weights.numel() and not bool(torch.isfinite(weights).all()):
        raise StateDictError("state dict 'weights' holds NaN or inf; such a row poisons every "
                             "later lookup and update of its key (drop those rows, or save "
                             "the state from before the training diverged)")
    if state.numel() and bool(torch.isnan(state).any()):
        raise StateDictError("state dict 'optimizer_state' holds NaN; the rows' next "
                             "updates would be NaN")
    columns = _negative_accumulator(optimizer, weights.shape[1], state)
    if columns is not None:
        raise StateDictError(
            f"state dict 'optimizer_state' holds negative values where "
            f"{type(optimizer).__name__} keeps sums of squared gradients (columns "
            f"{columns.start}:{columns.stop}); it was not saved by this optimizer, or is "
            "corrupted")
