"""Tier: the store under a table's memory (read-through, write-back or write-through).

Memory is a cache over the store. A row in memory is newer than any stored copy of it, so the
store is only read for ids that have no row in memory. ``dirty`` marks rows changed since
they were last written (new rows, updates, metadata of training lookups); write-back writes
them when they are evicted or flushed, write-through writes updated rows at once.
"""

from __future__ import annotations

import numpy as np

from dynembed.storage.base import EmbeddingStore
from dynembed.storage.rows import RowBlock
from dynembed.table.arena import COUNT, ID, LAST_STEP, RowArena

WRITE_POLICIES = ("back", "through")


class Tier:
    """A table's store plus the dirty marks of its rows in memory.

    Args:
        store: the backend (bound here to the table's dim and optimizer state width).
        write_policy: "back" (write when evicted or flushed) or "through" (on every update).
        arena: the table's row arena.
    """

    def __init__(self, store: EmbeddingStore, write_policy: str, arena: RowArena) -> None:
        store.bind(arena.dim, arena.state_width)
        self.store, self.write_policy, self.arena = store, write_policy, arena
        self.dirty = np.zeros(0, dtype=bool)

    @property
    def write_through(self) -> bool:
        return self.write_policy == "through"

    def mark(self, slots: np.ndarray) -> None:
        """Marks rows at ``slots`` as changed since written."""
        if self.dirty.shape[0] < self.arena.capacity:
            grown = np.zeros(self.arena.capacity, dtype=bool)
            grown[:self.dirty.shape[0]] = self.dirty
            self.dirty = grown
        self.dirty[slots] = True

    def rows(self, slots: np.ndarray) -> RowBlock:
        """Copies of the rows at ``slots`` with their state and metadata."""
        meta = self.arena.np("meta")[slots]
        return RowBlock(meta[:, ID].copy(), self.arena.np("weights")[slots],
                        self.arena.np("state")[slots], meta[:, COUNT].copy(),
                        meta[:, LAST_STEP].copy())

    def write(self, slots: np.ndarray, *, only_dirty: bool = True) -> int:
        """Writes rows at ``slots`` (only the dirty ones by default) in one batch.

        Returns:
            Rows written.

        Raises:
            StoreError: the write failed; dirty marks are unchanged.
        """
        if only_dirty:
            slots = slots[self.dirty[slots]] if self.dirty.shape[0] else slots[:0]
        if slots.shape[0]:
            self.store.put(self.rows(slots))
            self.dirty[slots] = False
        return int(slots.shape[0])

    def dirty_slots(self) -> np.ndarray:
        """(d,) slots of every dirty row."""
        return np.flatnonzero(self.dirty)

    def forget(self, slots: np.ndarray) -> None:
        """Clears the marks of freed slots."""
        if self.dirty.shape[0]:
            self.dirty[slots] = False
