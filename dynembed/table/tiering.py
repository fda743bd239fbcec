"""Tier: the store under a table's memory (read-through, write-back or write-through).

Memory is a cache over the store. A row in memory is newer than any stored copy of it, so the
store is only read for ids that have no row in memory. ``dirty`` marks rows changed since
they were last written (new rows, updates, metadata of training lookups).

Store I/O can run off the training thread: with write-back and a store whose
``background_io`` is on, evicted rows are handed to one background writer thread (at most
``MAX_PENDING_WRITES`` batches in flight) and stay readable from that queue until the store
has them; ``prefetch(ids)`` reads rows of an upcoming batch on the same thread. RocksDB
releases the GIL while it works, so this I/O can overlap the training step. One worker thread runs every background task in
order, so a prefetch never reads a row older than a write queued before it; writes queued
after a prefetch drop the rows it staged. A background failure is raised by the next call
(the batch stays queued and readable) and retried by it, so no row is ever lost. Reads
may run from many threads at once (eval, serving): a lock guards the queue and the prefetch,
and each read walks a snapshot of the queue.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from dynembed.errors import StoreError
from dynembed.keys.buckets import buckets_of
from dynembed.storage.base import EmbeddingStore
from dynembed.storage.rows import RowBlock
from dynembed.table.arena import RowArena

logger = logging.getLogger(__name__)

WRITE_POLICIES = ("back", "through")
MAX_PENDING_WRITES = 2


def _positions(sorted_ids: np.ndarray, ids: np.ndarray,
               among: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(indices into ids found in sorted_ids, their positions there); with ``among`` (a
    bool mask over ids), only ids where it is True are looked for."""
    where = np.arange(ids.shape[0]) if among is None else np.flatnonzero(among)
    if sorted_ids.shape[0] == 0 or where.shape[0] == 0:
        return where[:0], where[:0]
    pos = np.minimum(np.searchsorted(sorted_ids, ids[where]), sorted_ids.shape[0] - 1)
    match = sorted_ids[pos] == ids[where]
    return where[match], pos[match]


@dataclass
class _Pending:
    """Rows queued for the store: sorted by id, readable until the write completes."""

    rows: RowBlock
    future: Future


@dataclass
class _Staged:
    """A prefetch: ids (sorted), which the store had, their rows, and ids made stale since."""

    ids: np.ndarray
    future: Future
    found: np.ndarray | None = None
    rows: RowBlock | None = None
    valid: np.ndarray | None = None
    stale: list | None = None


