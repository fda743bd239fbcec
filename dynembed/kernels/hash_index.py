"""Open-addressing hash index from int64 id to row slot (linear probing).

The index is one (capacity, 2) int64 array of buckets, capacity a power of two: column
``KEY`` holds the id and column ``ROW`` the row slot, ``EMPTY`` where the bucket is free. Any
int64 is a valid id, so emptiness lives in the row column, never in the key. Key and row
share a cache line, so a probe costs one miss. Erase uses backward-shift deletion: no
tombstones, and probe chains never degrade after many erases.
"""

from __future__ import annotations

import numba as nb
import numpy as np

from dynembed.kernels._hashing import bucket_mix, mix64
from dynembed.kernels._prefetch import (
    PREFETCH_DISTANCE,
    prefetch,
    prefetch_read,
    prefetch_row_read,
)
from dynembed.kernels._streaming import copy_row, store_fence
from dynembed.kernels._threads import adaptive, get_num_threads

EMPTY = -1
KEY, ROW = 0, 1
MAX_LOAD = 0.75
"""The most an index is filled: a probe's chain stays short."""


def buckets_for(entries: int) -> int:
    """Buckets (a power of two, at least 16) that hold ``entries`` ids within
    :data:`MAX_LOAD`."""
    need = max(16, int(np.ceil(entries / MAX_LOAD)))
    return 1 << (need - 1).bit_length()


def empty_buckets(entries: int) -> np.ndarray:
    """Empty (buckets, 2) int64 buckets for ``entries`` ids (see :func:`buckets_for`)."""
    out = np.empty((buckets_for(entries), 2), dtype=np.int64)
    out[:, ROW] = EMPTY
    return out


@nb.njit(inline="always", cache=True)
def _home(key, mask):
    return np.int64(mix64(np.uint64(key)) & np.uint64(mask))


@nb.njit(inline="always", cache=True)
def _probe_from(buckets, key, b, mask):
    """The slot of ``key`` (``EMPTY`` if absent), probing from bucket ``b``, its home.

    The loops that prefetch a key's bucket ahead keep the home they hashed for the
    prefetch and probe from it: hashing each key once instead of twice took a 65,536-key
    read of a 10M-row table from 1.71 to 1.57 ms (A/B in one process).
    """
    while True:
        r = buckets[b, ROW]
        if r == EMPTY or buckets[b, KEY] == key:
            return r
        b = (b + 1) & mask


@nb.njit(inline="always", cache=True)
def _prefetch_home(buckets, ids, homes, i, mask):
    """Hashes ``ids[i]``, keeps its home in ``homes[i]`` and prefetches that bucket."""
    home = _home(ids[i], mask)
    homes[i] = home
    prefetch_read(buckets, home)


@adaptive(lambda buckets, ids, shares: ids.size)
@nb.njit(parallel=True, cache=True, nogil=True)
def index_find(buckets, ids, shares):
    """Row slot of each id.

    Args:
        buckets: (capacity, 2) int64 index buckets.
        ids: (n,) int64 ids to find.
        shares: how many contiguous shares to split the ids into (the threads).

    Returns:
        (n,) int64 row slots, ``EMPTY`` where the id is absent.
    """
    mask = buckets.shape[0] - 1
    n = ids.shape[0]
    out = np.empty(n, dtype=np.int64)
    # contiguous shares, so the homes a thread keeps in ``out`` ahead of its probes are in
    # its own share
    per = (n + shares - 1) // shares
    for share in nb.prange(shares):
        lo = share * per
        hi = min(n, lo + per)
        for i in range(lo, min(hi, lo + PREFETCH_DISTANCE)):
            _prefetch_home(buckets, ids, out, i, mask)
        for i in range(lo, hi):
            if i + PREFETCH_DISTANCE < hi:  # the bucket of a later key: probes are misses
                _prefetch_home(buckets, ids, out, i + PREFETCH_DISTANCE, mask)
            out[i] = _probe_from(buckets, ids[i], out[i], mask)
    return out


