"""The string -> id hash: XXH64 of the key's UTF-8 bytes, read as a signed int64.

``id = int64(XXH64(key.encode("utf-8", "surrogatepass"), seed=hash_seed))``, where the
unsigned 64-bit digest is reinterpreted as two's complement. ``bytes`` keys hash their raw
bytes, so ``"cat"`` and ``b"cat"`` share an id. The hash is a published, fixed algorithm
(https://xxhash.com), identical in every process and on every machine, and any language
can reproduce an id, e.g. ``xxhash.xxh64_intdigest(b"cat", seed)`` in Python.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from dynembed.kernels.strings import hash_bytes_by_lengths, hash_utf8_by_codepoints

DEFAULT_HASH_SEED = 0
"""The seed every table uses unless told otherwise."""

_SEPARATOR = "\x00"


def check_hash_seed(hash_seed: int) -> None:
    """Raises ValueError unless ``hash_seed`` is an int in [0, 2**64)."""
    if isinstance(hash_seed, bool) or not isinstance(hash_seed, (int, np.integer)) \
            or not 0 <= int(hash_seed) < 2**64:
        raise ValueError(f"hash_seed must be an int in [0, 2**64), got {hash_seed!r}")


def _count_keys(keys, kind: type) -> int:
    """``len(keys)``; raises TypeError for one key given alone (a str would hash its
    characters) or for something that is not a sequence."""
    if isinstance(keys, (str, bytes, bytearray)):
        raise TypeError(f"keys must be a list of {kind.__name__} keys, got a single "
                        f"{type(keys).__name__} {keys[:40]!r}; wrap it: [key]")
    try:
        return len(keys)
    except TypeError:
        raise TypeError(f"keys must be a list of {kind.__name__} keys, got "
                        f"{type(keys).__name__}") from None


def hash_strings(keys: Sequence[str], hash_seed: int = DEFAULT_HASH_SEED) -> np.ndarray:
    """Ids of string keys.

    Args:
        keys: n Python ``str`` objects.
        hash_seed: the seed, 0 <= hash_seed < 2**64.

    Returns:
        (n,) int64 ids.

    Raises:
        TypeError: ``keys`` is a single str or not a sequence, or an element is not a str.
        ValueError: ``hash_seed`` is not an int in [0, 2**64).
    """
    check_hash_seed(hash_seed)
    n = _count_keys(keys, str)
    # One C-level join and encode, then a compiled pass: no per-key Python work.
    try:
        joined = _SEPARATOR.join(keys).encode("utf-8", "surrogatepass")
    except TypeError as e:  # "sequence item 0: expected str instance, int found"
        raise TypeError(f"keys must hold only str: {e}") from None
    lengths = np.fromiter(map(len, keys), dtype=np.int64, count=n)
    buf = np.frombuffer(joined, dtype=np.uint8)
    digests = hash_utf8_by_codepoints(buf, lengths, 1, np.uint64(hash_seed))
    return digests.view(np.int64)


def hash_bytes(keys: Sequence[bytes], hash_seed: int = DEFAULT_HASH_SEED) -> np.ndarray:
    """Ids of bytes keys; same contract as :func:`hash_strings`.

    Raises:
        TypeError: an element is not bytes or bytearray. ``b"".join`` takes any buffer
            (a numpy array, a memoryview), whose ``len`` need not be its size in bytes: the
            later keys would hash shifted bytes, and the kernel could read past the end.
    """
    check_hash_seed(hash_seed)
    n = _count_keys(keys, bytes)
    kinds = set(map(type, keys))  # a C-level scan
    if not all(issubclass(t, (bytes, bytearray)) for t in kinds):
        other = next(t for t in kinds if not issubclass(t, (bytes, bytearray)))
        raise TypeError(f"keys must hold only bytes or bytearray: {other.__name__} found")
    joined = b"".join(keys)
    lengths = np.fromiter(map(len, keys), dtype=np.int64, count=n)
    buf = np.frombuffer(joined, dtype=np.uint8)
    digests = hash_bytes_by_lengths(buf, lengths, np.uint64(hash_seed))
    return digests.view(np.int64)
