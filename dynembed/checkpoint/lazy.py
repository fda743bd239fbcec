"""LazyRows: a checkpoint's rows for one table, read on first use instead of loaded up front.

A restored table keeps a :class:`LazyRows` as its ``base``: lookups that miss memory and the
store binary-search the memory-mapped rows files of the checkpoint (newest delta first, a
deletion in a newer delta hiding older rows) and copy the rows they find into the table.
Opening costs the same for any table size; each lookup pays for the rows it faults in.
Ids the table erases or discards afterwards are hidden, so the checkpoint's copy never
comes back. :meth:`rows` streams the newest visible version of every row in bucket-hash
order, a bounded chunk at a time (full loads, compaction, full saves).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from dynembed.checkpoint.rows_file import RowsFile
from dynembed.keys.buckets import bucket_hash
from dynembed.storage.rows import RowBlock
from dynembed.table.index import EMPTY, HashIndex

DEFAULT_CHUNK_ROWS = 1 << 16


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
        self._hidden = HashIndex()
        self._hidden_rows = 0
        self.pending: Iterator[RowBlock] | None = None
        """The background load's position (see :func:`load_step`)."""
        self.carry: RowBlock | None = None
        self.background_rows = 0
        """Rows loaded by each training lookup in the background (0: none)."""

    def advance(self, table) -> None:
        """One step of the background load, run by the table at a training lookup."""
        if load_step(table, self.background_rows) is False and self.carry is not None \
                and table.tier is None and table.max_rows is not None \
                and table.size() >= table.max_rows:
            self.background_rows = 0  # memory is full: lookups fault the rest in

    @property
    def files(self) -> list[RowsFile]:
        return [f for layer in self.layers for f in layer]

    def _empty(self) -> RowBlock:
        return RowBlock.concat([], self.dim, self.width)

    def hide(self, ids: np.ndarray) -> None:
        """Hides the checkpoint's rows of ``ids`` (erased or discarded by the table)."""
        ids = np.unique(ids)
        self._hidden.reserve(self._hidden.size + ids.shape[0])
        slots = self._hidden.find(ids)
        _, _, self._hidden_rows = self._hidden.insert_missing(
            ids, slots, np.empty(0, np.int64), 0, self._hidden_rows)

    def hidden(self, ids: np.ndarray) -> np.ndarray:
        """(n,) bool, whether each id is hidden."""
        return self._hidden.find(ids) != EMPTY

    def get(self, ids: np.ndarray) -> tuple[np.ndarray, RowBlock]:
        """The newest visible checkpoint rows of distinct ids.

        Returns:
            ((n,) bool found, RowBlock of the found rows in the order of ``ids``).

        Raises:
            CheckpointCorruptError: a block the search reads is damaged.
        """
        n = ids.shape[0]
        found = np.zeros(n, dtype=bool)
        open_ = ~self.hidden(ids) if self._hidden.size else np.ones(n, dtype=bool)
        where, parts = [], []
        for layer in self.layers:
            idx = np.flatnonzero(open_)
            if idx.shape[0] == 0:
                break
            query = ids[idx]
            for rows_file in layer:
                pos = rows_file.find(query)
                hit = pos >= 0
                if hit.any():
                    where.append(idx[hit])
                    parts.append(rows_file.take(pos[hit]))
                    found[idx[hit]] = True
                gone = hit | (rows_file.find_deleted(query) if rows_file.deleted else False)
                open_[idx[gone]] = False
        if not parts:
            return found, self._empty()
        at = np.concatenate(where)
        rows = RowBlock.concat(parts, self.dim, self.width)
        return found, rows.take(np.argsort(at, kind="stable"))

    def rows(self, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> Iterator[RowBlock]:
        """The newest visible version of every row of the owned buckets, in bucket-hash
        order, about ``chunk_rows`` rows at a time (whole buckets)."""
        files = self.files
        if not files:
            return
        total = sum(f.rows for f in files)
        num_buckets = files[0].num_buckets
        step = max(1, chunk_rows * num_buckets // max(total, 1))
        for first in range(self.buckets.start, self.buckets.stop, step):
            stop = min(first + step, self.buckets.stop)
            block = self._merge(first, stop)
            if len(block) and self._hidden.size:
                block = block.take(~self.hidden(block.ids))
            if len(block):
                yield block

    def count(self, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> int:
        """Visible rows of the owned buckets (reads ids only)."""
        files = self.files
        if not files:
            return 0
        step = max(1, chunk_rows * files[0].num_buckets // max(sum(f.rows for f in files), 1))
        total = 0
        for first in range(self.buckets.start, self.buckets.stop, step):
            ids = self._merge(first, min(first + step, self.buckets.stop), ids_only=True).ids
            total += ids.shape[0] - (int(np.count_nonzero(self.hidden(ids)))
                                     if self._hidden.size else 0)
        return total

    def _merge(self, first: int, stop: int, *, ids_only: bool = False) -> RowBlock:
        """Rows of buckets [first, stop): per id, the newest layer's row or deletion.
        ``ids_only`` reads only the ids (the other columns are left empty)."""
        rows, deleted, layer_of, dead_layer = [], [], [], []
        for rank, layer in enumerate(self.layers):
            for f in layer:
                start, end = f.row_range(first, stop)
                if end > start:
                    rows.append(f.read_ids(start, end) if ids_only else f.read_rows(start, end))
                    layer_of.append(np.full(end - start, rank))
                lo, hi = int(f.del_offsets[first]), int(f.del_offsets[stop])
                if hi > lo:
                    deleted.append(f.read_deleted(lo, hi))
                    dead_layer.append(np.full(hi - lo, rank))
        block = RowBlock.concat(rows, self.dim, self.width)
        if len(self.layers) == 1 and not deleted and len(rows) <= 1:
            return block  # one file: already in order, nothing to resolve
        dead = np.concatenate(deleted) if deleted else np.empty(0, np.int64)
        ids = np.concatenate([block.ids, dead])
        layer = np.concatenate(layer_of + dead_layer) if ids.shape[0] else ids
        hashes = bucket_hash(ids)
        order = np.lexsort((layer, hashes))  # by hash, newest layer first
        first_of = np.ones(order.shape[0], dtype=bool)
        first_of[1:] = hashes[order[1:]] != hashes[order[:-1]]
        winners = order[first_of]
        return block.take(winners[winners < len(block)])

    def close(self) -> None:
        """Drops the files (the table no longer reads from the checkpoint)."""
        self.layers = []
        self.pending = None


def load_step(table, rows: int | None = None, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> bool:
    """Loads up to ``rows`` more rows (None: all) of ``table``'s lazily opened checkpoint
    into the table (see :meth:`DynamicTable.adopt_rows`); detaches the checkpoint once every
    row is in.

    Returns:
        True when nothing is left to load (the table no longer reads the checkpoint), False
        when rows remain (the budget limit reached, or ``rows`` loaded).
    """
    base = table.base
    if base is None:
        return True
    if base.pending is None:
        base.pending = base.rows(chunk_rows)
        base.carry = None
    budget = float("inf") if rows is None else rows
    while budget > 0:
        block = base.carry
        if block is None:
            block = next(base.pending, None)
            if block is None:
                base.close()
                table.base = None
                return True
        if len(block) > budget:
            block, base.carry = block.take(slice(0, int(budget))), block.take(
                slice(int(budget), None))
        else:
            base.carry = None
        handled = table.adopt_rows(block)
        budget -= handled
        if handled < len(block):  # memory is full: keep the rest for lookups to fault in
            rest = block.take(slice(handled, None))
            base.carry = rest if base.carry is None else RowBlock.concat(
                [rest, base.carry], base.dim, base.width)
            return False
    return False