@nb.njit(inline="always", cache=True)
def _probe_and_prefetch_row(buckets, ids, rows, slots, i, mask):
    """Probes ``ids[i]`` from the home kept in ``slots[i]``, keeps its slot there and
    prefetches its row."""
    r = _probe_from(buckets, ids[i], slots[i], mask)
    slots[i] = r
    if r != EMPTY:
        prefetch_row_read(rows, r)


FIND_ROWS_BLOCK = 16
"""Keys per block of :func:`index_find_rows` (16 measured best, 8 and 32 close)."""

FIND_ROWS_BUCKETS_AHEAD = 2
"""How many blocks ahead :func:`index_find_rows` prefetches buckets."""


@adaptive(lambda buckets, ids, rows, out, slots, shares, stream: ids.size)
@nb.njit(parallel=True, cache=True, nogil=True)
def index_find_rows(buckets, ids, rows, out, slots, shares, stream):
    """Finds each id's slot and copies its row, in one pass.

    A read that probes every key and then gathers the rows misses the cache twice per cold
    key, in two passes. Here each thread takes a contiguous share of the keys in blocks, a
    pipeline of three stages: it prefetches the buckets of the block two ahead, probes the
    next block (its buckets prefetched a block earlier) and prefetches its rows, then
    copies this block's rows (prefetched a block earlier), so both kinds of miss are in
    flight together and each has a block's work to arrive (10M-row table, 65,536 Zipf
    keys: 1.52 ms, against 1.57 probing and copying the same block and 1.71 also hashing each
    key twice, in one process). Large outputs are written with streaming stores.

    Args:
        buckets: (capacity, 2) int64 index buckets.
        ids: (n,) int64 ids to find.
        rows: (m, dim) float32 rows by slot.
        out: (n, dim) float32, filled where the id is present (other rows left as they are).
        slots: (n,) int64, filled with each id's slot, ``EMPTY`` where absent (and used for
            the homes of keys whose buckets were prefetched, before they are probed).
        shares: how many contiguous shares to split the keys into (the threads).
        stream: write ``out`` with streaming stores (see :mod:`._streaming`; the caller
            checks :func:`~._streaming.can_stream`).

    Returns:
        How many ids were absent (so a caller with none skips a pass over ``slots``).
    """
    mask = buckets.shape[0] - 1
    n = ids.shape[0]
    per = (n + shares - 1) // shares
    block = FIND_ROWS_BLOCK
    ahead = FIND_ROWS_BUCKETS_AHEAD * block
    absent = 0
    for share in nb.prange(shares):
        lo = share * per
        hi = min(n, lo + per)
        for i in range(lo, min(hi, lo + ahead)):
            _prefetch_home(buckets, ids, slots, i, mask)
        for i in range(lo, min(hi, lo + block)):
            _probe_and_prefetch_row(buckets, ids, rows, slots, i, mask)
        for start in range(lo, hi, block):
            end = min(hi, start + block)
            for i in range(start + ahead, min(hi, start + ahead + block)):
                _prefetch_home(buckets, ids, slots, i, mask)
            for i in range(end, min(hi, end + block)):
                _probe_and_prefetch_row(buckets, ids, rows, slots, i, mask)
            for i in range(start, end):
                r = slots[i]
                if r == EMPTY:
                    absent += 1
                    continue
                copy_row(out[i], rows[r], stream)
        if stream:
            store_fence()
    return absent


