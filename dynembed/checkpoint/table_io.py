"""Saving one table shard to a rows file and restoring a table from a checkpoint chain.

A save streams: it sorts the bucket hashes of the ids to write (8 bytes per row; the ids
are recovered from the hashes) and copies the rows a chunk at a time from memory, the store
or the lazily opened checkpoint into the file. It never holds a second copy of the rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dynembed.checkpoint.lazy import DEFAULT_CHUNK_ROWS, LazyRows, load_step
from dynembed.checkpoint.rows_file import RowsFile, RowsFileWriter
from dynembed.errors import CheckpointError, StateDictError
from dynembed.keys.buckets import bucket_hash, bucket_of_hash, id_of_hash
from dynembed.storage.rows import RowBlock
from dynembed.table.arena import ID
from dynembed.table.index import EMPTY
from dynembed.table.snapshot import AuxState
from dynembed.table.table import DynamicTable


@dataclass
class ShardWritten:
    """What a table shard's save wrote."""

    rows: int
    deleted: int
    bytes: int
    live_change: int
    """Rows the table gained since the parent checkpoint (the row count for a full save)."""


def _rows_of(table: DynamicTable, ids: np.ndarray) -> tuple[np.ndarray, RowBlock]:
    """(found mask, rows of the found ids in order) from memory, the store or the base."""
    slots = table.index.find(ids)
    in_memory = slots != EMPTY
    found = in_memory.copy()
    rest = np.flatnonzero(~in_memory)
    below_found, below, _ = table._read_below(ids[rest]) if rest.shape[0] else (
        np.zeros(0, bool), None, None)
    found[rest[below_found]] = True
    if below is None or not below_found.any():
        return found, table.arena.rows(slots[in_memory])
    memory_rows = table.arena.rows(slots[in_memory])
    where = np.concatenate([np.flatnonzero(in_memory), rest[below_found]])
    rows = RowBlock.concat([memory_rows, below], table.dim, table.arena.state_width)
    return found, rows.take(np.argsort(where, kind="stable"))


def _all_hashes(table: DynamicTable) -> np.ndarray:
    """Sorted bucket hashes of every live id (memory, store, lazily opened checkpoint)."""
    parts = [table.index.bucket_hashes()]
    if table.tier is not None:
        for block in table.tier.scan():
            parts.append(bucket_hash(block.ids[table.index.find(block.ids) == EMPTY]))
    if table.base is not None:
        # The ids alone, as table.rows_below_memory() would give them: it reads every
        # record of the checkpoint (most of a lazily opened table) only for their ids, and
        # the copy that follows reads the records of those rows again.
        for ids in table.base.ids():
            parts.append(bucket_hash(ids[table._only_in_base(ids)]))
    hashes = np.concatenate(parts)
    del parts
    hashes.sort()
    return hashes


def _check_owned(hashes: np.ndarray, buckets: range, num_buckets: int, path: Path) -> None:
    """Raises unless every (sorted) hash falls in the buckets this shard owns."""
    if hashes.shape[0] == 0 or len(buckets) == num_buckets:
        return
    ends = bucket_of_hash(hashes[[0, -1]], num_buckets)
    if ends[0] < buckets.start or ends[1] >= buckets.stop:
        raise CheckpointError(
            f"{path}: the table holds keys of buckets {int(ends[0])}..{int(ends[1])} but this "
            f"rank owns buckets {buckets.start}..{buckets.stop - 1}; a sharded table must "
            "hold only its own keys (shard the model with de.distributed.shard_model, or "
            "give a table that every rank holds whole placement='replicated')")


def _in_buckets(hashes: np.ndarray, buckets: range, num_buckets: int) -> np.ndarray:
    """The (sorted) hashes that fall in ``buckets``."""
    if len(buckets) == num_buckets:
        return hashes
    bucket = bucket_of_hash(hashes, num_buckets)
    return hashes[(bucket >= buckets.start) & (bucket < buckets.stop)]


