"""The data position of a job: which samples global batch ``step`` holds, and which of them
are this rank's.

A job's position is just its step. Global batch ``step`` holds samples
``[step * B, (step + 1) * B)`` of an endless stream that visits the data set once per epoch
in an order shuffled by ``(seed, epoch)``. Rank r of W takes the r-th of W nearly equal
contiguous parts. The same step means the same samples whatever the world size, so a job
that restarts with another number of ranks resumes exactly where it stopped.
"""

from __future__ import annotations

import functools

import numpy as np

from dynembed._args import check_bool

_INT64_MAX = 2**63 - 1


def _check(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return int(value)


@functools.lru_cache(maxsize=2)  # the current epoch and the next: one shuffle per epoch
def epoch_order(num_samples: int, epoch: int, seed: int) -> np.ndarray:
    """(num_samples,) int64: the order in which epoch ``epoch`` visits the samples
    (read-only; cached)."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(num_samples).astype(np.int64)
    order.flags.writeable = False
    return order


def global_batch(step: int, batch_size: int, num_samples: int, *, seed: int = 0,
                 shuffle: bool = True) -> np.ndarray:
    """(batch_size,) int64 sample indices of global batch ``step``.

    Raises:
        ValueError: a negative step or seed, sizes < 1, or a step whose samples lie past
            int64.
        TypeError: ``shuffle`` is not a bool (``shuffle="no"`` is truthy).
    """
    shuffle = check_bool("shuffle", shuffle)
    step = _check("step", step, 0)
    batch_size = _check("batch_size", batch_size, 1)
    num_samples = _check("num_samples", num_samples, 1)
    # numpy's seeding refuses negative seeds without naming the argument
    seed = _check("seed", seed, 0)
    if (step + 1) * batch_size - 1 > _INT64_MAX:  # positions are int64
        raise ValueError(f"step {step} with batch_size {batch_size} lies past the int64 "
                         "sample positions")
    positions = step * batch_size + np.arange(batch_size, dtype=np.int64)
    epochs, offsets = np.divmod(positions, num_samples)
    if not shuffle:
        return offsets
    out = np.empty(batch_size, dtype=np.int64)
    for epoch in np.unique(epochs):  # at most a few epochs per batch
        here = epochs == epoch
        out[here] = epoch_order(num_samples, int(epoch), seed)[offsets[here]]
    return out


def rank_part(indices: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """Rank ``rank``'s contiguous part of a global batch (parts differ by at most one).

    For a job of W ranks to train exactly like one process, make the batch size a multiple
    of W: each rank averages its loss over its part and gradients are averaged over ranks.

    Args:
        indices: (n,) the global batch (an array, tensor or list).

    Raises:
        TypeError: ``indices`` is not one-dimensional.
        ValueError: ``rank`` or ``world_size`` out of range.
    """
    if not hasattr(indices, "shape"):  # a list: sliced as an array, returned as one
        indices = np.asarray(indices)
    if len(indices.shape) != 1:
        raise TypeError(f"indices must be a 1-D batch of sample indices, got shape "
                        f"{tuple(indices.shape)}")
    world_size = _check("world_size", world_size, 1)
    # numpy ints are accepted, as for world_size (an environment parsed with numpy)
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) \
            or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in [0, {world_size}), got {rank!r}")
    rank = int(rank)
    bounds = np.linspace(0, indices.shape[0], world_size + 1).round().astype(np.int64)
    return indices[bounds[rank]:bounds[rank + 1]]


def epoch_of(step: int, batch_size: int, num_samples: int) -> int:
    """The epoch the first sample of global batch ``step`` belongs to.

    Raises:
        ValueError: a negative step, or sizes < 1 (checked as in :func:`global_batch`).
    """
    step = _check("step", step, 0)
    batch_size = _check("batch_size", batch_size, 1)
    num_samples = _check("num_samples", num_samples, 1)
    return (step * batch_size) // num_samples
