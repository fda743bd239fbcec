"""Batch hashing of string and bytes keys laid out in one buffer."""

from __future__ import annotations

import numba as nb
import numpy as np

from dynembed.kernels._hashing import xxh64
from dynembed.kernels.byte_spans import char_width


@nb.njit(cache=True)
def hash_utf8_by_codepoints(buf, codepoint_lengths, separator_bytes, seed):
    """Hashes keys joined in one UTF-8 buffer, split by their lengths in code points.

    The caller joins the strings with a one-code-point separator and passes each string's
    ``len()``; walking code points lets any character, the separator included, appear inside
    a key.

    Args:
        buf: (total_bytes,) uint8, UTF-8 of ``sep.join(keys)``.
        codepoint_lengths: (n,) int64, ``len(key)`` of each key.
        separator_bytes: UTF-8 length of the separator.
        seed: uint64 hash seed.

    Returns:
        (n,) uint64 XXH64 of each key's UTF-8 bytes.
    """
    n = codepoint_lengths.shape[0]
    out = np.empty(n, dtype=np.uint64)
    pos = 0
    for i in range(n):
        start = pos
        for _ in range(codepoint_lengths[i]):
            pos += char_width(buf[pos])
        out[i] = xxh64(buf, start, pos, seed)
        pos += separator_bytes
    return out


@nb.njit(cache=True)
def hash_bytes_by_lengths(buf, byte_lengths, seed):
    """Hashes keys concatenated in one buffer.

    Args:
        buf: (total_bytes,) uint8, ``b"".join(keys)``.
        byte_lengths: (n,) int64, ``len(key)`` of each key.
        seed: uint64 hash seed.

    Returns:
        (n,) uint64 XXH64 of each key.
    """
    n = byte_lengths.shape[0]
    out = np.empty(n, dtype=np.uint64)
    pos = 0
    for i in range(n):
        out[i] = xxh64(buf, pos, pos + byte_lengths[i], seed)
        pos += byte_lengths[i]
    return out
