"""Deterministic initial vectors: element j of key k depends only on (seed, k, j).

A counter-based generator (SplitMix64 over a mix of seed, key and counter) makes each
key's vector reproducible in any process, shard or restart, whatever else was inserted
before or alongside it.
"""

from __future__ import annotations

import math

import numba as nb
import numpy as np

from dynembed.kernels._hashing import mix64
from dynembed.kernels._threads import adaptive

ZEROS = 0
UNIFORM = 1
NORMAL = 2
TRUNCATED_NORMAL = 3
CONSTANT = 4

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_TWO_POW_M53 = 1.0 / 9007199254740992.0
_TRUNC_ATTEMPTS = 64


@nb.njit(inline="always", cache=True)
def _uniform01(base, counter):
    # SplitMix64 step at position `counter` of the stream `base`; 53 bits -> [0, 1).
    z = base + np.uint64(counter + 1) * _GOLDEN
    z = mix64(z)
    return np.float64(z >> np.uint64(11)) * _TWO_POW_M53


@nb.njit(inline="always", cache=True)
def _standard_normal(base, counter):
    # Box-Muller from two uniforms; 1 - u keeps the log argument in (0, 1].
    u1 = 1.0 - _uniform01(base, 2 * counter)
    u2 = _uniform01(base, 2 * counter + 1)
    return math.sqrt(-2.0 * math.log(u1)) * math.cos(2.0 * math.pi * u2)


@adaptive(lambda weights, slots, *rest: slots.size * weights.shape[1])
@nb.njit(parallel=True, cache=True)
def init_rows(weights, slots, ids, seed, kind, p0, p1, p2, p3):
    """Writes the initial vector of each id into its row.

    Args:
        weights: (capacity, dim) float32 arena weights (modified in place).
        slots: (n,) int64 rows to initialise.
        ids: (n,) int64 the key of each row.
        seed: uint64 initialiser seed.
        kind: one of ZEROS, UNIFORM, NORMAL, TRUNCATED_NORMAL, CONSTANT.
        p0, p1, p2, p3: the initialiser's parameters (low/high, mean/std, mean/std/a/b, value).
    """
    dim = weights.shape[1]
    for i in nb.prange(slots.shape[0]):
        row = weights[slots[i]]
        base = mix64(seed ^ mix64(np.uint64(ids[i])))
        for j in range(dim):
            if kind == ZEROS:
                v = 0.0
            elif kind == CONSTANT:
                v = p0
            elif kind == UNIFORM:
                v = p0 + (p1 - p0) * _uniform01(base, j)
            elif kind == NORMAL:
                v = p0 + p1 * _standard_normal(base, j)
            else:
                # Truncated normal by rejection, on counters past the ones a plain normal uses.
                z = _standard_normal(base, j)
                attempt = 1
                while (z < p2 or z > p3) and attempt < _TRUNC_ATTEMPTS:
                    z = _standard_normal(base, j + attempt * dim)
                    attempt += 1
                z = min(max(z, p2), p3)
                v = p0 + p1 * z
            row[j] = v
