"""Hash functions used by the kernels: XXH64 for key bytes and a 64-bit mixer for ids."""

from __future__ import annotations

import numba as nb
import numpy as np

_P1 = np.uint64(0x9E3779B185EBCA87)
_P2 = np.uint64(0xC2B2AE3D27D4EB4F)
_P3 = np.uint64(0x165667B19E3779F9)
_P4 = np.uint64(0x85EBCA77C2B2AE63)
_P5 = np.uint64(0x27D4EB2F165667C5)
_U0 = np.uint64(0)


@nb.njit(inline="always", cache=True)
def _rotl(x, r):
    return (x << np.uint64(r)) | (x >> np.uint64(64 - r))


@nb.njit(inline="always", cache=True)
def _read64(buf, p):
    v = _U0
    for i in range(8):
        v |= np.uint64(buf[p + i]) << np.uint64(8 * i)
    return v


@nb.njit(inline="always", cache=True)
def _read32(buf, p):
    v = _U0
    for i in range(4):
        v |= np.uint64(buf[p + i]) << np.uint64(8 * i)
    return v


@nb.njit(inline="always", cache=True)
def _round(acc, lane):
    acc = acc + lane * _P2
    acc = _rotl(acc, 31)
    return acc * _P1


@nb.njit(inline="always", cache=True)
def _merge(acc, val):
    acc ^= _round(_U0, val)
    return acc * _P1 + _P4


@nb.njit(cache=True)
def xxh64(buf, start, end, seed):
    """XXH64 of ``buf[start:end]`` (uint8) with a uint64 ``seed``; the reference algorithm.

    ``seed`` may arrive as any integer type (a Python int is typed int64): it is read as
    uint64 first. numba keeps ``int64 + uint64`` an int64, whose right shifts (in the
    rotations and the final avalanche) copy the sign bit: other digests than XXH64's.
    """
    seed64 = np.uint64(seed)
    p = start
    length = end - start
    if length >= 32:
        v1 = seed64 + _P1 + _P2
        v2 = seed64 + _P2
        v3 = seed64
        v4 = seed64 - _P1
        limit = end - 32
        while p <= limit:
            v1 = _round(v1, _read64(buf, p))
            v2 = _round(v2, _read64(buf, p + 8))
            v3 = _round(v3, _read64(buf, p + 16))
            v4 = _round(v4, _read64(buf, p + 24))
            p += 32
        h = _rotl(v1, 1) + _rotl(v2, 7) + _rotl(v3, 12) + _rotl(v4, 18)
        h = _merge(h, v1)
        h = _merge(h, v2)
        h = _merge(h, v3)
        h = _merge(h, v4)
    else:
        h = seed64 + _P5
    h += np.uint64(length)
    while p + 8 <= end:
        h ^= _round(_U0, _read64(buf, p))
        h = _rotl(h, 27) * _P1 + _P4
        p += 8
    if p + 4 <= end:
        h ^= _read32(buf, p) * _P1
        h = _rotl(h, 23) * _P2 + _P3
        p += 4
    while p < end:
        h ^= np.uint64(buf[p]) * _P5
        h = _rotl(h, 11) * _P1
        p += 1
    h ^= h >> np.uint64(33)
    h *= _P2
    h ^= h >> np.uint64(29)
    h *= _P3
    h ^= h >> np.uint64(32)
    return h


@nb.njit(inline="always", cache=True)
def mix64(value):
    """MurmurHash3's 64-bit finaliser: a bijection on uint64 that spreads every input bit.

    ``value`` of any integer type is read as uint64 first: numba keeps ``int64 ^ uint64``
    an int64, whose right shifts copy the sign bit, so an int64 seed (a Python int, an int64
    seed array) gave the initialisers, sketches, Bloom filters and coin flips other values
    than the same seed as uint64.
    """
    x = np.uint64(value)
    x ^= x >> np.uint64(33)
    x *= np.uint64(0xFF51AFD7ED558CCD)
    x ^= x >> np.uint64(33)
    x *= np.uint64(0xC4CEB9FE1A85EC53)
    x ^= x >> np.uint64(33)
    return x


BUCKET_SALT = np.uint64(0x5BD1E9955BD1E995)
"""Makes the bucket hash unrelated to the index's probe positions."""


@nb.njit(inline="always", cache=True)
def bucket_mix(key):
    """The bucket hash of one int64 id (:mod:`dynembed.keys.buckets`), a bijection."""
    return mix64(np.uint64(key) ^ BUCKET_SALT)