def write_shard(table: DynamicTable, path: Path, *, num_buckets: int, parent: LazyRows | None,
                buckets: range | None = None, clip: bool = False,
                chunk_rows: int = DEFAULT_CHUNK_ROWS) -> ShardWritten:
    """Writes the table's rows (full) or its changes since ``parent`` (delta) to ``path``.

    Args:
        table: the table (shard) to save.
        path: the rows file to create.
        num_buckets: buckets of the file's hash order.
        parent: the parent checkpoint's rows of this table, for a delta; None for a full
            save.
        buckets: the buckets this shard owns (None: all).
        clip: write only the rows of ``buckets`` (a replicated table, whose every rank
            holds every row, writes its part); otherwise rows outside them are an error.
        chunk_rows: rows copied at a time.

    Raises:
        CheckpointError: the table holds keys of buckets it does not own.
    """
    buckets = buckets or range(num_buckets)
    if parent is None:
        hashes = _all_hashes(table)
        if clip:
            hashes = _in_buckets(hashes, buckets, num_buckets)
        deleted_ids = np.empty(0, dtype=np.int64)
        present_mask = None
    else:
        hashes = bucket_hash(table.changes.candidates(table.arena.np("meta")[:, ID]))
        hashes.sort()
        if hashes.shape[0]:  # distinct (hashes are a bijection of ids)
            hashes = hashes[np.concatenate([[True], hashes[1:] != hashes[:-1]])]
        if clip:
            hashes = _in_buckets(hashes, buckets, num_buckets)
        present_mask = np.zeros(hashes.shape[0], dtype=bool)
        for start in range(0, hashes.shape[0], chunk_rows):
            ids = id_of_hash(hashes[start:start + chunk_rows])
            slots = table.index.find(ids)
            present = slots != EMPTY
            rest = np.flatnonzero(~present)
            if rest.shape[0]:
                present[rest] = table._read_below(ids[rest])[0]
            present_mask[start:start + chunk_rows] = present
        deleted_ids = id_of_hash(hashes[~present_mask])
        hashes = hashes[present_mask]
    _check_owned(hashes, buckets, num_buckets, path)
    writer = RowsFileWriter(str(path), dim=table.dim, width=table.arena.state_width,
                            num_buckets=num_buckets, rows=hashes.shape[0],
                            deleted=deleted_ids.shape[0])
    try:
        live_change = hashes.shape[0]
        for start in range(0, hashes.shape[0], chunk_rows):
            ids = id_of_hash(hashes[start:start + chunk_rows])
            slots = table.index.find(ids)
            if (slots != EMPTY).all():  # the usual case: pack straight from memory
                writer.append_records(ids, table.arena.pack(slots))
            else:
                found, rows = _rows_of(table, ids)
                if not found.all():
                    raise CheckpointError(f"table rows vanished during the save of {path}")
                writer.append(rows)
            if parent is not None:
                live_change -= int(np.count_nonzero(parent.contains(ids)))
        for start in range(0, deleted_ids.shape[0], chunk_rows):
            part = deleted_ids[start:start + chunk_rows]
            writer.append_deleted(part)
            if parent is not None:
                live_change -= int(np.count_nonzero(parent.contains(part)))
        size = writer.commit()
    except BaseException:
        writer.abort()
        raise
    return ShardWritten(int(hashes.shape[0]), int(deleted_ids.shape[0]), size, live_change)


def check_fits(table: DynamicTable, layers: list[list[RowsFile]]) -> None:
    """Raises CheckpointError unless the rows files' dim and state width fit the table."""
    for layer in layers:
        for rows_file in layer:
            try:
                table.check_shape(rows_file.dim, rows_file.state_width,
                                  f"checkpoint file {rows_file.path}")
            except StateDictError as e:
                raise CheckpointError(str(e)) from None


def _rows_to_load(base: LazyRows, chunk_rows: int) -> int:
    """How many rows an eager load of ``base`` brings in: the file rows of its buckets for
    one checkpoint, the merged count (ids only) for a chain.

    The rows of every layer of a chain were once summed: a row changed in each delta counted
    once per layer, so a chain of 9 reserved memory (and the index, which is written
    whole) for up to 9 times the table.
    """
    first, stop = base.buckets.start, base.buckets.stop
    if len(base.layers) == 1:  # a full checkpoint: no row twice, no deletion
        return sum(int(np.diff(f.row_range(first, stop))[0]) for f in base.layers[0])
    return base.count(chunk_rows)


def restore(table: DynamicTable, layers: list[list[RowsFile]], buckets: range,
            aux: AuxState, *, since: str, lazy: bool, background_rows: int = 0,
            chunk_rows: int = DEFAULT_CHUNK_ROWS) -> None:
    """Replaces the table's rows (memory and store) with a checkpoint's.

    Args:
        table: the table.
        layers: the table's rows files per checkpoint of the chain, newest first.
        buckets: the buckets this table owns.
        aux: its counters, seed, key log and admission state, decoded by
            ``table.read_aux_state`` (before anything changes).
        since: the checkpoint's id (deltas saved next are relative to it).
        lazy: open the rows for lookups to fault in, instead of loading them now.
        background_rows: with ``lazy``, rows loaded by each training lookup.
        chunk_rows: rows loaded at a time.

    Raises:
        CheckpointError: the checkpoint's rows do not fit the table (dim, optimizer).
        CheckpointCorruptError: a file is damaged. An eager load leaves the table empty
            (never half-loaded); a lazy one raises when a lookup reads the damaged block.
    """
    check_fits(table, layers)
    if table.tier is not None:
        table._empty_store()  # rows written after the checkpoint are newer than its cut
    table._clear_memory()
    table.apply_aux_state(aux)
    base = LazyRows(layers, buckets, table.dim, table.arena.state_width)
    base.background_rows = background_rows if lazy else 0
    table.base = base
    if not lazy:
        try:
            if table.tier is None:  # size memory once instead of growing it chunk by chunk
                table.reserve(_rows_to_load(base, chunk_rows))
            load_step(table, None, chunk_rows, into_empty=True)
        except BaseException:  # a damaged block: never leave a half-loaded table
            if table.tier is not None:
                table._empty_store()
            table._clear_memory()
            raise
    table.changes.reset(since)