@nb.njit(cache=True, nogil=True)
def index_insert(buckets, ids, slots, free_rows, free_top, high_water, room):
    """Inserts the ids whose ``slots`` entry is ``EMPTY``, giving each a row slot.

    Slots come from ``free_rows`` (a stack of freed rows) first, then from ``high_water``
    upward. The caller guarantees room in the arena. Duplicate ids in ``ids`` are inserted
    once and all their entries get the same slot. At most ``room`` new ids are inserted: a
    probe only ends at an empty bucket, so one insert too many into a full index never
    returned (nor did any later probe of an absent id); the caller grows the index and calls
    again for the ids still ``EMPTY``.

    Args:
        buckets: the index buckets (modified in place).
        ids: (n,) int64 ids.
        slots: (n,) int64 result of :func:`index_find`; filled in place for new ids.
        free_rows: (m,) int64 stack of reusable slots.
        free_top: number of valid entries on ``free_rows``.
        high_water: first never-used arena row.
        room: how many new ids the index may take (at most its empty buckets less one).

    Returns:
        (inserted, free_top, high_water, stop): how many ids were new, the updated
        allocators, and the position in ``ids`` where the room ran out (``n`` if it did not:
        every id has its slot).
    """
    mask = buckets.shape[0] - 1
    inserted = 0
    for i in range(ids.shape[0]):
        if slots[i] != EMPTY:
            continue
        key = ids[i]
        b = _home(key, mask)
        while True:
            r = buckets[b, ROW]
            if r == EMPTY:
                if inserted >= room:
                    return inserted, free_top, high_water, i
                if free_top > 0:
                    free_top -= 1
                    r = free_rows[free_top]
                else:
                    r = high_water
                    high_water += 1
                buckets[b, KEY] = key
                buckets[b, ROW] = r
                inserted += 1
                break
            if buckets[b, KEY] == key:
                break
            b = (b + 1) & mask
        slots[i] = r
    return inserted, free_top, high_water, ids.shape[0]


@nb.njit(cache=True, nogil=True)
def index_erase(buckets, ids):
    """Removes ids from the index with backward-shift deletion.

    Args:
        buckets: the index buckets (modified in place).
        ids: (n,) int64 ids to erase; absent ids are ignored.

    Returns:
        (n,) int64 freed row slot per id, ``EMPTY`` where the id was absent.
    """
    mask = buckets.shape[0] - 1
    n = ids.shape[0]
    out = np.full(n, EMPTY, dtype=np.int64)
    for i in range(n):
        key = ids[i]
        b = _home(key, mask)
        while buckets[b, ROW] != EMPTY and buckets[b, KEY] != key:
            b = (b + 1) & mask
        if buckets[b, ROW] == EMPTY:
            continue
        out[i] = buckets[b, ROW]
        hole = b
        j = b
        while True:
            j = (j + 1) & mask
            if buckets[j, ROW] == EMPTY:
                break
            home = _home(buckets[j, KEY], mask)
            # Move j into the hole unless j's home lies cyclically in (hole, j].
            if hole <= j:
                stays = hole < home <= j
            else:
                stays = home > hole or home <= j
            if stays:
                continue
            buckets[hole, KEY] = buckets[j, KEY]
            buckets[hole, ROW] = buckets[j, ROW]
            hole = j
        buckets[hole, ROW] = EMPTY
    return out


@nb.njit(cache=True, nogil=True)
def index_rehash(old, new):
    """Moves every entry of the old buckets into new, empty buckets of another capacity."""
    mask = new.shape[0] - 1
    for b in range(old.shape[0]):
        r = old[b, ROW]
        if r == EMPTY:
            continue
        key = old[b, KEY]
        t = _home(key, mask)
        while new[t, ROW] != EMPTY:
            t = (t + 1) & mask
        new[t, KEY] = key
        new[t, ROW] = r


@nb.njit(cache=True, nogil=True)
def index_items(buckets, size):
    """All (id, row) pairs of the index, in bucket order.

    Returns:
        ((size,) int64 ids, (size,) int64 rows).
    """
    out_ids = np.empty(size, dtype=np.int64)
    out_rows = np.empty(size, dtype=np.int64)
    k = 0
    for b in range(buckets.shape[0]):
        if buckets[b, ROW] != EMPTY:
            out_ids[k] = buckets[b, KEY]
            out_rows[k] = buckets[b, ROW]
            k += 1
    return out_ids, out_rows


@nb.njit(cache=True, nogil=True)
def index_bucket_hashes(buckets, size):
    """(size,) uint64 bucket hashes (``bucket_mix``) of every id of the index: the sort key
    of checkpoint files, 8 bytes per row, without listing ids and rows first."""
    out = np.empty(size, dtype=np.uint64)
    k = 0
    for b in range(buckets.shape[0]):
        if buckets[b, ROW] != EMPTY:
            out[k] = bucket_mix(buckets[b, KEY])
            k += 1
    return out


