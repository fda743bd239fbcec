"""ChangeTracker: which rows changed since the table's last checkpoint (for delta saves).

A delta checkpoint holds the rows that changed since its parent and the ids deleted since.
The tracker keeps a flag per memory slot (new rows, training lookups, optimizer updates,
writes) and, for rows that leave memory, their ids: ``moved`` for changed rows evicted to the
store, ``removed`` for erased or discarded ones. The candidates of a delta are the union; a
candidate that still has a row (in memory, the store or the lazy base) is saved as changed,
one that has none as deleted, whatever happened in between. ``wiped`` (a ``clear`` or a
state-dict load) means only a full checkpoint can describe the table.

The id lists grow with every row that leaves memory between two checkpoints, a row evicted
again after it was read back from the store included: they are deduplicated whenever they
double, so they hold at most max(twice the distinct ids that left memory since the last
checkpoint, :data:`DEDUP_FLOOR`) ids, and none while the table is wiped (never saved or
loaded, or cleared or loaded from a state dict since: the next save is full and reads no
ids), which once made a job that never checkpoints grow by 8 bytes per row that ever left
memory.
"""

from __future__ import annotations

import numpy as np

from dynembed.kernels.gather import set_flags

DEDUP_FLOOR = 1 << 16
"""Ids listed before the first deduplication."""


class ChangeTracker:
    """Changes since checkpoint ``since`` (None: never saved or loaded)."""

    def __init__(self) -> None:
        self.flags = np.zeros(0, dtype=np.uint8)
        self.moved: list[np.ndarray] = []
        self.removed: list[np.ndarray] = []
        self.wiped = True
        self.since: str | None = None
        self._listed = 0  # ids in moved and removed
        self._distinct = 0  # ... after their last deduplication
        self.resets = 0
        """Times every flag was cleared at once (a checkpoint taken or loaded, a wipe):
        flags set since the last one still stand (see :meth:`marks_stand`)."""

    def marks_stand(self, resets: int) -> bool:
        """Whether flags set when :attr:`resets` was ``resets`` are still set (no checkpoint
        or wipe cleared them since; rows that leave memory change the table's erasure count,
        which callers check too)."""
        return resets == self.resets

    def mark(self, slots: np.ndarray) -> None:
        """Rows at ``slots`` changed."""
        if slots.shape[0] and set_flags(self.flags, slots):
            self.grow(slots)

    def grow(self, slots: np.ndarray) -> None:
        """Makes room for every slot of ``slots`` and marks them (the rare path of
        :meth:`mark` and of lookups, whose kernel marks in place)."""
        top = int(slots.max()) + 1
        grown = np.zeros(max(top, 2 * self.flags.shape[0], 1024), dtype=np.uint8)
        grown[:self.flags.shape[0]] = self.flags
        self.flags = grown
        set_flags(self.flags, slots)

    def changed(self, slots: np.ndarray) -> np.ndarray:
        """(n,) bool, whether the rows at ``slots`` changed."""
        inside = slots < self.flags.shape[0]
        out = np.zeros(slots.shape[0], dtype=bool)
        out[inside] = self.flags[slots[inside]] != 0
        return out

    def clean(self, slots: np.ndarray) -> None:
        """Rows at ``slots`` equal the checkpoint (e.g. just read back from it)."""
        self.flags[slots[slots < self.flags.shape[0]]] = 0

    def left_memory(self, ids: np.ndarray, slots: np.ndarray, *, erased: bool) -> None:
        """Rows of ``ids`` (at ``slots``) left memory: erased/discarded, or moved to the
        store (kept only if they had changed)."""
        if not self.wiped:
            listed = ids.copy() if erased else ids[self.changed(slots)]
            if listed.shape[0]:
                (self.removed if erased else self.moved).append(listed)
                self._listed += listed.shape[0]
                if self._listed > max(2 * self._distinct, DEDUP_FLOOR):
                    self._deduplicate()
        self.clean(slots)

    def _deduplicate(self) -> None:
        for name in ("moved", "removed"):
            parts = getattr(self, name)
            if len(parts) > 1:
                setattr(self, name, [np.unique(np.concatenate(parts))])
        self._listed = self._distinct = sum(p.shape[0] for p in (*self.moved, *self.removed))

    def wipe(self) -> None:
        """Every row went (clear, state-dict load): the next checkpoint must be full."""
        self.flags[:] = 0
        self.moved, self.removed = [], []
        self._listed = self._distinct = 0
        self.wiped = True
        self.resets += 1

    def candidates(self, slot_ids: np.ndarray) -> np.ndarray:
        """Ids that may differ from the checkpoint, possibly repeated: ``slot_ids`` is the
        id column of the arena (the ids of changed slots are taken from it)."""
        top = min(self.flags.shape[0], slot_ids.shape[0])
        parts = [slot_ids[:top][self.flags[:top] != 0], *self.moved, *self.removed]
        return np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)

    def reset(self, since: str) -> None:
        """The table now equals checkpoint ``since``."""
        self.flags[:] = 0
        self.moved, self.removed = [], []
        self._listed = self._distinct = 0
        self.wiped = False
        self.since = since
        self.resets += 1
