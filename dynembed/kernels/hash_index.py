"""Open-addressing hash index from int64 id to row slot (linear probing).

The index is two arrays of a power-of-two length: ``keys`` (int64 ids) and ``rows`` (int64
row slots, ``EMPTY`` where a bucket is free). Any int64 is a valid id, so emptiness lives in
``rows``, never in ``keys``. Erase uses backward-shift deletion, so there are no tombstones and
probe chains never degrade after many erases.
"""

from __future__ import annotations

import numba as nb
import numpy as np

from dynembed.kernels._prefetch import PREFETCH_DISTANCE, prefetch
from dynembed.kernels._threads import adaptive

from dynembed.kernels._hashing import mix64

EMPTY = -1


@nb.njit(inline="always", cache=True)
def _home(key, mask):
    return np.int64(mix64(np.uint64(key)) & np.uint64(mask))


@adaptive(lambda keys, rows, ids: ids.size)
@nb.njit(parallel=True, cache=True)
def index_find(keys, rows, ids):
    """Row slot of each id.

    Args:
        keys: (capacity,) int64 index keys.
        rows: (capacity,) int64 index values, ``EMPTY`` for a free bucket.
        ids: (n,) int64 ids to find.

    Returns:
        (n,) int64 row slots, ``EMPTY`` where the id is absent.
    """
    mask = keys.shape[0] - 1
    n = ids.shape[0]
    out = np.empty(n, dtype=np.int64)
    for i in nb.prange(n):
        if i + PREFETCH_DISTANCE < n:  # the bucket of a later key: probes are cache misses
            ahead = _home(ids[i + PREFETCH_DISTANCE], mask)
            prefetch(rows, ahead)
            prefetch(keys, ahead)
        key = ids[i]
        b = _home(key, mask)
        while True:
            r = rows[b]
            if r == EMPTY:
                out[i] = EMPTY
                break
            if keys[b] == key:
                out[i] = r
                break
            b = (b + 1) & mask
    return out


@nb.njit(cache=True)
def index_insert(keys, rows, ids, slots, free_rows, free_top, high_water):
    """Inserts the ids whose ``slots`` entry is ``EMPTY``, giving each a row slot.

    Slots come from ``free_rows`` (a stack of freed rows) first, then from ``high_water``
    upward. The caller guarantees room in both the index and the arena. Duplicate ids in
    ``ids`` are inserted once and all their entries get the same slot.

    Args:
        keys, rows: the index arrays (modified in place).
        ids: (n,) int64 ids.
        slots: (n,) int64 result of :func:`index_find`; filled in place for new ids.
        free_rows: (m,) int64 stack of reusable slots.
        free_top: number of valid entries on ``free_rows``.
        high_water: first never-used arena row.

    Returns:
        (inserted, free_top, high_water): how many ids were new and the updated allocators.
    """
    mask = keys.shape[0] - 1
    inserted = 0
    for i in range(ids.shape[0]):
        if slots[i] != EMPTY:
            continue
        key = ids[i]
        b = _home(key, mask)
        while True:
            r = rows[b]
            if r == EMPTY:
                if free_top > 0:
                    free_top -= 1
                    r = free_rows[free_top]
                else:
                    r = high_water
                    high_water += 1
                keys[b] = key
                rows[b] = r
                inserted += 1
                break
            if keys[b] == key:
                break
            b = (b + 1) & mask
        slots[i] = r
    return inserted, free_top, high_water


@nb.njit(cache=True)
def index_erase(keys, rows, ids):
    """Removes ids from the index with backward-shift deletion.

    Args:
        keys, rows: the index arrays (modified in place).
        ids: (n,) int64 ids to erase; absent ids are ignored.

    Returns:
        (n,) int64 freed row slot per id, ``EMPTY`` where the id was absent.
    """
    mask = keys.shape[0] - 1
    n = ids.shape[0]
    out = np.full(n, EMPTY, dtype=np.int64)
    for i in range(n):
        key = ids[i]
        b = _home(key, mask)
        while rows[b] != EMPTY and keys[b] != key:
            b = (b + 1) & mask
        if rows[b] == EMPTY:
            continue
        out[i] = rows[b]
        hole = b
        j = b
        while True:
            j = (j + 1) & mask
            if rows[j] == EMPTY:
                break
            home = _home(keys[j], mask)
            # Move j into the hole unless j's home lies cyclically in (hole, j].
            if hole <= j:
                stays = hole < home <= j
            else:
                stays = home > hole or home <= j
            if stays:
                continue
            keys[hole] = keys[j]
            rows[hole] = rows[j]
            hole = j
        rows[hole] = EMPTY
    return out


@nb.njit(cache=True)
def index_rehash(old_keys, old_rows, new_keys, new_rows):
    """Moves every entry of the old index into a new, empty one of another capacity."""
    mask = new_keys.shape[0] - 1
    for b in range(old_keys.shape[0]):
        r = old_rows[b]
        if r == EMPTY:
            continue
        key = old_keys[b]
        t = _home(key, mask)
        while new_rows[t] != EMPTY:
            t = (t + 1) & mask
        new_keys[t] = key
        new_rows[t] = r


@nb.njit(cache=True)
def index_items(keys, rows, size):
    """All (id, row) pairs of the index, in bucket order.

    Returns:
        ((size,) int64 ids, (size,) int64 rows).
    """
    out_ids = np.empty(size, dtype=np.int64)
    out_rows = np.empty(size, dtype=np.int64)
    k = 0
    for b in range(keys.shape[0]):
        if rows[b] != EMPTY:
            out_ids[k] = keys[b]
            out_rows[k] = rows[b]
            k += 1
    return out_ids, out_rows


@nb.njit(cache=True)
def unique_inverse(ids):
    """Deduplicates ids in first-occurrence order.

    Args:
        ids: (n,) int64.

    Returns:
        (unique (u,) int64, inverse (n,) int64 with ``unique[inverse] == ids``,
        counts (u,) int64 occurrences of each unique id).
    """
    n = ids.shape[0]
    cap = 16
    while cap < 2 * n:
        cap *= 2
    mask = cap - 1
    tkeys = np.empty(cap, dtype=np.int64)
    tpos = np.full(cap, EMPTY, dtype=np.int64)
    unique = np.empty(n, dtype=np.int64)
    counts = np.zeros(n, dtype=np.int64)
    inverse = np.empty(n, dtype=np.int64)
    u = 0
    for i in range(n):
        key = ids[i]
        b = _home(key, mask)
        while True:
            p = tpos[b]
            if p == EMPTY:
                tkeys[b] = key
                tpos[b] = u
                unique[u] = key
                p = u
                u += 1
                break
            if tkeys[b] == key:
                break
            b = (b + 1) & mask
        inverse[i] = p
        counts[p] += 1
    return unique[:u].copy(), inverse, counts[:u].copy()