def as_ids(ids: np.ndarray) -> np.ndarray:
    """``ids`` as the (n,) int64 array the kernels take: int64 as it is, uint64 as the int64
    of the same bits (how hashed ids are made), other integers by value.

    The kernels compare an id with the int64 keys of the index; numba compares int64 with
    uint64 (and floats) in float64, so such arrays found the wrong rows, or none, and floats
    deduplicated 1.0 and 1.5 as two copies of id 1.

    Raises:
        TypeError: ``ids`` is not an integer array.
    """
    ids = np.asarray(ids)
    if ids.dtype == np.int64:
        return ids
    if ids.dtype.kind not in "iu":
        raise TypeError(f"ids must be an integer array (int64 ids), got dtype {ids.dtype}")
    if not ids.dtype.isnative:  # big-endian: its bytes read as int64 are other ids
        ids = ids.astype(ids.dtype.newbyteorder("="))
    if ids.dtype.itemsize == 8:
        return ids.view(np.int64)
    return ids.astype(np.int64)


def first_positions(ids: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """Where each of (m,) distinct ``wanted`` ids first occurs in (n,) ``ids``: (m,) int64
    positions, EMPTY for those that do not occur. A hash probe per id, no sort.

    Raises:
        TypeError: either is not an integer array.
    """
    ids, wanted = as_ids(ids), as_ids(wanted)
    m = wanted.shape[0]
    buckets = empty_buckets(m)
    index_insert(buckets, wanted, np.full(m, EMPTY, dtype=np.int64), np.empty(0, np.int64),
                 0, 0, m)  # wanted[j] gets row j
    found = index_find(buckets, ids, get_num_threads())
    at = np.flatnonzero(found != EMPTY)
    first = np.full(m, ids.shape[0], dtype=np.int64)
    np.minimum.at(first, found[at], at)
    first[first == ids.shape[0]] = EMPTY
    return first


def unique_inverse(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Deduplicates ids in first-occurrence order.

    Args:
        ids: (n,) int64 (other integer arrays are read as :func:`as_ids` says).

    Returns:
        (unique (u,) int64, inverse (n,) int64 with ``unique[inverse] == ids``,
        counts (u,) int64 occurrences of each unique id).

    Raises:
        TypeError: ``ids`` is not an integer array.
    """
    ids = as_ids(ids)
    n = ids.shape[0]
    cap = 16
    while cap < 2 * n:
        cap *= 2
    # The table holds positions into ``unique`` only (ids are compared there): 4 bytes a
    # bucket instead of 16, so a 65,536-key batch probes 512 KB, not 2 MB. Between the
    # other stages of a training step caches are cold, and this took the dedup from about
    # 0.95 to 0.53 ms.
    table = np.full(cap, EMPTY, dtype=np.int32 if n < 2**31 else np.int64)
    return _dedup(ids, table)


@nb.njit(cache=True, nogil=True)
def _dedup(ids, table):
    n = ids.shape[0]
    mask = table.shape[0] - 1
    unique = np.empty(n, dtype=np.int64)
    counts = np.zeros(n, dtype=np.int64)
    inverse = np.empty(n, dtype=np.int64)
    u = 0
    # ``inverse[i]`` keeps key i's home from its prefetch until its probe: one hash a key,
    # not two, took a 65,536-key Zipf batch from 0.58 to 0.43 ms
    for i in range(min(n, PREFETCH_DISTANCE)):
        inverse[i] = _home(ids[i], mask)
        prefetch(table, inverse[i])
    for i in range(n):
        if i + PREFETCH_DISTANCE < n:
            home = _home(ids[i + PREFETCH_DISTANCE], mask)
            inverse[i + PREFETCH_DISTANCE] = home
            prefetch(table, home)
        key = ids[i]
        b = inverse[i]
        while True:
            p = table[b]
            if p == EMPTY:
                table[b] = u
                unique[u] = key
                p = u
                u += 1
                break
            if unique[p] == key:
                break
            b = (b + 1) & mask
        inverse[i] = p
        counts[p] += 1
    return unique[:u].copy(), inverse, counts[:u].copy()
