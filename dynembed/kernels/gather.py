"""Row movement between the arena and dense batches: segment sums, metadata touches."""

from __future__ import annotations

import numba as nb
import numpy as np

from dynembed.kernels._threads import adaptive


@adaptive(lambda values, segment, segments, threads: values.size)
@nb.njit(parallel=True, cache=True)
def segment_sum(values, segment, segments, threads):
    """Sums rows of ``values`` that share a segment.

    Args:
        values: (n, dim) float32.
        segment: (n,) int64 segment of each row, in [0, segments).
        segments: number of segments.
        threads: number of column blocks to run in parallel (``numba.get_num_threads()``).

    Returns:
        (segments, dim) float32 sums.
    """
    n, dim = values.shape
    out = np.zeros((segments, dim), dtype=np.float32)
    # Threads split the columns, so no two threads ever add into the same element.
    blocks = max(1, min(threads, dim))
    for t in nb.prange(blocks):
        lo = dim * t // blocks
        hi = dim * (t + 1) // blocks
        for i in range(n):
            dst = out[segment[i]]
            src = values[i]
            for j in range(lo, hi):
                dst[j] += src[j]
    return out


@nb.njit(cache=True)
def touch_rows(meta, slots, occurrences, step):
    """Records a training lookup: ``count += occurrences`` and ``last_step = step``.

    Args:
        meta: (capacity, 3) int64 arena metadata (id, count, last step), in place.
        slots: (u,) int64 distinct slots.
        occurrences: (u,) int64 lookups of each slot in this call.
        step: the table's step.
    """
    for i in range(slots.shape[0]):
        r = slots[i]
        meta[r, 1] += occurrences[i]
        meta[r, 2] = step
