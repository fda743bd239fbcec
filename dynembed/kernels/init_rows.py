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


# Acklam's rational approximation of the standard normal quantile (relative error 1.2e-9
# before the refinement step below).
_QA = (-3.969683028665376e+01, 2.209460984245205e+02, -2.759285104469687e+02,
       1.383577518672690e+02, -3.066479806614716e+01, 2.506628277459239e+00)
_QB = (-5.447609879822406e+01, 1.615858368580409e+02, -1.556989798598866e+02,
       6.680131188771972e+01, -1.328068155288572e+01)
_QC = (-7.784894002430293e-03, -3.223964580411365e-01, -2.400758277161838e+00,
       -2.549732539343734e+00, 4.374664141464968e+00, 2.938163982698783e+00)
_QD = (7.784695709041462e-03, 3.224671290700398e-01, 2.445134137142996e+00,
       3.754408661907416e+00)
_SQRT2 = math.sqrt(2.0)
_SQRT2PI = math.sqrt(2.0 * math.pi)


@nb.njit(inline="always", cache=True)
def _normal_cdf(x):
    return 0.5 * math.erfc(-x / _SQRT2)


@nb.njit(cache=True)
def _normal_quantile(p):
    """x with Phi(x) = p, for 0 < p < 1 (accurate to about 1e-15 after one Halley step)."""
    tail = min(p, 1.0 - p)
    if tail < 0.02425:  # the tails: the lower one's formula, mirrored for the upper
        q = math.sqrt(-2.0 * math.log(tail))
        x = ((((((_QC[0] * q + _QC[1]) * q + _QC[2]) * q + _QC[3]) * q + _QC[4]) * q + _QC[5])
             / ((((_QD[0] * q + _QD[1]) * q + _QD[2]) * q + _QD[3]) * q + 1.0))
        if p > 0.5:
            x = -x
    else:
        q = p - 0.5
        r = q * q
        x = ((((((_QA[0] * r + _QA[1]) * r + _QA[2]) * r + _QA[3]) * r + _QA[4]) * r + _QA[5])
             * q / (((((_QB[0] * r + _QB[1]) * r + _QB[2]) * r + _QB[3]) * r + _QB[4]) * r
                    + 1.0))
    e = _normal_cdf(x) - p
    u = e * _SQRT2PI * math.exp(0.5 * x * x)
    return x - u / (1.0 + 0.5 * x * u)


@nb.njit(cache=True)
def _truncated_by_quantile(base, counter, a, b):
    """A draw of N(0, 1) restricted to [a, b] by inverting the CDF, on the side of zero
    where the window's probabilities are small (so they keep their precision)."""
    flip = a > 0.0
    lo, hi = (-b, -a) if flip else (a, b)
    p_lo, p_hi = _normal_cdf(lo), _normal_cdf(hi)
    p = p_lo + (p_hi - p_lo) * _uniform01(base, counter)
    z = _normal_quantile(p) if 0.0 < p < 1.0 else (lo if p <= 0.0 else hi)
    z = min(max(z, lo), hi)
    return -z if flip else z


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
        p0, p1, p2, p3: the initialiser's parameters (low/high and the first and last
            float32 in [low, high); mean/std; mean/std/a/b; value).
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
                # p2, p3: the float32 values nearest inside [low, high), so the rounding to
                # float32 below never lands on high
                v = min(max(p0 + (p1 - p0) * _uniform01(base, j), p2), p3)
            elif kind == NORMAL:
                v = p0 + p1 * _standard_normal(base, j)
            else:
                # Truncated normal by rejection, on counters past the ones a plain normal uses.
                # A window of little probability (a narrow one, or one in a tail) can reject
                # every try: then the exact inverse CDF draws it (rejection's accepted draws
                # follow the truncated law too, so the mixture is exact).
                z = _standard_normal(base, j)
                attempt = 1
                while (z < p2 or z > p3) and attempt < _TRUNC_ATTEMPTS:
                    z = _standard_normal(base, j + attempt * dim)
                    attempt += 1
                if z < p2 or z > p3:
                    z = _truncated_by_quantile(base, 2 * (j + _TRUNC_ATTEMPTS * dim), p2, p3)
                v = p0 + p1 * z
            row[j] = v
