"""Key buckets: the fixed partition of ids that checkpoints and sharding are built on.

An id's bucket is the top bits of a 64-bit bijective hash of it (``bucket_hash``), so rows
sorted by that hash are also grouped by bucket, and the id can be recovered from the hash
(``id_of_hash``). Checkpoint files keep rows in hash order with per-bucket offsets, so a
reader that owns any set of buckets reads contiguous ranges, whoever wrote the file. Bucket
``b`` of ``B`` belongs to rank ``b * world_size // B`` (contiguous ranges of buckets).
"""

from __future__ import annotations

import numba as nb
import numpy as np

from dynembed.kernels._hashing import BUCKET_SALT as _SALT
from dynembed.kernels._hashing import bucket_mix as hash_of_id

NUM_BUCKETS = 4096
"""Default number of key buckets of a checkpoint (a power of two)."""

_C1_INV = np.uint64(0x4F74430C22A54005)  # inverses of mix64's multipliers mod 2**64
_C2_INV = np.uint64(0x9CB4B2F8129337DB)


@nb.njit(inline="always", cache=True)
def _unxorshift33(x):
    return x ^ (x >> np.uint64(33))  # 33 >= 64 / 2: one step inverts it


@nb.njit(cache=True)
def _hashes(ids):
    out = np.empty(ids.shape[0], dtype=np.uint64)
    for i in range(ids.shape[0]):
        out[i] = hash_of_id(ids[i])
    return out


@nb.njit(cache=True)
def _ids(hashes):
    out = np.empty(hashes.shape[0], dtype=np.int64)
    for i in range(hashes.shape[0]):
        x = _unxorshift33(hashes[i])
        x *= _C2_INV
        x = _unxorshift33(x)
        x *= _C1_INV
        x = _unxorshift33(x)
        out[i] = np.int64(x ^ _SALT)
    return out


def check_num_buckets(num_buckets: int, arg: str = "num_buckets") -> int:
    """Returns ``num_buckets`` if it is a power of two in [1, 2**20].

    Raises:
        ValueError: otherwise.
    """
    if (isinstance(num_buckets, bool) or not isinstance(num_buckets, (int, np.integer))
            or not 1 <= num_buckets <= 1 << 20 or num_buckets & (num_buckets - 1)):
        raise ValueError(f"{arg} must be a power of two between 1 and 2**20 (e.g. 4096), "
                         f"got {num_buckets!r}")
    return int(num_buckets)


def bucket_hash(ids: np.ndarray) -> np.ndarray:
    """(n,) uint64 bucket hashes of (n,) int64 ids (a bijection)."""
    return _hashes(np.ascontiguousarray(ids, dtype=np.int64))


def id_of_hash(hashes: np.ndarray) -> np.ndarray:
    """(n,) int64 ids of (n,) uint64 bucket hashes: the inverse of :func:`bucket_hash`."""
    return _ids(np.ascontiguousarray(hashes, dtype=np.uint64))


def bucket_of_hash(hashes: np.ndarray, num_buckets: int) -> np.ndarray:
    """(n,) int64 bucket of each hash: its top log2(num_buckets) bits."""
    shift = np.uint64(64 - (int(num_buckets).bit_length() - 1))
    if num_buckets == 1:
        return np.zeros(hashes.shape[0], dtype=np.int64)
    return (hashes >> shift).astype(np.int64)


def buckets_of(ids: np.ndarray, num_buckets: int = NUM_BUCKETS) -> np.ndarray:
    """(n,) int64 bucket of each of (n,) int64 ids."""
    return bucket_of_hash(bucket_hash(ids), check_num_buckets(num_buckets))


def rank_buckets(rank: int, world_size: int, num_buckets: int = NUM_BUCKETS) -> range:
    """The buckets rank ``rank`` of ``world_size`` owns: a contiguous range.

    Raises:
        ValueError: rank or world size out of range.
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in [0, {world_size}), got {rank!r}")
    check_num_buckets(num_buckets)
    start = -(-rank * num_buckets // world_size)
    stop = -(-(rank + 1) * num_buckets // world_size)
    return range(start, stop)


def rank_of_bucket(buckets: np.ndarray, world_size: int, num_buckets: int) -> np.ndarray:
    """(n,) int64 owning rank of each bucket (see :func:`rank_buckets`)."""
    return (np.asarray(buckets, dtype=np.int64) * world_size) // num_buckets
