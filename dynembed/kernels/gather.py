"""Row movement between the arena and dense batches: fused find+gather, segment sums."""

from __future__ import annotations

import numba as nb
import numpy as np

from dynembed.kernels._threads import adaptive

from dynembed.kernels.hash_index import EMPTY, _home


@adaptive(lambda keys, rows, ids, weights, default, out: out.size)
@nb.njit(parallel=True, cache=True)
def find_gather(keys, rows, ids, weights, default, out):
    """Looks each id up in the index and copies its row (or ``default``) into ``out``.

    One pass instead of find + gather, for read-only lookups (eval, serving).

    Args:
        keys, rows: the index arrays.
        ids: (n,) int64.
        weights: (capacity, dim) float32 arena weights.
        default: (dim,) float32 vector for absent ids.
        out: (n, dim) float32 output, written in place.

    Returns:
        (n,) bool, whether each id was found.
    """
    mask = keys.shape[0] - 1
    n = ids.shape[0]
    dim = weights.shape[1]
    found = np.empty(n, dtype=np.bool_)
    for i in nb.prange(n):
        key = ids[i]
        b = _home(key, mask)
        r = EMPTY
        while True:
            v = rows[b]
            if v == EMPTY:
                break
            if keys[b] == key:
                r = v
                break
            b = (b + 1) & mask
        found[i] = r != EMPTY
        if r == EMPTY:
            for j in range(dim):
                out[i, j] = default[j]
        else:
            for j in range(dim):
                out[i, j] = weights[r, j]
    return found


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
            s = segment[i]
            for j in range(lo, hi):
                out[s, j] += values[i, j]
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
