"""Keys held as byte spans of one buffer: locate, count and gather them in compiled passes."""

from __future__ import annotations

import numba as nb
import numpy as np

NO_SEPARATOR = -1


@nb.njit(inline="always", cache=True)
def char_width(lead):
    """Bytes of the UTF-8 character whose first byte is ``lead``."""
    if lead < 0x80:
        return 1
    if lead < 0xE0:
        return 2
    if lead < 0xF0:
        return 3
    return 4


@nb.njit(cache=True)
def utf8_spans(buf, codepoint_lengths, separator_bytes):
    """Byte start and length of each key of ``sep.join(keys)`` encoded as UTF-8.

    Args:
        buf: (total_bytes,) uint8, the joined keys.
        codepoint_lengths: (n,) int64, ``len(key)`` of each key (walking code points lets a
            key hold the separator itself).
        separator_bytes: UTF-8 length of the separator.

    Returns:
        ((n,) int64 starts, (n,) int64 byte lengths, end): ``end`` is where the key after
        the last would start, or -1 if the lengths run past the buffer, one is negative,
        or a key is not followed by a NUL separator (a one-byte separator must be NUL).
    """
    n = codepoint_lengths.shape[0]
    starts = np.empty(n, dtype=np.int64)
    lengths = np.empty(n, dtype=np.int64)
    size = buf.shape[0]
    pos = 0
    for i in range(n):
        if codepoint_lengths[i] < 0:
            return starts, lengths, -1
        start = pos
        for _ in range(codepoint_lengths[i]):
            if pos >= size:
                return starts, lengths, -1
            pos += char_width(buf[pos])
        if pos > size:
            return starts, lengths, -1
        starts[i] = start
        lengths[i] = pos - start
        if separator_bytes == 1 and i < n - 1 and (pos >= size or buf[pos] != 0):
            return starts, lengths, -1  # the lengths do not split the keys at separators
        pos += separator_bytes
    return starts, lengths, pos


@nb.njit(cache=True)
def codepoint_counts(buf, starts, lengths):
    """(n,) int64 code points of each UTF-8 span (its bytes that do not continue a
    character)."""
    n = starts.shape[0]
    out = np.zeros(n, dtype=np.int64)
    for i in range(n):
        count = 0
        for p in range(starts[i], starts[i] + lengths[i]):
            if (buf[p] & 0xC0) != 0x80:
                count += 1
        out[i] = count
    return out


@nb.njit(cache=True)
def gather_spans(buf, starts, lengths, separator):
    """The spans of ``buf`` back to back, with byte ``separator`` between two spans
    (``NO_SEPARATOR``: none).

    Returns:
        (bytes,) uint8.
    """
    n = starts.shape[0]
    total = 0
    for i in range(n):
        total += lengths[i]
    if separator != NO_SEPARATOR and n > 0:
        total += n - 1
    out = np.empty(total, dtype=np.uint8)
    pos = 0
    for i in range(n):
        if i > 0 and separator != NO_SEPARATOR:
            out[pos] = separator
            pos += 1
        length = lengths[i]
        out[pos:pos + length] = buf[starts[i]:starts[i] + length]
        pos += length
    return out
