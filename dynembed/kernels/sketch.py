"""Compiled loops of the admission policies: count-min sketch, Bloom filter, coin flips.

All hashing is ``mix64(id ^ seed)`` with a different seed per sketch row or Bloom probe, so
decisions depend only on (policy seed, key) and are the same in every process.
"""

from __future__ import annotations

import numba as nb
import numpy as np

from dynembed.kernels._hashing import mix64

_COUNTER_MAX = np.iinfo(np.int32).max


@nb.njit(cache=True)
def cms_estimate(sketch, ids, counts, seeds):
    """Frequency estimate of each id after adding ``counts`` (the sketch is not changed).

    Args:
        sketch: (depth, width) int32 counters; width a power of two.
        ids: (n,) int64 distinct ids.
        counts: (n,) int64 occurrences to add.
        seeds: (depth,) uint64 one hash seed per row.

    Returns:
        (n,) int64 min over rows of counter + count (never below the true count).
    """
    depth, width = sketch.shape
    mask = np.uint64(width - 1)
    out = np.empty(ids.shape[0], dtype=np.int64)
    for i in range(ids.shape[0]):
        key = np.uint64(ids[i])
        best = np.int64(_COUNTER_MAX)
        for d in range(depth):
            c = np.int64(sketch[d, np.int64(mix64(key ^ seeds[d]) & mask)])
            best = min(best, c)
        out[i] = best + counts[i]
    return out


@nb.njit(cache=True)
def cms_add(sketch, ids, counts, seeds):
    """Adds ``counts`` to each id's counters in place (conservative update, saturating).

    Conservative update raises only the counters below the new estimate, which keeps
    over-counting of rare keys lower than the plain update does.
    """
    depth, width = sketch.shape
    mask = np.uint64(width - 1)
    cols = np.empty(depth, dtype=np.int64)
    for i in range(ids.shape[0]):
        key = np.uint64(ids[i])
        best = np.int64(_COUNTER_MAX)
        for d in range(depth):
            cols[d] = np.int64(mix64(key ^ seeds[d]) & mask)
            c = np.int64(sketch[d, cols[d]])
            best = min(best, c)
        target = min(best + counts[i], np.int64(_COUNTER_MAX))
        for d in range(depth):
            sketch[d, cols[d]] = max(sketch[d, cols[d]], target)


@nb.njit(cache=True)
def bloom_test_and_set(bits, ids, seeds, set_bits):
    """Whether each id was in the Bloom filter; with ``set_bits``, adds the ids after.

    Args:
        bits: (words,) uint64 bit array; words * 64 a power of two.
        ids: (n,) int64 distinct ids.
        seeds: (k,) uint64 one seed per probe.
        set_bits: add the ids (True) or only test (False).

    Returns:
        (n,) bool, True where every probe bit was already set.
    """
    mask = np.uint64(bits.shape[0] * 64 - 1)
    out = np.empty(ids.shape[0], dtype=np.bool_)
    for i in range(ids.shape[0]):
        key = np.uint64(ids[i])
        seen = True
        for s in range(seeds.shape[0]):
            b = mix64(key ^ seeds[s]) & mask
            word, bit = np.int64(b >> np.uint64(6)), np.uint64(1) << (b & np.uint64(63))
            if not bits[word] & bit:
                seen = False
                if set_bits:
                    bits[word] |= bit
        out[i] = seen
    return out


@nb.njit(cache=True)
def coin_flips(ids, step, seed, thresholds):
    """One pseudo-random draw per (id, step): True where it falls below the id's threshold.

    Args:
        ids: (n,) int64.
        step: the table step (a new draw every step).
        seed: uint64 policy seed.
        thresholds: (n,) uint64, each id's probability * 2**64.
    """
    out = np.empty(ids.shape[0], dtype=np.bool_)
    salt = mix64(np.uint64(step) ^ seed)
    for i in range(ids.shape[0]):
        out[i] = mix64(np.uint64(ids[i]) ^ salt) < thresholds[i]
    return out
