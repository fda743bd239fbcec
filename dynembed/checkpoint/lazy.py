"""LazyRows: a checkpoint's rows for one table, read on first use instead of loaded up front.

A restored table keeps a :class:`LazyRows` as its ``base``: lookups that miss memory and the
store binary-search the memory-mapped rows files of the checkpoint (newest delta first, a
deletion in a newer delta hiding older rows) and copy the rows they find into the table.
Opening reads each file's index (checksums and row offsets, about 0.15% of its bytes) and
no row; each lookup pays for the rows it faults in.
Ids the table erases or discards afterwards are hidden, so the checkpoint's copy never
comes back. :meth:`rows` streams the newest visible version of every row in bucket-hash
order, a bounded chunk at a time (full loads, compaction, full saves).
"""

from __future__ import annotations

import numbers
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from dynembed._args import check_int
from dynembed.checkpoint.rows_file import RowsFile
from dynembed.errors import CheckpointCorruptError
from dynembed.kernels.records import HEAD_WORDS, columns_of
from dynembed.keys.buckets import bucket_hash, bucket_of_hash
from dynembed.storage.rows import RowBlock
from dynembed.table.index import EMPTY, HashIndex
from dynembed.table.table import DynamicTable

DEFAULT_CHUNK_ROWS = 1 << 16
READERS = 1
"""Chunks read ahead by :meth:`LazyRows.chunks` (two readers on 2 cores starve the
consumer: measured slower)."""


TRIM_FLOOR = 1 << 16
"""Ids a hidden or outdated set takes before its first trim (see :meth:`LazyRows.hide`)."""


class _IdSet:
    """A growing set of int64 ids (a hash index whose rows are unused)."""

    def __init__(self) -> None:
        self._index = HashIndex()
        self._rows = 0
        self.kept = 0
        """Its size after the last :meth:`retain`."""

    @property
    def size(self) -> int:
        return self._index.size

    def retain(self, keep) -> None:
        """Keeps the ids for which ``keep(ids)`` is True. The index is replaced in one
        assignment: a reader thread sees the old set or the new one."""
        ids = self._index.items()[0]
        trimmed = _IdSet()
        trimmed.add(ids[keep(ids)])
        self._index, self._rows = trimmed._index, trimmed._rows
        self.kept = self.size

    def add(self, ids: np.ndarray) -> None:
        ids = np.unique(ids)
        slots = self._index.find(ids)
        new = int(np.count_nonzero(slots == EMPTY))
        if not new:
            return
        self._index.reserve(self._index.size + new)  # room for the new ids only
        _, _, self._rows = self._index.insert_missing(ids, slots, np.empty(0, np.int64), 0,
                                                      self._rows)

    def contains(self, ids: np.ndarray) -> np.ndarray:
        """(n,) bool."""
        if not self._index.size:
            return np.zeros(ids.shape[0], dtype=bool)
        return self._index.find(ids) != EMPTY


