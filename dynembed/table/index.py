"""HashIndex: id -> slot, an open-addressing table over the compiled kernels."""

from __future__ import annotations

import numpy as np

from dynembed.kernels import hash_index as k

EMPTY = k.EMPTY
_MAX_LOAD = 0.75


def _buckets_for(entries: int) -> int:
    need = max(16, int(np.ceil(entries / _MAX_LOAD)))
    return 1 << (need - 1).bit_length()


class HashIndex:
    """Maps int64 ids (any value) to int64 arena slots.

    Capacity is a power of two kept at most 75% full; erase shifts entries back, so there
    are no tombstones. Arrays are host numpy arrays used directly by numba kernels.
    """

    def __init__(self, entries: int = 0) -> None:
        self._alloc(_buckets_for(entries))
        self.size = 0

    def _alloc(self, buckets: int) -> None:
        self.keys = np.empty(buckets, dtype=np.int64)
        self.rows = np.full(buckets, EMPTY, dtype=np.int64)

    @property
    def buckets(self) -> int:
        """Number of buckets (a power of two)."""
        return self.keys.shape[0]

    @property
    def nbytes(self) -> int:
        """Bytes held by the index arrays."""
        return self.keys.nbytes + self.rows.nbytes

    def reserve(self, entries: int) -> None:
        """Rehashes into more buckets if ``entries`` would exceed the load limit."""
        buckets = _buckets_for(entries)
        if buckets <= self.buckets:
            return
        old_keys, old_rows = self.keys, self.rows
        self._alloc(buckets)
        k.index_rehash(old_keys, old_rows, self.keys, self.rows)

    def find(self, ids: np.ndarray) -> np.ndarray:
        """(n,) int64 slot per id, EMPTY where absent."""
        return k.index_find(self.keys, self.rows, ids)

    def insert_missing(self, ids: np.ndarray, slots: np.ndarray, free_rows: np.ndarray,
                       free_top: int, high_water: int) -> tuple[int, int, int]:
        """Gives a slot to every id whose entry in ``slots`` is EMPTY (see kernel docs).

        The caller reserves room for the new entries first.
        """
        inserted, free_top, high_water = k.index_insert(
            self.keys, self.rows, ids, slots, free_rows, free_top, high_water)
        self.size += inserted
        return inserted, free_top, high_water

    def erase(self, ids: np.ndarray) -> np.ndarray:
        """Removes ids; returns the freed slot per id, EMPTY where absent."""
        freed = k.index_erase(self.keys, self.rows, ids)
        self.size -= int(np.count_nonzero(freed != EMPTY))
        return freed

    def items(self) -> tuple[np.ndarray, np.ndarray]:
        """((size,) ids, (size,) slots) of every entry."""
        return k.index_items(self.keys, self.rows, self.size)

    def clear(self) -> None:
        """Removes every entry (keeps the buckets)."""
        self.rows.fill(EMPTY)
        self.size = 0
