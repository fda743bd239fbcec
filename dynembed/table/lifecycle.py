"""How rows enter and leave a table's memory: allocation, admission, read-through from the
store, eviction under the budget, sweeps and flushes.

:class:`RowLifecycle` is a mixin of :class:`~dynembed.table.table.DynamicTable`; it works on
the table's index, arena and free-slot stack. Every step that can fail (store reads and
writes) runs before the first change to memory, so a failing store leaves the table as it
was.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np

from dynembed.errors import CheckpointCorruptError, MemoryBudgetError, StoreError
from dynembed.kernels.hash_index import unique_inverse
from dynembed.kernels.records import columns_of
from dynembed.storage.rows import RowBlock
from dynembed.table.arena import COUNT, ID, LAST_STEP
from dynembed.table.eviction import FREE_STEP
from dynembed.table.index import EMPTY

logger = logging.getLogger(__name__)

CREATE_NONE, CREATE_ADMITTED, CREATE_ALL = "none", "admitted", "all"

ERASE_LOG_ENTRIES = 4096
ERASE_LOG_IDS = 1 << 21
"""The erasure log keeps the newest removals up to these many calls and ids (16 MiB; the
newest removal stays whatever its size); gradients of lookups made before the oldest kept
one are skipped and counted."""


class RowLifecycle:
    """Row allocation and movement between memory and the store (mixin; see module doc)."""

    # ------------------------------------------------------------------ allocation
    def _allocate(self, ids: np.ndarray, slots: np.ndarray, missing: int, *,
                  skip_init: int = 0) -> np.ndarray:
        """Inserts ids whose slot is EMPTY and initialises their rows; returns the new mask.

        The first ``skip_init`` new rows are left uninitialised (the caller fills them, e.g.
        with rows read from the store). The others start with count 0 and ``last_step =
        self.step + 1``: a row inserted between training steps lives from the next one.
        """
        new_mask = slots == EMPTY
        reusable = self._free_top
        self.arena.ensure(self._high_water + max(0, missing - reusable))
        self.index.reserve(self.index.size + missing)
        _, self._free_top, self._high_water = self.index.insert_missing(
            ids, slots, self._free, self._free_top, self._high_water)
        new_slots = slots[new_mask]
        new_ids = ids[new_mask]
        meta = self.arena.np("meta")
        meta[new_slots, ID] = new_ids
        new_slots, new_ids = new_slots[skip_init:], new_ids[skip_init:]
        self.config.initializer.fill(self.arena.np("weights"), new_slots, new_ids, self.seed)
        if self.arena.state_width:
            self.arena.np("state")[new_slots] = self._initial_state
        meta[new_slots, COUNT] = 0
        # the step the next training lookup will have (a training lookup's own new rows get
        # it anyway): stamped with the last one, a row inserted after a pause counted as seen
        # back then, and the next step's sweep expired it under TTL(seconds=) at once
        meta[new_slots, LAST_STEP] = self.step + 1
        self.changes.mark(new_slots)  # rows filled by the caller equal the checkpoint
        if self.tier is not None:
            self.tier.mark(slots[new_mask])
        return new_mask

    def _push_free(self, slots: np.ndarray) -> None:
        need = self._free_top + slots.shape[0]
        if need > self._free.shape[0]:
            # never past the arena's capacity (all its slots free): the memory budget counts
            # 8 bytes a row for this stack, and doubling went past it
            grown = np.empty(max(need, min(2 * self._free.shape[0], self.arena.capacity)),
                             dtype=np.int64)
            grown[:self._free_top] = self._free[:self._free_top]
            self._free = grown
        self._free[self._free_top:need] = slots
        self._free_top = need

    def _release(self, ids: np.ndarray, *, erased: bool) -> np.ndarray:
        """Removes distinct ids from memory; returns their freed slots (absent ids skipped).

        ``erased`` (the rows are gone, not moved to the store) logs the ids, so gradients
        of an earlier lookup of them are skipped even if the key gets a new row.
        """
        freed = self.index.erase(ids)
        present = freed != EMPTY
        freed = freed[present]
        self.changes.left_memory(ids if erased else ids[present], freed, erased=erased)
        if erased and self.base is not None:  # so that the checkpoint's copy stays hidden
            self.base.hide(ids)
        self.arena.np("meta")[freed, LAST_STEP] = FREE_STEP
        if self.tier is not None:
            self.tier.forget(freed)
        self._push_free(freed)
        self._log_removal(ids if erased else None, wipe=False)
        return freed

    def _log_removal(self, ids: np.ndarray | None, *, wipe: bool) -> None:
        """Starts a new erasure epoch; logs erased ids (or that every row was erased)."""
        self.erasures += 1
        if ids is None and not wipe:
            return
        self._erase_log.append((self.erasures, None if wipe else ids.copy()))
        self._erase_log_ids += 0 if wipe else ids.shape[0]
        # bounded in entries and in ids (the newest entry always stays): eviction that
        # discards 64k rows a step once kept 4,096 steps of them, 2 GiB for a table of MBs
        while len(self._erase_log) > 1 and (len(self._erase_log) > ERASE_LOG_ENTRIES
                                            or self._erase_log_ids > ERASE_LOG_IDS):
            at, old = self._erase_log.popleft()
            self._erase_log_floor = at  # lookups before it: every row counts as erased
            self._erase_log_ids -= 0 if old is None else old.shape[0]

    def _erased_since(self, epoch: int) -> tuple[bool, np.ndarray]:
        """(every row was erased, ids erased) after erasure epoch ``epoch``. An epoch older
        than the bounded log counts as "every row" (conservative: skip, never misapply)."""
        if epoch < self._erase_log_floor:
            return True, np.empty(0, dtype=np.int64)
        parts = []
        for at, ids in reversed(self._erase_log):
            if at <= epoch:
                break
            if ids is None:
                return True, np.empty(0, dtype=np.int64)
            parts.append(ids)
        return False, (np.concatenate(parts) if parts else np.empty(0, dtype=np.int64))

    # ------------------------------------------------------------------ read-through
    def _fill_missing(self, unique: np.ndarray, counts: np.ndarray, slots: np.ndarray, *,
                      create: str, step: int, call=None,
                      keep: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Gives rows to the ids whose slot is EMPTY, in place in ``slots``.

        Rows come from the store when it has them, else are created: never
        (``CREATE_NONE``), if the admission policy agrees (``CREATE_ADMITTED``), or always
        (``CREATE_ALL``). Room is made under the budget first, never by evicting the rows of
        this call.

        Args:
            unique: (u,) int64 distinct ids.
            counts: (u,) int64 occurrences of each in the call.
            slots: (u,) int64 their slots, EMPTY where not in memory; updated in place.
            create: which missing ids get new rows.
            step: the table step of the call (admission's clock).
            call: the call's CallStats, updated (loaded, inserts, not_admitted).
            keep: more slots to keep in memory if the budget allows (the rows of a chunked
                call's later chunks).

        Returns:
            ((u,) bool ids that got a row by this call (loaded or new), (u,) bool ids whose
            row is new).

        Raises:
            StoreError: the store failed; memory is unchanged.
            MemoryBudgetError: the call needs more rows than the budget holds.
        """
        missing = slots == EMPTY
        got = np.zeros(unique.shape[0], dtype=bool)
        created = got.copy()
        if not missing.any():
            return got, created
        miss_pos = np.flatnonzero(missing)
        miss_ids, miss_counts = unique[miss_pos], counts[miss_pos]
        found, stored, from_store = self._read_below(miss_ids)
        if create != CREATE_NONE and found.any():
            found, stored, from_store = self._drop_expired_below(found, stored, from_store,
                                                                 step)
        fresh = ~found
        fresh_ids, fresh_counts = miss_ids[fresh], miss_counts[fresh]
        if create == CREATE_NONE:
            admit = np.zeros(fresh_ids.shape[0], dtype=bool)
        elif create == CREATE_ALL or self.admitter is None:
            admit = np.ones(fresh_ids.shape[0], dtype=bool)
        else:
            admit = self.admitter.decide(fresh_ids, fresh_counts, step)
        n_loaded, n_new = int(np.count_nonzero(found)), int(np.count_nonzero(admit))
        self._make_room(n_loaded + n_new, protect=slots[~missing], keep=keep)
        # ---- no failure past this point: memory changes
        if create == CREATE_ADMITTED and self.admitter is not None:
            self.admitter.record(fresh_ids, fresh_counts, step)
        take = np.concatenate([np.flatnonzero(found), np.flatnonzero(fresh)[admit]])
        if take.shape[0]:
            new_slots = np.full(take.shape[0], EMPTY, dtype=np.int64)
            self._allocate(miss_ids[take], new_slots, take.shape[0], skip_init=n_loaded)
            if n_loaded:
                self._write_loaded(new_slots[:n_loaded], stored, from_store)
            slots[miss_pos[take]] = new_slots
            got[miss_pos[take]] = True
            created[miss_pos[take[n_loaded:]]] = True
        if call is not None:
            call.loaded += n_loaded
            call.inserts += n_new
            call.not_admitted += int(fresh_counts[~admit].sum()) if create != CREATE_NONE else 0
        else:
            self.counters.loaded += n_loaded
            self.counters.inserts += n_new
        return got, created

    def training_counts(self, ids: np.ndarray, *, below: bool = True) -> np.ndarray:
        """Training lookups counted on each id's row, wherever the row lives: in memory,
        else in the store or the lazily opened checkpoint (read there, not brought into
        memory).

        Args:
            ids: (n,) int64 ids (repeats allowed).
            below: also read the rows absent from memory from the store or checkpoint;
                False counts rows in memory only (0 for the others).

        Returns:
            (n,) int64 counts; 0 where the id has no row anywhere.

        Raises:
            StoreError: the store failed (nothing changed).
        """
        slots = self.index.find(ids)
        counts = np.zeros(ids.shape[0], dtype=np.int64)
        here = slots != EMPTY
        counts[here] = self.arena.np("meta")[slots[here], COUNT]
        if below and (self.tier is not None or self.base is not None) and not here.all():
            absent = np.flatnonzero(~here)
            unique, inverse, _ = unique_inverse(ids[absent])
            found, rows, _ = self._read_below(unique)
            below = np.zeros(unique.shape[0], dtype=np.int64)
            below[found] = rows.counts
            counts[absent] = below[inverse]
        return counts

    def _drop_expired_below(self, found: np.ndarray, stored: RowBlock, from_store: np.ndarray,
                            step: int):
        """:meth:`_read_below`'s answer less the rows the policy calls expired at ``step``,
        which are removed (:meth:`_expire_ids`): a training lookup must not bring back a
        row that a sweep would have removed had it been in memory; its key is new again.

        Raises:
            StoreError: the store failed; nothing was removed.
        """
        if self.evictor is None:
            return found, stored, from_store
        mask = self.evictor.expired_rows(stored.counts, stored.last_step, step)
        if mask is None or not mask.any():
            return found, stored, from_store
        self._expire_ids(stored.ids[mask])
        found = found.copy()
        found[np.flatnonzero(found)[mask]] = False
        return found, stored.take(~mask), from_store[~mask]

    def _read_below(self, ids: np.ndarray) -> tuple[np.ndarray, object, np.ndarray]:
        """Rows of distinct ids absent from memory, from the store, else from the lazily
        opened checkpoint.

        Returns:
            ((n,) bool found, RowBlock of the found rows in order (None if no source),
            (len(block),) bool whether each came from the store).
        """
        n = ids.shape[0]
        if self.tier is None and self.base is None:
            return np.zeros(n, dtype=bool), None, np.zeros(0, dtype=bool)
        if self.tier is not None:
            found, stored = self.tier.get(ids)
        else:
            found, stored = np.zeros(n, dtype=bool), None
        if self.base is None or found.all():
            return found, stored, np.ones(int(np.count_nonzero(found)), dtype=bool)
        rest = np.flatnonzero(~found)
        in_base, based = self.base.get(ids[rest])
        if not in_base.any():
            return found, stored, np.ones(int(np.count_nonzero(found)), dtype=bool)
        from_store = np.flatnonzero(found)
        found = found.copy()
        found[rest[in_base]] = True
        rank = np.cumsum(found) - 1  # each found id's place among the found ones
        blocks = [based] if stored is None else [stored, based]
        places = np.concatenate([rank[from_store], rank[rest[in_base]]])
        inverse = np.empty_like(places)
        inverse[places] = np.arange(places.shape[0])
        rows = RowBlock.concat(blocks, self.dim, self.arena.state_width).take(inverse)
        return found, rows, inverse < from_store.shape[0]

    def adopt_records(self, ids: np.ndarray, records: np.ndarray, *,
                      absent: bool = False) -> int:
        """Takes rows of the lazily opened checkpoint into the table: into the store if there
        is one, else into memory while the budget has room (never evicting). Ids that have a
        row in memory or the store already (newer) are skipped.

        Args:
            ids: (n,) int64 distinct ids, in the checkpoint's order.
            records: (n, 4 + dim + state_width) uint32 packed rows
                (:mod:`dynembed.kernels.records`).
            absent: the caller knows no id has a row yet, in memory or the store (skips
                looking them up: an eager restore into a store read every row's key back).

        Returns:
            How many leading rows were handled; fewer than given only when memory is full.

        Raises:
            StoreError: writing to the store failed; nothing was taken.
        """
        fresh = (np.ones(ids.shape[0], dtype=bool) if absent
                 else self.index.find(ids) == EMPTY)
        if self.tier is not None:
            idx = np.flatnonzero(fresh)
            if idx.shape[0] and not absent:  # absent: the store was emptied for the load
                fresh[idx[self.tier.get(ids[idx])[0]]] = False
            if fresh.any():
                counts, last, weights, state = columns_of(records[fresh], self.dim)
                self.tier.put(RowBlock(ids[fresh], weights, state, counts, last))
                self.counters.store_writes += int(np.count_nonzero(fresh))
            return ids.shape[0]
        handled = ids.shape[0]
        if self.max_rows is not None:
            room = max(0, self.max_rows - self.size())
            where = np.flatnonzero(fresh)
            if where.shape[0] > room:
                handled = int(where[room])
                fresh[handled:] = False
        if fresh.all():
            take, fresh_ids, fresh_records = None, ids, records
        else:
            take = np.flatnonzero(fresh)
            fresh_ids, fresh_records = ids[take], records[take]
        if fresh_ids.shape[0]:
            new_slots = np.full(fresh_ids.shape[0], EMPTY, dtype=np.int64)
            self._allocate(fresh_ids, new_slots, fresh_ids.shape[0],
                           skip_init=fresh_ids.shape[0])
            self.arena.unpack(new_slots, fresh_records)
        return handled

    def _write_loaded(self, slots: np.ndarray, rows, from_store: np.ndarray) -> None:
        """Copies rows read from the store or the checkpoint into fresh slots. They equal
        the checkpoint (changes since are tracked by id); rows from the store are clean
        for the store, rows from the checkpoint must reach it when evicted."""
        self.arena.write_rows(slots, rows)
        if self.tier is not None:
            self.tier.forget(slots[from_store])

    # ------------------------------------------------------------------ eviction
    def _make_room(self, incoming: int, *, protect: np.ndarray,
                   keep: np.ndarray | None = None) -> None:
        """Evicts rows so that ``incoming`` more fit under the budget, never those in
        ``protect``, and those in ``keep`` only when the rest do not make room.

        Raises:
            MemoryBudgetError: ``incoming`` plus the protected rows exceed the budget.
            StoreError: writing the evicted rows failed; nothing was evicted.
        """
        limit = self.max_rows
        if limit is None or incoming == 0:
            return
        need = self.size() + incoming - limit
        if need <= 0:
            return
        if incoming + protect.shape[0] > limit:
            raise MemoryBudgetError(
                f"one lookup needs {incoming + protect.shape[0]} rows in memory at once but "
                f"the budget holds {limit}; raise memory_budget / max_rows or use smaller "
                "batches")
        if keep is not None and keep.shape[0]:
            # as many as leave ``need`` rows to evict (a chunked call's later keys: evicted
            # without a store, they would come back as new rows, their state lost)
            spare = self.size() - protect.shape[0] - need - limit // 128
            protect = np.concatenate([protect, keep[:max(spare, 0)]])
        # evict a little more than needed so that a full table does not evict every call
        victims = self.evictor.victims(self.arena.np("meta"), self._high_water,
                                       need + limit // 128, protect, self.step)
        self._evict_slots(victims)

    def _evict_slots(self, slots: np.ndarray) -> int:
        """Moves rows out of memory: to the store if there is one, else discards them.
        Without a store, rows unchanged since a lazily opened checkpoint that holds them
        are only dropped from memory (a save clears the changed marks, so the rows changed
        before it are known as outdated there)."""
        total = int(slots.shape[0])
        if total == 0:
            return 0
        if self.tier is None and self.base is not None:
            kept = ~self.changes.changed(slots)
            ids = self.arena.np("meta")[slots, ID]
            kept &= ~self.base.outdated(ids)
            try:
                kept[kept] = self.base.contains(ids[kept])  # a row new since: nowhere else
            except CheckpointCorruptError:  # its copy cannot be read back: discard, counted
                kept[:] = False
            if kept.any():
                self.counters.evicted += int(np.count_nonzero(kept))
                self._release(ids[kept], erased=False)
                slots = slots[~kept]
                if slots.shape[0] == 0:
                    return total
        ids = self.arena.np("meta")[slots, ID].copy()
        if self.tier is not None:
            self.counters.store_writes += self.tier.write(slots)  # first: it may fail
            self.counters.evicted += slots.shape[0]
        else:
            self.counters.discarded += slots.shape[0]
            self._discard_log.add(slots.shape[0], self.name or f"table(dim={self.dim})")
            if self.key_log is not None:
                self.key_log.discard(ids)
        self._release(ids, erased=self.tier is None)
        return total

    def _sweep(self, protect: np.ndarray) -> None:
        """One bounded step of a scheduled sweep for expired rows, at the start of a training
        lookup (``self.step + 1``); ``protect`` holds the slots of that lookup's rows.

        With a store and a policy that expires rows, a sweep that starts also starts a pass
        over the store (unless one is running), which examines ``sweep_rows // 16`` stored
        rows per training lookup (a stored row costs a read, a slot in memory does not).
        A store that fails the pass is logged and the pass ends (the next sweep starts
        another): upkeep never fails a lookup that needs nothing from the store.

        Raises:
            StoreError: the store failed while expiring rows found in memory.
        """
        step = self.step + 1
        span = self.evictor.sweep_range(self._high_water, step)
        if span is not None:
            expired = self.evictor.expired(self.arena.np("meta"), *span, step)
            self._expire_slots(expired[~np.isin(expired, protect)])
            if span[0] == 0 and self._store_sweep is None and self.tier is not None \
                    and self.evictor.policy.expires:
                self._store_sweep = (None,)
        if self._store_sweep is not None:
            try:
                self._sweep_store(step)
            except StoreError as e:
                self._store_sweep = None
                logger.warning("%s: the scheduled pass over the store for expired rows "
                               "stopped (the next sweep starts another): %s",
                               self.name or f"table(dim={self.dim})", e)

    def _sweep_store(self, step: int) -> None:
        """One block of the store's pass: removes the stored rows (absent from memory,
        whose copy is the live one) that the policy calls expired at ``step``, read again
        first (the scan's copy may be older than the store's or the write queue's)."""
        block, cursor = self.tier.scan_from(self._store_sweep[0],
                                            max(1, self.evictor.sweep_rows // 16))
        self._store_sweep = None if cursor is None else (cursor,)
        block = block.take(self.index.find(block.ids) == EMPTY)
        mask = self.evictor.expired_rows(block.counts, block.last_step, step)
        if mask is None or not mask.any():
            return
        _, current = self.tier.get(np.unique(block.ids[mask]))
        still = self.evictor.expired_rows(current.counts, current.last_step, step)
        if still is not None and still.any():
            self._expire_ids(current.ids[still])

    def _expire_slots(self, slots: np.ndarray) -> int:
        """Removes the rows at ``slots``, which the policy expired, as :meth:`_expire_ids`."""
        if slots.shape[0] == 0:
            return 0
        return self._expire_ids(self.arena.np("meta")[slots, ID].copy())

    def _expire_ids(self, ids: np.ndarray) -> int:
        """Removes the rows of distinct ids the policy expired, wherever they are: memory,
        the store, a lazily opened checkpoint. An expired row is forgotten, as if erased:
        moved to the store it came back when its key returned (and the store only grew).
        Counted as ``expired``.

        Raises:
            StoreError: the store failed; nothing was removed.
        """
        if self.tier is not None:
            self.tier.delete(ids)  # first: it may fail
        self._release(ids, erased=True)
        if self.key_log is not None:
            self.key_log.discard(ids)
        self.counters.expired += int(ids.shape[0])
        return int(ids.shape[0])

    def _expire_below(self, chunk_rows: int = 1 << 16) -> int:
        """Removes the expired rows that are not in memory (the store's, and a lazily opened
        checkpoint's): one pass over them. The ids are gathered first, as a store need not
        allow deletes while it is scanned.

        Raises:
            StoreError: the store failed; the rows not yet removed stay.
        """
        found = []
        for block in self.rows_below_memory(chunk_rows):
            mask = self.evictor.expired_rows(block.counts, block.last_step, self.step)
            if mask is not None and mask.any():
                found.append(block.ids[mask])
        return sum(self._expire_ids(ids) for ids in found)

    def evict(self, rows: int | None = None) -> int:
        """Evicts rows now: the ``rows`` lowest-scoring ones, or (None) every expired row
        and enough of the lowest-scoring ones to get under the budget.

        Evicted rows go to the store, or are discarded and counted without one. Expired
        rows (TTL, or below ``min_score``) are removed everywhere and counted as
        ``expired``; with ``rows=None`` that includes one whole pass over the rows in the
        store and in a lazily opened checkpoint, now (scheduled sweeps, ``evict_every``,
        walk the store a few rows per training lookup, and never a lazily opened
        checkpoint, whose expired rows are dropped when read back).

        Returns:
            Rows evicted or expired.

        Raises:
            ValueError: ``rows`` is not an int >= 0, or the table has no eviction policy.
            StoreError: writing to the store failed; nothing was evicted by that batch.
        """
        if self.evictor is None:
            raise ValueError("the table has no eviction policy; make it with eviction= "
                             "(e.g. de.policy.LRU()) or a memory_budget")
        if rows is not None and (isinstance(rows, bool)
                                 or not isinstance(rows, (int, np.integer)) or rows < 0):
            raise ValueError(f"rows must be None or an int >= 0, got {rows!r}")
        rows = None if rows is None else int(rows)
        self._check_writable("evict")
        meta, live = self.arena.np("meta"), self._high_water
        nothing = np.empty(0, dtype=np.int64)
        if rows is not None:
            return self._evict_slots(self.evictor.victims(meta, live, rows, nothing, self.step,
                                                          whole=True))
        done = self._expire_slots(self.evictor.expired(meta, 0, live, self.step))
        if self.evictor.policy.expires and (self.tier is not None or self.base is not None):
            done += self._expire_below()
        if self.max_rows is not None and self.size() > self.max_rows:
            done += self._evict_slots(self.evictor.victims(
                meta, live, self.size() - self.max_rows, nothing, self.step, whole=True))
        return done

    def flush(self) -> int:
        """Writes every row changed since it was last written to the store, then the table's
        clock (``step``, ``update_step``; not by a read-only table), and makes the store
        durable, so the store alone holds the whole table (rows of a lazily opened
        checkpoint not read yet are moved into the store first): a table built over it
        later, in any process, trains on as this one would.

        Rows evicted after a flush reach the store without the clock: a process that dies
        before the next flush leaves the store's clock behind those rows (safe, see
        :meth:`~dynembed.storage.EmbeddingStore.write_clock`), so resume exactly from a
        flush or a checkpoint.

        Returns:
            Rows written (0 without a store).

        Raises:
            StoreError: the write failed; the rows stay marked and a later flush retries.
        """
        if self.tier is None:
            return 0
        if not self.read_only:  # it records this table's clock over the rows
            self._warn_pending_store()
        before = self.counters.store_writes
        if self.base is not None:
            self.base.load_all(self)  # its rows go to the store (counted as writes)
        self.counters.store_writes += self.tier.write(self.tier.dirty_slots(), only_dirty=False)
        self.tier.flush(None if self.read_only else self.clock())
        return self.counters.store_writes - before

    def holds_stored_rows(self) -> bool:
        """Whether the store holds a row of this table (of this shard's buckets); stops at
        the first one found.

        Raises:
            StoreError: the store failed.
        """
        return self.tier is not None and any(block.ids.shape[0] for block in self.tier.scan())

    def start_over(self) -> None:
        """Empties the table, store included, and sets its clock back to 0: the table as
        built over an empty store (its clock was taken from the store's record).

        Raises:
            ReadOnlyTableError: the table is read-only.
            StoreError: the store failed part way (see :meth:`clear_store`).
        """
        with self._settling_pending_store():
            self.clear()
        self.step = self.update_step = 0
        if self.evictor is not None:
            self.evictor.clock.reset(0)

    def clear_store(self) -> int:
        """Empties the store. The rows in memory stay and are marked changed, so that they
        reach the store again when evicted or flushed instead of vanishing (they once were
        marked clean, and an eviction then dropped them uncounted).

        Rows that lived only in the store are erased, as by :meth:`erase`: counted, listed
        as deleted in the next delta checkpoint, hidden in a lazily opened checkpoint (whose
        older copy would otherwise come back), and their pending gradients are skipped.

        Returns:
            How many rows were erased (those only in the store); 0 without a store.

        Raises:
            ReadOnlyTableError: the table is read-only (its store may be shared with the
                table that trains it).
            StoreError: the store failed part way (it may have lost some rows, still read
                as present); the rows in memory are marked changed all the same.
        """
        with self._settling_pending_store():
            self._check_writable("clear_store")
            if self.tier is None:
                return 0
            blocks = [block.ids[self.index.find(block.ids) == EMPTY]
                      for block in self.tier.scan()]
            only_stored = np.concatenate(blocks) if blocks else np.empty(0, dtype=np.int64)
            self._empty_store()
        if only_stored.shape[0]:
            self._release(only_stored, erased=True)
            if self.key_log is not None:
                self.key_log.discard(only_stored)
            self.counters.erased += only_stored.shape[0]
        return int(only_stored.shape[0])

    def _empty_store(self) -> None:
        """Empties the store and marks the rows in memory changed (see :meth:`clear_store`),
        for callers that wipe memory next (so nothing needs erasing one by one).

        Raises:
            StoreError: the store failed part way; the rows are marked all the same.
        """
        try:
            self.tier.clear()
        finally:
            live = self.arena.np("meta")[:self._high_water, LAST_STEP] != FREE_STEP
            self.tier.mark(np.flatnonzero(live))

    def prefetch(self, keys) -> None:
        """Starts reading the stored rows of keys absent from memory, in the background, so
        that a coming lookup of them does not wait for the store. Call it with the next
        batch while the current one trains (no-op without a store).

        Args:
            keys: (n,) keys (int64 ids, or str/bytes).
        """
        ids = self.ids_of(keys, arg="keys").ids  # checked with or without a store
        if self.tier is None:
            return
        absent = ids[self.index.find(ids) == EMPTY]
        if absent.shape[0]:
            self.tier.prefetch(absent)

    def close(self) -> None:
        """Flushes every changed row to the store, then closes the store (no-op without
        one, or once closed). The table must not be used afterwards.

        Raises:
            StoreError: the final write failed; the store stays open so it can be retried.
        """
        if self.tier is None or self._closed:
            return
        if self.tier.owns_store:
            self.flush()
        elif self.tier.dirty.any():
            warnings.warn(f"{int(self.tier.dirty.sum())} changed rows of this table were not "
                          "written: a table built later over the same store object took "
                          "the store over", stacklevel=2)
        self.tier.close()
        self._closed = True

    def _stored_only(self, unique: np.ndarray, slots: np.ndarray) -> np.ndarray:
        """(u,) bool: ids absent from memory that the store (or lazy checkpoint) holds."""
        out = np.zeros(unique.shape[0], dtype=bool)
        absent = np.flatnonzero(slots == EMPTY)
        if absent.shape[0]:
            out[absent] = self._read_below(unique[absent])[0]
        return out