class LazyRows:
    """The rows of a chain of checkpoints (layers, newest first) for one table.

    Args:
        layers: per checkpoint of the chain, newest first, the table's rows files.
        buckets: the buckets this table owns (rows of other buckets are not streamed).
        dim, width: the table's row width and optimizer state width.
    """

    def __init__(self, layers: list[list[RowsFile]], buckets: range, dim: int,
                 width: int) -> None:
        self.layers = layers
        self.buckets = buckets
        self.dim, self.width = dim, width
        files = self.files
        self.num_buckets = files[0].num_buckets if files else 0
        self._partial = bool(files) and len(buckets) < self.num_buckets
        self._hidden = _IdSet()
        self._outdated = _IdSet()
        self.pending: Iterator[RowBlock] | None = None
        """The background load's position (see :func:`load_step`)."""
        self.carry: tuple[np.ndarray, np.ndarray] | None = None
        self.background_rows = 0
        """Rows loaded by each training lookup in the background (0: none)."""

    def load_all(self, table) -> None:
        """Loads every row not read yet into ``table`` (into its store if it has one)."""
        load_step(table, None)

    def advance(self, table) -> None:
        """One step of the background load, run by the table at a training lookup."""
        if load_step(table, self.background_rows) is False and self.carry is not None \
                and table.tier is None and table.max_rows is not None \
                and table.size() >= table.max_rows:
            self.background_rows = 0  # memory is full: lookups fault the rest in

    def _owns(self, ids: np.ndarray) -> np.ndarray:
        """(n,) bool, whether each id's bucket is one of this table's."""
        buckets = bucket_of_hash(bucket_hash(ids), self.num_buckets)
        return (buckets >= self.buckets.start) & (buckets < self.buckets.stop)

    @property
    def files(self) -> list[RowsFile]:
        return [f for layer in self.layers for f in layer]

    def _empty(self) -> RowBlock:
        return RowBlock.concat([], self.dim, self.width)

    def hide(self, ids: np.ndarray) -> None:
        """Hides the checkpoint's rows of distinct ``ids`` (erased or discarded by the
        table). See :meth:`_record` for the set's size."""
        self._record(self._hidden, ids)

    def hidden(self, ids: np.ndarray) -> np.ndarray:
        """(n,) bool, whether each id is hidden."""
        return self._hidden.contains(ids)

    def outdate(self, ids: np.ndarray) -> None:
        """Records that the table's rows of distinct ``ids`` differ from these checkpoints'
        copies; a later save cleared their changed marks, not this."""
        self._record(self._outdated, ids)

    def _record(self, where: _IdSet, ids: np.ndarray) -> None:
        """Adds ``ids`` to a hidden or outdated set. Whenever the set doubles it keeps only
        the ids with rows in these checkpoints (the others have nothing to hide or to read
        back stale), so it stays within the checkpoints' rows however many rows a long job
        drops, at one search per doubling (a search per drop slowed eviction 5x). Once
        recorded, every id was kept for the checkpoint's whole life."""
        where.add(ids)
        if where.size > max(2 * where.kept, TRIM_FLOOR):
            try:
                where.retain(lambda members: self._locate(members, rows=False,
                                                          hidden=False)[0])
            except CheckpointCorruptError:  # a damaged index: keep all, try when it doubles
                where.kept = where.size

    def outdated(self, ids: np.ndarray) -> np.ndarray:
        """(n,) bool, whether each id's row may differ from the checkpoints' copy (ids not
        in the checkpoints are not outdated: ask :meth:`contains`)."""
        return self._outdated.contains(ids)

    def get(self, ids: np.ndarray) -> tuple[np.ndarray, RowBlock]:
        """The newest visible checkpoint rows of distinct ids.

        Returns:
            ((n,) bool found, RowBlock of the found rows in the order of ``ids``).

        Raises:
            CheckpointCorruptError: a block the search reads is damaged.
        """
        return self._locate(ids, rows=True)

    def contains(self, ids: np.ndarray) -> np.ndarray:
        """(n,) bool, whether each of distinct ids has a visible row (reads no rows)."""
        return self._locate(ids, rows=False)[0]

    def _locate(self, ids: np.ndarray, *, rows: bool, hidden: bool = True
                ) -> tuple[np.ndarray, RowBlock | None]:
        """(found, rows) of distinct ids; ``hidden=False`` finds hidden rows too."""
        n = ids.shape[0]
        found = np.zeros(n, dtype=bool)
        open_ = ~self.hidden(ids) if hidden and self._hidden.size else np.ones(n, dtype=bool)
        if self._partial:  # another rank's keys are not this table's
            open_ &= self._owns(ids)
        where, parts = [], []
        for layer in self.layers:
            for rows_file in layer:  # each id is settled by the first file that has it
                idx = np.flatnonzero(open_)
                if idx.shape[0] == 0:
                    break
                query = ids[idx]
                pos = rows_file.find(query)
                hit = pos >= 0
                if hit.any():
                    found[idx[hit]] = True
                    if rows:
                        where.append(idx[hit])
                        parts.append(rows_file.take(pos[hit]))
                gone = hit | (rows_file.find_deleted(query) if rows_file.deleted else False)
                open_[idx[gone]] = False
        if not rows:
            return found, None
        if not parts:
            return found, self._empty()
        at = np.concatenate(where)
        block = RowBlock.concat(parts, self.dim, self.width)
        return found, block.take(np.argsort(at, kind="stable"))

    def _steps(self, chunk_rows: int) -> Iterator[tuple[int, int]]:
        """Bucket ranges of about ``chunk_rows`` rows covering the owned buckets."""
        files = self.files
        if not files:
            return
        total = sum(f.rows for f in files)
        step = max(1, chunk_rows * files[0].num_buckets // max(total, 1))
        for first in range(self.buckets.start, self.buckets.stop, step):
            yield first, min(first + step, self.buckets.stop)

    def chunks(self, chunk_rows: int = DEFAULT_CHUNK_ROWS
               ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """The newest visible version of every row of the owned buckets, in bucket-hash
        order, about ``chunk_rows`` rows at a time (whole buckets), as ``(ids, records)``
        (see :mod:`dynembed.kernels.records`)."""
        # A generator of the layers, not of ``self``: the background load keeps it in
        # ``self.pending``, and a generator holding ``self`` made a reference cycle, so a
        # table dropped in the middle of a load kept the checkpoint's files open (their
        # descriptors, mappings and, once deleted, disk space) until a full garbage collection.
        return _chunks(self.layers, self.dim, self.width, list(self._steps(chunk_rows)),
                       self._hidden)

    def rows(self, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> Iterator[RowBlock]:
        """:meth:`chunks` as RowBlocks (copies)."""
        for ids, records in self.chunks(chunk_rows):
            counts, last, weights, state = columns_of(records, self.dim)
            yield RowBlock(ids, weights, state, counts, last)

    def ids(self, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> Iterator[np.ndarray]:
        """The ids of the visible rows of the owned buckets, about ``chunk_rows`` at a time
        (reads ids only)."""
        for first, stop in self._steps(chunk_rows):
            ids = self._merge(first, stop, ids_only=True)[0]
            if ids.shape[0] and self._hidden.size:
                ids = ids[~self.hidden(ids)]
            if ids.shape[0]:
                yield ids

    def count(self, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> int:
        """Visible rows of the owned buckets (reads ids only)."""
        return sum(ids.shape[0] for ids in self.ids(chunk_rows))

    def _merge(self, first: int, stop: int, *,
               ids_only: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """See :func:`_merge`."""
        return _merge(self.layers, self.dim, self.width, first, stop, ids_only=ids_only)

    def close(self) -> None:
        """Drops the files (the table no longer reads from the checkpoint)."""
        self.layers = []
        if self.pending is not None:
            self.pending.close()  # now, not whenever the garbage collector gets to it
        self.pending = None


def _chunks(layers: list[list[RowsFile]], dim: int, width: int,
            steps: list[tuple[int, int]], hidden: _IdSet
            ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """:meth:`LazyRows.chunks`: the merged rows of each bucket range, read one range ahead.

    Args:
        layers: the rows files per checkpoint, newest first.
        dim, width: row width and optimizer state width.
        steps: ``(first, stop)`` bucket ranges, in order.
        hidden: ids to skip (erased or discarded by the table, also while this runs).
    """
    # the next chunk is read (I/O and checksums, without the GIL) while this one is used
    pool = ThreadPoolExecutor(max_workers=READERS, thread_name_prefix="dynembed-read")
    try:
        ahead = deque(pool.submit(_merge, layers, dim, width, *step)
                      for step in steps[:READERS])
        for i in range(len(steps)):
            ids, records = ahead.popleft().result()
            if i + READERS < len(steps):
                ahead.append(pool.submit(_merge, layers, dim, width, *steps[i + READERS]))
            if ids.shape[0] and hidden.size:  # here: hide() may run meanwhile
                keep = ~hidden.contains(ids)
                ids, records = ids[keep], records[keep]
            if ids.shape[0]:
                yield ids, records
    finally:
        # Not waiting: an unfinished generator may be closed by the garbage collector at
        # any point of another thread's code, where joining threads can deadlock.
        pool.shutdown(wait=False, cancel_futures=True)


def _merge(layers: list[list[RowsFile]], dim: int, width: int, first: int, stop: int, *,
           ids_only: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """(ids, records) of buckets [first, stop): per id, the newest layer's row, unless
    its newest entry is a deletion.

    Args:
        layers: the rows files per checkpoint, newest first.
        dim, width: row width and optimizer state width.
        first, stop: the bucket range.
        ids_only: read no records (None is returned for them).
    """
    ids, records, deleted, layer_of, dead_layer = [], [], [], [], []
    for rank, layer in enumerate(layers):
        for f in layer:
            start, end = f.row_range(first, stop)
            if end > start:
                part_ids, part_records = f.read_records(start, end, ids_only=ids_only)
                ids.append(part_ids)
                records.append(part_records)
                layer_of.append(np.full(end - start, rank))
            lo, hi = f.deleted_range(first, stop)
            if hi > lo:
                deleted.append(f.read_deleted(lo, hi))
                dead_layer.append(np.full(hi - lo, rank))
    if len(ids) == 1 and not deleted:
        return ids[0], records[0]  # one file: already in order, nothing to resolve
    words = HEAD_WORDS + dim + width
    live_ids = np.concatenate(ids) if ids else np.empty(0, np.int64)
    live = None if ids_only else (np.concatenate(records) if records else
                                  np.empty((0, words), np.uint32))
    dead = np.concatenate(deleted) if deleted else np.empty(0, np.int64)
    every = np.concatenate([live_ids, dead])
    layer = np.concatenate(layer_of + dead_layer) if every.shape[0] else every
    hashes = bucket_hash(every)
    order = np.lexsort((layer, hashes))  # by hash, newest layer first
    first_of = np.ones(order.shape[0], dtype=bool)
    first_of[1:] = hashes[order[1:]] != hashes[order[:-1]]
    winners = order[first_of]
    winners = winners[winners < live_ids.shape[0]]
    return live_ids[winners], None if ids_only else live[winners]


def _check_load_step_args(table, rows, chunk_rows) -> None:
    """Raises TypeError / ValueError naming a bad argument of :func:`load_step`.

    A fractional ``rows`` once looped forever (each pass loaded ``int(rows left)`` = 0
    rows and never used up the budget); 0 or a negative number loaded nothing and reported
    rows left, so ``while not load_step(table, n)`` never ended either.
    """
    if not isinstance(table, DynamicTable):
        raise TypeError(f"table must be a DynamicTable restored with "
                        f"de.checkpoint.load(..., lazy=True), got {type(table).__name__}")
    if rows is not None and (not isinstance(rows, numbers.Integral)
                             or isinstance(rows, (bool, np.bool_)) or rows < 1):
        raise ValueError(f"rows must be None (load every remaining row) or an int >= 1 "
                         f"(rows to load now), got {rows!r}")
    check_int("chunk_rows", chunk_rows)


def load_step(table, rows: int | None = None, chunk_rows: int = DEFAULT_CHUNK_ROWS, *,
              into_empty: bool = False) -> bool:
    """Loads up to ``rows`` more rows (None: all) of ``table``'s lazily opened checkpoint
    into the table (see :meth:`DynamicTable.adopt_records`); detaches the checkpoint once
    every row is in.

    ``into_empty``: the table held nothing when the load started and gets no other rows
    meanwhile (an eager restore), so no id needs looking up first.

    Args:
        table: a table restored with ``de.checkpoint.load(..., lazy=True)`` (a table with
            nothing left to load returns True at once).
        rows: the most rows to load now, an int >= 1; None loads every remaining row.
        chunk_rows: rows read from the checkpoint at a time, an int >= 1.
        into_empty: see above (internal).

    Returns:
        True when nothing is left to load, False when rows remain (the budget limit
        reached, or ``rows`` loaded). The table stops reading the checkpoint then, unless
        rows were dropped from memory after the stream passed them (a table without a store
        evicts rows unchanged since the checkpoint by dropping them: the checkpoint holds
        them); it then keeps the checkpoint for lookups to fault those in.

    Raises:
        TypeError: ``table`` is not a DynamicTable.
        ValueError: ``rows`` or ``chunk_rows`` is not an int >= 1.
    """
    _check_load_step_args(table, rows, chunk_rows)
    base = table.base
    if base is None:
        return True
    if base.pending is None:
        base.pending = base.chunks(chunk_rows)
        base.carry = None
    budget = float("inf") if rows is None else int(rows)
    while budget > 0:
        if base.carry is None:
            try:
                base.carry = next(base.pending, None)
            except BaseException:  # a damaged block: start over next time, lose nothing
                base.pending = None
                raise
            if base.carry is None:
                base.pending = None
                # Only a table without a store drops rows the stream brought in (evicted
                # unchanged). With one, every streamed row went to the store (or memory or
                # the store had a newer one) and leaves it only hidden here (erased), so
                # this pass, which reads every row back from the store, is skipped.
                if table.tier is None and any(table._only_in_base(ids).any()
                                              for ids in base.ids(chunk_rows)):
                    base.background_rows = 0  # streamed once: the rest faults in
                    return True
                base.close()
                table.base = None
                return True
        ids, records = base.carry
        if base._hidden.size:  # erased or discarded since the chunk was read
            keep = ~base.hidden(ids)
            ids, records = ids[keep], records[keep]
        cut = int(min(budget, ids.shape[0]))
        handled = table.adopt_records(ids[:cut], records[:cut], absent=into_empty)
        # the chunk leaves the carry only once adopted: a failing store loses nothing
        base.carry = (ids[handled:], records[handled:]) if handled < ids.shape[0] else None
        budget -= handled
        if handled < cut:  # memory is full: the rest stays for lookups to fault in
            return False
    return False