class Tier:
    """A table's store, the dirty marks of its rows, and the background I/O queue.

    Args:
        store: the backend (bound here to the table's dim and optimizer state width).
        write_policy: "back" (write when evicted or flushed, in the background) or
            "through" (on every update, synchronously).
        arena: the table's row arena.
        meaning: what else the store's rows must share with the table (see
            :meth:`EmbeddingStore.bind`).
    """

    def __init__(self, store: EmbeddingStore, write_policy: str, arena: RowArena,
                 meaning: dict | None = None) -> None:
        store.bind(arena.dim, arena.state_width, meaning)
        self._store, self.write_policy, self.arena = store, write_policy, arena
        self.dirty = np.zeros(0, dtype=bool)
        self._pending: deque[_Pending] = deque()
        self._staged: _Staged | None = None
        self._worker: ThreadPoolExecutor | None = None
        self._lock = threading.RLock()
        """Guards the queue and the prefetch: reads (eval lookups, serving) may run from many
        threads at once, and each of them settles the queue."""
        self.owned: tuple[range, int] | None = None
        """(buckets, num_buckets) of a distributed table's shard over a shared store: the
        other shards' rows in the store are theirs, never scanned or cleared here."""

    def claim(self) -> None:
        """Makes this tier the store object's owner; the table calls it once it is fully
        built (a construction that fails takes nothing).

        The newest table over a store object owns it (rebuilding a model over the same store
        takes it over); an older table still alive then fails on its next store call instead
        of writing over the new table's rows. Writes it had queued land first.
        """
        previous = self._owner()
        if previous is not None and previous is not self:
            previous.drain()
        # an owner since collected: its executor still runs what it queued
        for pending in list(getattr(self._store, "_queued_writes", ())):
            try:
                pending.future.result()
            except Exception:
                logger.warning("a queued write of a table no longer alive failed",
                               exc_info=True)
        self._store._tier = weakref.ref(self)
        self._store._queued_writes = self._pending

    def _owner(self) -> Tier | None:
        ref = getattr(self._store, "_tier", None)
        return ref() if ref is not None else None

    @property
    def owns_store(self) -> bool:
        """Whether no table built later over the same store object took it over (a table
        taken over never gets the store back, even once the newer one is gone: its rows
        are older)."""
        ref = getattr(self._store, "_tier", None)
        return ref is None or ref() is self

    @property
    def store(self) -> EmbeddingStore:
        """The backend, while this table owns it.

        Raises:
            StoreError: a table built later over the same store object took it over.
        """
        if not self.owns_store:
            raise StoreError(f"{self._store.name} was taken over by a table built later over "
                             "the same store object; this table can no longer use it. Give "
                             "each live table its own store (another path or namespace)")
        return self._store

    @property
    def store_name(self) -> str:
        """The backend's name for messages (also once another table took it over)."""
        return self._store.name

    @property
    def write_through(self) -> bool:
        return self.write_policy == "through"

    # ------------------------------------------------------------------ dirty marks
    def mark(self, slots: np.ndarray) -> None:
        """Marks rows at ``slots`` as changed since written."""
        if self.dirty.shape[0] < self.arena.capacity:
            grown = np.zeros(self.arena.capacity, dtype=bool)
            grown[:self.dirty.shape[0]] = self.dirty
            self.dirty = grown
        self.dirty[slots] = True

    def forget(self, slots: np.ndarray) -> None:
        """Clears the marks of freed or freshly loaded slots."""
        if self.dirty.shape[0]:
            self.dirty[slots] = False

    def dirty_slots(self) -> np.ndarray:
        """(d,) slots of every dirty row."""
        return np.flatnonzero(self.dirty)

    # ------------------------------------------------------------------ background queue
    def _submit(self, fn, *args) -> Future:
        if self._worker is None:
            self._worker = ThreadPoolExecutor(1, thread_name_prefix="dynembed-store")
        return self._worker.submit(fn, *args)

    def _settle(self, wait: int = 0) -> None:
        """Drops completed writes from the queue, waiting for the oldest ``wait`` ones.

        A failed write is retried here, on the calling thread, without the ids that a later
        queued write holds newer copies of (those may have landed already); if it fails
        again its error is raised and the batch stays queued (and readable).
        """
        with self._lock:  # two readers could pop the same landed write, or one not landed
            while self._pending and (wait > 0 or self._pending[0].future.done()):
                head = self._pending[0]
                try:
                    head.future.result()
                except StoreError:
                    rows = head.rows
                    newer = [p.rows.ids for p in list(self._pending)[1:]]
                    if newer:
                        rows = rows.take(~np.isin(rows.ids, np.concatenate(newer)))
                    # a prefetch read while this batch was missing from the store is stale
                    self._invalidate(rows.ids)
                    self.store.put(rows)  # raises if the store still fails
                self._pending.popleft()
                wait -= 1

    def drain(self) -> None:
        """Waits until every queued write is in the store (raising its error, if any)."""
        self._settle(wait=len(self._pending))

    def _invalidate(self, ids: np.ndarray) -> None:
        """Ids about to change in the store no longer match a prefetch's copies."""
        with self._lock:
            staged = self._staged
            if staged is None or ids.shape[0] == 0:
                return
            if staged.valid is None:  # still reading: drop them when it is consumed
                staged.stale.append(ids.copy())
            else:
                staged.valid[_positions(staged.ids, ids)[1]] = False

    # ------------------------------------------------------------------ reads
    def prefetch(self, ids: np.ndarray) -> None:
        """Starts reading ``ids`` (distinct, absent from memory) from the store in the
        background; a later :meth:`get` takes them from there. Replaces an earlier
        prefetch."""
        with self._lock:
            self._settle()
            ids = np.unique(ids)
            self._staged = _Staged(ids, self._submit(self.store.get, ids), stale=[])

    def _take_staged(self) -> _Staged | None:
        with self._lock:  # concurrent readers: one consumes it, the others see it whole
            staged = self._staged
            if staged is not None and staged.valid is None:
                try:
                    found, rows = staged.future.result()
                except StoreError:
                    self._staged = None  # a failed prefetch only costs the synchronous read
                    return None
                valid = np.ones(staged.ids.shape[0], dtype=bool)
                stale = staged.stale
                if stale:
                    valid[_positions(staged.ids, np.concatenate(stale))[1]] = False
                staged.found, staged.rows, staged.valid = found, rows, valid
            return staged

    def get(self, ids: np.ndarray) -> tuple[np.ndarray, RowBlock]:
        """Rows of distinct ids from the write queue, a prefetch, or the store, newest first.

        Returns:
            ((n,) bool found mask, RowBlock of the found rows in the order of ``ids``).

        Raises:
            StoreError: the store failed (nothing changed).
        """
        with self._lock:
            # a snapshot: the queue may be settled by another reader while this one walks
            # it (a write popped has landed, so the store answers for it as well)
            self._settle()
            pending = list(self._pending)
            staged = self._take_staged()
        n = ids.shape[0]
        found = np.zeros(n, dtype=bool)
        answered = np.zeros(n, dtype=bool)
        source = np.full(n, -1, dtype=np.int64)  # block of each found row
        row_of = np.zeros(n, dtype=np.int64)  # its row in that block
        blocks: list[RowBlock] = []
        for queued in reversed(pending):
            where, pos = _positions(queued.rows.ids, ids, among=~answered)
            if where.shape[0]:
                found[where] = answered[where] = True
                source[where], row_of[where] = len(blocks), pos
                blocks.append(queued.rows)
        if staged is not None:
            where, pos = _positions(staged.ids, ids, among=~answered)
            usable = staged.valid[pos]
            where, pos = where[usable], pos[usable]
            if where.shape[0]:
                answered[where] = True  # found, or known to be absent
                hit = staged.found[pos]
                found[where[hit]] = True
                rank = np.cumsum(staged.found) - 1  # row of each found id in staged.rows
                source[where[hit]], row_of[where[hit]] = len(blocks), rank[pos[hit]]
                blocks.append(staged.rows)
        rest = np.flatnonzero(~answered)
        if rest.shape[0]:
            got, stored = self.store.get(ids[rest])
            where = rest[got]
            found[where] = True
            source[where], row_of[where] = len(blocks), np.arange(where.shape[0])
            blocks.append(stored)
        return found, self._assemble(blocks, source[found], row_of[found])

    def _assemble(self, blocks: list[RowBlock], source: np.ndarray,
                  row_of: np.ndarray) -> RowBlock:
        if len(blocks) == 1:
            return blocks[0].take(row_of)
        parts = [blocks[b].take(row_of[source == b]) for b in range(len(blocks))]
        merged = RowBlock.concat(parts, self.arena.dim, self.arena.state_width)
        order = np.argsort(np.argsort(source, kind="stable"), kind="stable")
        return merged.take(order)

    # ------------------------------------------------------------------ writes
    def write(self, slots: np.ndarray, *, only_dirty: bool = True) -> int:
        """Writes rows at ``slots`` (only the dirty ones by default).

        With write-back the batch is queued for the background writer (waiting for room if
        ``MAX_PENDING_WRITES`` are in flight); write-through writes it at once.

        Returns:
            Rows written or queued.

        Raises:
            StoreError: the write (or a retried earlier one) failed; marks are unchanged.
        """
        if only_dirty:
            slots = slots[self.dirty[slots]] if self.dirty.shape[0] else slots[:0]
        if slots.shape[0] == 0:
            return 0
        rows = self.arena.rows(slots)
        self._settle(wait=max(0, len(self._pending) - MAX_PENDING_WRITES + 1))
        self._invalidate(rows.ids)
        if self.write_through or not self.store.background_io:
            self.store.put(rows)
        else:
            rows = rows.take(np.argsort(rows.ids))
            with self._lock:  # readers snapshot the queue under it
                self._pending.append(_Pending(rows, self._submit(self.store.put, rows)))
        self.dirty[slots] = False
        return int(slots.shape[0])

    def put(self, rows: RowBlock) -> None:
        """Writes rows synchronously (after the queue)."""
        self.drain()
        self._invalidate(rows.ids)
        self.store.put(rows)

    def delete(self, ids: np.ndarray) -> None:
        """Deletes ids from the store synchronously (after the queue)."""
        self.drain()
        self._invalidate(ids)
        self.store.delete(ids)

    def clear(self) -> None:
        """Empties the store (of this shard's rows, see :attr:`owned`) and forgets every
        mark and prefetch. The clock record goes too, first (for a shard, the one its
        ranks share): it belongs to rows no longer there, and a checkpoint restored next
        brings an older clock, recorded at the next flush."""
        self.drain()
        self._staged = None
        if self.owned is None:
            self.store.clear()
        else:  # the ids first: a store need not allow deletes while it is scanned
            self.store.drop_clock()
            ids = [block.ids for block in self.scan()]
            for chunk in ids:
                self.store.delete(chunk)
        self.dirty[:] = False

    def scan(self, batch_size: int = 1 << 16):
        """Every stored row (of this shard, see :attr:`owned`) after the queue, in blocks of
        at most ``batch_size``."""
        self.drain()
        blocks = self.store.scan(batch_size)
        return blocks if self.owned is None else self._own(blocks)

    def scan_from(self, cursor, batch_size: int) -> tuple[RowBlock, object | None]:
        """One block of a scan spread over many calls, of this shard's rows (see
        :meth:`EmbeddingStore.scan_from`: a copy may be older than the queue's or the
        store's by now)."""
        block, cursor = self.store.scan_from(cursor, batch_size)
        if self.owned is not None and len(block):
            block = next(self._own([block]), block.take(np.zeros(len(block), dtype=bool)))
        return block, cursor

    def _own(self, blocks):
        buckets, num_buckets = self.owned
        for block in blocks:
            bucket = buckets_of(block.ids, num_buckets)
            mine = (bucket >= buckets.start) & (bucket < buckets.stop)
            if mine.all():
                yield block
            elif mine.any():
                yield block.take(mine)

    def read_clock(self) -> dict | None:
        """The clock a table recorded in the store at its last flush (None: none). Read by
        a table being built, before it claims the store from the table it replaces."""
        return self._store.read_clock()

    def holds_rows(self) -> bool:
        """Whether the store holds any row; read as :meth:`read_clock` is, by a table being
        built. Stops at the first block."""
        blocks = self._store.scan(1024)
        try:
            return any(block.ids.shape[0] for block in blocks)
        finally:
            blocks.close()

    def drop_clock(self) -> None:
        """Removes the store's clock record (see :meth:`EmbeddingStore.drop_clock`)."""
        self.store.drop_clock()

    def flush(self, clock: dict[str, int] | None = None) -> None:
        """Waits for the queue, records ``clock`` (if given) after every row, and makes the
        store durable (a store taken over by another table is that table's to flush).

        Args:
            clock: the table's ``{"step", "update_step"}``; None records nothing (a
                read-only table, which must not move the clock of the table training it).
        """
        self.drain()
        if self.owns_store:
            if clock is not None:  # after the rows: never a clock ahead of them
                self._store.write_clock(clock)
            self._store.flush()

    def close(self) -> None:
        """Waits for the queue, stops the background thread and closes the store."""
        self.drain()
        if self._worker is not None:
            self._worker.shutdown(wait=True)
            self._worker = None
        if self.owns_store:  # else the table that took the store over closes it
            self._store.close()
