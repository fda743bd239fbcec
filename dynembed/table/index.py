"""HashIndex: id -> slot, an open-addressing table over the compiled kernels."""

from __future__ import annotations

import numpy as np

from dynembed.kernels import hash_index as k
from dynembed.kernels._streaming import can_stream
from dynembed.kernels._threads import get_num_threads
from dynembed.kernels.hash_index import MAX_LOAD, buckets_for
from dynembed.table._memory import host_empty

EMPTY = k.EMPTY


class HashIndex:
    """Maps int64 ids (any value) to int64 arena slots.

    Every method takes ids as :func:`~dynembed.kernels.hash_index.as_ids` reads them: int64,
    uint64 as the int64 of the same bits, other integer arrays by value; others raise
    TypeError.

    Capacity is a power of two kept at most 75% full; erase shifts entries back, so there
    are no tombstones. ``table`` is a (buckets, 2) host numpy array of (id, slot) pairs used
    directly by the numba kernels.
    """

    def __init__(self, entries: int = 0) -> None:
        self.table = self._empty(buckets_for(entries))
        self.size = 0

    @staticmethod
    def _empty(buckets: int) -> np.ndarray:
        table = host_empty((buckets, 2), np.int64)
        table[:, k.ROW] = EMPTY
        return table

    @property
    def keys(self) -> np.ndarray:
        """(buckets,) id column (a view; meaningful where ``rows`` is not EMPTY)."""
        return self.table[:, k.KEY]

    @property
    def rows(self) -> np.ndarray:
        """(buckets,) slot column (a view), EMPTY for free buckets."""
        return self.table[:, k.ROW]

    @property
    def buckets(self) -> int:
        """Number of buckets (a power of two)."""
        return self.table.shape[0]

    @property
    def nbytes(self) -> int:
        """Bytes held by the index."""
        return self.table.nbytes

    def reserve(self, entries: int) -> None:
        """Rehashes into more buckets if ``entries`` would exceed the load limit.

        Raises:
            MemoryError: the new buckets cannot be allocated (the index is unchanged).
        """
        buckets = buckets_for(entries)
        if buckets <= self.buckets:
            return
        try:
            grown = self._empty(buckets)
        except MemoryError as e:
            raise MemoryError(
                f"cannot allocate a hash index of {buckets:,} buckets for {entries:,} rows "
                f"({buckets * 16 / 2**30:.2f} GiB): {e}. The index is unchanged; free memory, "
                "set a memory_budget / max_rows, or give the table a store= for the rows "
                "that do not fit") from e
        k.index_rehash(self.table, grown)
        self.table = grown  # filled first: a reader never sees the new buckets empty

    def find(self, ids: np.ndarray) -> np.ndarray:
        """(n,) int64 slot per id, EMPTY where absent."""
        return k.index_find(self.table, k.as_ids(ids), get_num_threads())

    def find_rows(self, ids: np.ndarray, rows: np.ndarray,
                  out: np.ndarray) -> tuple[np.ndarray, int]:
        """Slots of ids, copying each present id's row of ``rows`` into ``out`` in the same
        pass (faster than :meth:`find` and a gather).

        Args:
            ids: (n,) int64 ids.
            rows: (m, dim) float32 rows by slot; every slot in the index must be below m
                (the table's arena; the kernel does not bounds-check).
            out: (n, dim) float32; rows of absent ids are left as they are. A large output
                whose rows are 32-byte aligned (e.g. from ``torch.empty``) is written with
                streaming stores, which skip reading its lines first.

        Returns:
            (slots, absent): the (n,) int64 slot per id, EMPTY where absent, and how many
            ids were absent.
        """
        ids = k.as_ids(ids)
        slots = np.empty(ids.shape[0], dtype=np.int64)
        absent = k.index_find_rows(self.table, ids, rows, out, slots, get_num_threads(),
                                   can_stream(out, rows))
        return slots, int(absent)

    def insert_missing(self, ids: np.ndarray, slots: np.ndarray, free_rows: np.ndarray,
                       free_top: int, high_water: int) -> tuple[int, int, int]:
        """Gives a slot to every id whose entry in ``slots`` is EMPTY (see kernel docs).

        The caller reserves room for the new entries first (one rehash, not several); if it
        reserved too little, the index grows here rather than pass its load limit.
        """
        ids = k.as_ids(ids)
        total = 0
        start = 0
        while True:
            room = int(self.buckets * MAX_LOAD) - self.size
            inserted, free_top, high_water, stop = k.index_insert(
                self.table, ids[start:], slots[start:], free_rows, free_top, high_water, room)
            self.size += inserted
            total += inserted
            if stop == ids.shape[0] - start:
                return total, free_top, high_water
            start += stop
            # at most every id left is new (duplicates make it fewer)
            self.reserve(self.size + ids.shape[0] - start)

    def erase(self, ids: np.ndarray) -> np.ndarray:
        """Removes ids; returns the freed slot per id, EMPTY where absent."""
        freed = k.index_erase(self.table, k.as_ids(ids))
        self.size -= int(np.count_nonzero(freed != EMPTY))
        return freed

    def items(self) -> tuple[np.ndarray, np.ndarray]:
        """((size,) ids, (size,) slots) of every entry."""
        return k.index_items(self.table, self.size)

    def bucket_hashes(self) -> np.ndarray:
        """(size,) uint64 bucket hashes of every id (see :mod:`dynembed.keys.buckets`)."""
        return k.index_bucket_hashes(self.table, self.size)

    def clear(self) -> None:
        """Removes every entry (keeps the buckets)."""
        self.table[:, k.ROW] = EMPTY
        self.size = 0
