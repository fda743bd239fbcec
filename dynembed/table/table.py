"""DynamicTable: the index, the row arena, the policies and the batch verbs, in one place.

Verbs take keys (int64 ids, or str/bytes which hash to ids) and say in their names what
happens on a hit and on a miss: ``find`` never inserts, ``find_or_insert`` creates missing
rows, ``insert_or_assign`` writes rows, ``assign`` writes existing rows only, ``erase``
removes rows. The ``*_slots`` methods are the lower-level path used by :mod:`dynembed.nn`.
"""

from __future__ import annotations

import dataclasses
from collections import deque

import numpy as np
import torch

from dynembed.errors import (
    MemoryBudgetError,
    StoreError,
)
from dynembed.kernels.gather import touch_rows
from dynembed.kernels.hash_index import unique_inverse
from dynembed.keys.convert import to_key_batch
from dynembed.keys.key_log import KeyLog
from dynembed.policy.eviction import LRU
from dynembed.table.arena import LAST_STEP, RowArena, take_rows
from dynembed.table.budget import parse_bytes, rows_within
from dynembed.table.changes import ChangeTracker
from dynembed.table.config import TableConfig
from dynembed.table.eviction import FREE_STEP, DiscardLog, Evictor
from dynembed.table.index import EMPTY, HashIndex, buckets_for
from dynembed.table.lifecycle import (
    CREATE_ADMITTED,
    CREATE_ALL,
    CREATE_NONE,
    RowLifecycle,
)
from dynembed.table.ownership import TableOwnership
from dynembed.table.results import FindResult, InsertResult
from dynembed.table.row_values import check_accumulators, checked_rows
from dynembed.table.search import TableSearch
from dynembed.table.snapshot import TableSnapshot
from dynembed.table.stats import CallStats, Counters, TableStats
from dynembed.table.store_clock import StoreClock
from dynembed.table.tiering import Tier
from dynembed.table.updates import TableUpdates


def _last_occurrence(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct ids and, for each, the position of its last occurrence in ``ids``.

    Writes with duplicate keys must be deterministic ("the last one wins"); torch's
    ``index_put_`` with repeated indices is not.
    """
    unique, inverse, _ = unique_inverse(ids)
    last = np.empty(unique.shape[0], dtype=np.int64)
    last[inverse] = np.arange(ids.shape[0])  # numpy assigns repeated indices in order
    return unique, last


class DynamicTable(RowLifecycle, StoreClock, TableUpdates, TableSnapshot, TableSearch,
                   TableOwnership):
    """A growable map from int64 ids to trainable rows, optionally bounded in memory over a
    store (admission, eviction and read-through in :class:`RowLifecycle`).

    When the store fails (``StoreError``) a call changes nothing in memory, with two
    exceptions. A batch with more distinct keys than half the memory budget goes in chunks
    that fit, and the chunks before the failing one stay applied. With
    ``write_policy="through"`` the write comes after the change, which stays in memory,
    marked for the next flush or eviction.

    Threads: reads (eval-mode lookups, :meth:`read`, :meth:`find`) may run from many threads
    at once, as a model server's workers do, and their counters add up exactly. A call
    that changes the table (a training lookup, an update, an insert, erase, evict, load)
    needs it to itself: a read running beside one may see a key absent or another key's
    row. Guard a table that is trained and read at once with a lock of your own.

    Args:
        config: the table's :class:`TableConfig`.

    Example:
        >>> table = DynamicTable(TableConfig(dim=4, optimizer=de.optim.SGD(lr=0.1)))
        >>> table.find_or_insert(["cat", "dog"]).values.shape
        torch.Size([2, 4])
    """

    def __init__(self, config: TableConfig) -> None:
        if not isinstance(config, TableConfig):
            raise TypeError(f"config must be a TableConfig, got {type(config).__name__}")
        self.config = config
        self.dim = config.dim
        self.optimizer = config.optimizer
        if config.seed is None:
            self.seed = int(torch.randint(0, 2**62, (1,)).item())
        else:
            self.seed = config.seed
        width = self.optimizer.state_width(self.dim) if self.optimizer else 0
        self._initial_state = (self.optimizer.initial_state(self.dim) if self.optimizer
                               else np.zeros(0, dtype=np.float32))
        self._default = torch.as_tensor(config.default_value, dtype=torch.float32).expand(
            self.dim).clone()
        self.read_only = config.read_only
        self.padding_id = config.padding_id()
        """Id of ``config.padding_key`` (None without one): modules drop it before lookups."""
        self.key_log = KeyLog() if config.key_log else None
        self.arena = RowArena(self.dim, width, config.device)
        self.index = HashIndex()
        self._free = np.empty(0, dtype=np.int64)
        self._free_top = 0
        self._high_water = 0
        self.step = 0
        """Training lookups so far; the clock of ``last_step``."""
        self.update_step = 0
        """Optimizer steps so far, one per backward (fused) or per step with gradients
        (deferred), also those that left every row as it was; Adam's bias correction and
        Adagrad's lr decay count them."""
        self.writes = 0
        """Calls that changed rows' values (updates, assigns): tells a derived structure,
        such as an approximate search index, that it is stale."""
        self.erasures = 0
        """Calls that removed rows (erase, eviction, clear, load); slots looked up before a
        change of this number are checked before they receive gradients."""
        self._erase_log: deque = deque()  # (epoch, erased ids or None: all)
        self._erase_log_ids = 0  # ids in it
        self._erase_log_floor = 0
        self.wipes = 0
        """Times every row was replaced at once (clear, load): tells derived structures,
        such as a sampler's snapshot, that nothing they hold is current."""
        self._pending: list[tuple[np.ndarray, torch.Tensor]] = []
        self._queued_backwards = 0  # backward calls (graph tasks) queued in _pending ...
        self._queued_task = -1  # ... and the last one's id
        self.counters = Counters()
        self._moved_before_reset = 0  # rows_moved of counters that reset_stats() zeroed
        self._closed = False  # close() ran to its end
        self.last_call = CallStats()
        self.admitter = config.admission.create(self.seed) if config.admission else None
        self.tier = Tier(config.store, config.write_policy, self.arena,
                         self._store_meaning()) if config.store else None
        self.base = None
        """Rows of a checkpoint opened lazily (:mod:`dynembed.checkpoint`), read on first use
        below memory and the store; None once fully loaded or for a table never restored."""
        self.changes = ChangeTracker()
        """Rows changed since the last checkpoint, for delta checkpoints."""
        self.router = None
        """In a distributed job, what routes the modules' lookups and gradients to the ranks
        owning the rows (set by :func:`dynembed.distributed.shard_model`); None: local."""
        self.max_rows = self._row_limit()
        """The most rows memory holds (from memory_budget / max_rows), None if unbounded."""
        self.arena.limit = self.max_rows
        policy = config.eviction or (LRU() if self.max_rows is not None else None)
        self.evictor = (Evictor(policy, self.max_rows, config.evict_every, config.sweep_rows)
                        if policy is not None else None)
        self._store_sweep: tuple[object | None] | None = None
        """(cursor,) of the scheduled sweep's pass over the store, None between passes."""
        self.name: str | None = None
        """What logs call the table (``EmbeddingCollection`` names its tables); None:
        ``table(dim=...)``."""
        self._discard_log = DiscardLog()
        if config.initial_capacity:
            self.reserve(config.initial_capacity)
        if self.tier is not None:
            self._adopt_store_clock()  # after the evictor, whose wall clock it restarts
            self.tier.claim()  # last: a construction that failed takes no store

    def __getstate__(self) -> dict:
        # Pickling (torch.save(model), copy.deepcopy) copies the rows in memory. Rows kept
        # elsewhere would be shared with the original (a store, which both copies would
        # write) or cannot travel (an open checkpoint file, a process group): refused here,
        # by name, instead of a TypeError about an Rdict or a WeakSet deep inside.
        held = [what for what, part in (("a store", self.tier),
                                        ("a lazily opened checkpoint", self.base),
                                        ("a distributed job's router", self.router))
                if part is not None]
        if held:
            raise TypeError(
                f"a DynamicTable with {' and '.join(held)} cannot be pickled or copied "
                "(torch.save(model), copy.deepcopy): its rows are not all in memory, and a "
                "copy would share or lose the rest. Save the model with "
                "de.checkpoint.save(path, model) (or torch.save(model.state_dict(), path)) "
                "and load that into a model built with its own store. (A spawned DataLoader "
                "worker gets its dataset and collate_fn pickled: keep tables out of them, "
                "convert keys to ids there, e.g. with de.hash_strings, and look the ids up in "
                "the training loop.)")
        return self.__dict__.copy()

    def _row_limit(self) -> int | None:
        limits = [self.config.max_rows] if self.config.max_rows else []
        if self.config.memory_budget is not None:
            per_row = self.arena.bytes_per_row() + (1 if self.tier else 0)  # + dirty mark
            budget = parse_bytes(self.config.memory_budget)
            rows = rows_within(budget, lambda r: r * per_row + 16 * buckets_for(r) + 8 * r)
            if rows == 0:
                raise ValueError(f"memory_budget={self.config.memory_budget!r} holds no row "
                                 f"of this table ({per_row} bytes each plus the index); "
                                 "raise it")
            limits.append(rows)
        return min(limits) if limits else None

    # ----------------------------------------------------------------- introspection
    def size(self) -> int:
        """Number of live rows."""
        return self.index.size

    __len__ = size

    def capacity(self) -> int:
        """Rows the arena holds before it grows."""
        return self.arena.capacity

    @property
    def trainable(self) -> bool:
        """Whether gradients update this table (an optimizer is set and it is writable)."""
        return self.optimizer is not None and not self.read_only

    def reserve(self, rows: int) -> None:
        """Pre-sizes the arena and the index for ``rows`` live rows (no effect if smaller;
        at most ``max_rows``).

        Raises:
            ValueError: ``rows`` is not an int >= 0.
            MemoryError: the arena or the index of that size cannot be allocated (the rows
                stay; the arena may have grown already when the index cannot).
        """
        if isinstance(rows, bool) or not isinstance(rows, (int, np.integer)) or rows < 0:
            raise ValueError(f"rows must be an int >= 0, got {rows!r}")
        rows = int(rows) if self.max_rows is None else min(int(rows), self.max_rows)
        self.arena.reserve(rows)
        self.index.reserve(rows)

    def stats(self) -> TableStats:
        """A snapshot of sizes and counters."""
        per_row = self.arena.bytes_per_row()
        return TableStats(
            rows=self.size(), capacity=self.capacity(),
            bytes_used=self.size() * per_row + self.index.nbytes,
            bytes_allocated=self.capacity() * per_row + self.index.nbytes + self._free.nbytes,
            key_log_bytes=0 if self.key_log is None else self.key_log.nbytes,
            payload_bytes_per_row=4 * (self.dim + self.arena.state_width),
            totals=self.counters.snapshot(),
            last_call=dataclasses.replace(self.last_call))

    def reset_stats(self) -> None:
        """Zeroes the counters (sizes are unaffected; :attr:`rows_moved` goes on)."""
        self._moved_before_reset = self.rows_moved
        self.counters = Counters()
        self.last_call = CallStats()

    @property
    def rows_moved(self) -> int:
        """Rows that entered or left memory since the table was made (inserted, loaded,
        evicted, discarded, expired, erased). Unlike the counters it never goes back, so
        derived structures (a sampler's snapshot) can tell how much changed since they
        looked."""
        c = self.counters
        return self._moved_before_reset + c.inserts + c.loaded + c.evicted + c.discarded \
            + c.expired + c.erased

    # ----------------------------------------------------------------- key handling
    def ids_of(self, keys, *, arg: str = "keys"):
        """Converts keys to a :class:`KeyBatch` with this table's hash seed.

        One table may see str keys in one call and int ids in another: string hashes are
        spread over the whole int64 range, so they meet a given int id with probability
        about 2**-64 per pair. A single batch must not mix them.
        """
        return to_key_batch(keys, hash_seed=self.config.hash_seed, arg=arg)

    # ----------------------------------------------------------------- slot-level path
    def lookup_slots(self, unique_ids: np.ndarray, counts: np.ndarray, *, insert: bool,
                     strings=None, string_ids: np.ndarray | None = None,
                     created_out: np.ndarray | None = None) -> np.ndarray:
        """Slots of unique ids for one lookup call, counted in the stats.

        Ids not in memory are read from the store first (one batch). With ``insert``
        (training), the rest get new rows if the admission policy agrees, and every row's
        count and last-seen step are updated; ids without a row keep slot EMPTY and are
        counted as defaults served (and as not admitted, in training). Room for the rows is
        made under the memory budget before anything changes.

        Args:
            unique_ids: (u,) int64 distinct ids.
            counts: (u,) int64 occurrences of each id in the call.
            insert: training lookup (insert and touch metadata) or not.
            strings, string_ids: the call's original str keys and their ids, for the key log.
            created_out: (u,) bool, set True where the id got a new row (not one read back
                from the store): where a distributed owner lacks the key's string.

        Returns:
            (u,) int64 slots, EMPTY where absent and not inserted.

        Raises:
            StoreError: the store failed; the table is unchanged.
            MemoryBudgetError: the call needs more rows at once than the budget holds.
        """
        if insert:
            self._warn_if_in_data_worker("a training lookup")
            if not self.read_only:
                self._warn_pending_store()
        if insert and self.base is not None and self.base.background_rows:
            self.base.advance(self)  # first: it changes slots
        call = CallStats(keys=int(counts.sum()))
        slots = self.index.find(unique_ids)
        missing = slots == EMPTY
        n_missing = int(np.count_nonzero(missing))
        missed = int(counts[missing].sum()) if n_missing else 0
        call.misses, call.hits = missed, call.keys - missed
        training = insert and not self.read_only
        if training and self.evictor is not None and self.evictor.sweep_every is not None:
            self._sweep(protect=slots[~missing])  # first: it may fail, before any change
        if n_missing and (training or self.tier is not None):
            create = CREATE_ADMITTED if training else CREATE_NONE
            got, created = self._fill_missing(unique_ids, counts, slots, create=create,
                                              step=self.step + 1, call=call)
            if created_out is not None:
                created_out |= created
            if call.inserts and self.key_log is not None and strings is not None:
                self.key_log.add_among(string_ids, strings, unique_ids[created])
            missed = int(counts[missing & ~got].sum())
        if training:
            self.step += 1
            live = slots if missed == 0 else slots[slots != EMPTY]
            if touch_rows(self.arena.np("meta"), self.changes.flags, live,
                          counts if missed == 0 else counts[slots != EMPTY], self.step):
                self.changes.grow(live)  # the kernel also marks the rows changed
            if self.tier is not None:
                self.tier.mark(live)
            if self.evictor is not None:
                self.evictor.clock.tick(self.step)
        if missed:
            call.defaults_served = missed
        self.last_call = call
        self.counters.add_call(call)
        return slots

    def _find_gather(self, ids: np.ndarray, call: CallStats | None = None,
                     counts: np.ndarray | None = None) -> tuple[torch.Tensor, np.ndarray]:
        """Rows of ids (the default where absent) and the absent mask. With a store, rows
        not in memory are read from it in one batch and served without entering memory,
        so reads never evict and any batch size works."""
        if self.arena.device.type == "cpu":  # probe and copy in one compiled pass
            # torch's allocations are 64-byte aligned, so large outputs can be streamed
            out = torch.empty((ids.shape[0], self.dim), dtype=torch.float32)
            slots, absent = self.index.find_rows(ids, self.arena.np("weights"), out.numpy())
            # a warm table's reads find every key: skip the passes over the slots
            missing = slots == EMPTY if absent else np.zeros(ids.shape[0], dtype=bool)
            if absent:
                out[torch.from_numpy(missing)] = self._default
        else:
            slots = self.index.find(ids)
            missing = slots == EMPTY
            absent = int(np.count_nonzero(missing))
            out = self.gather(slots, missing=missing)
        if call is not None:
            call.misses = absent if counts is None else int(counts[missing].sum())
        if (self.tier is not None or self.base is not None) and absent:
            pos = np.flatnonzero(missing)
            unique, inverse, _ = unique_inverse(ids[pos])
            found, stored, _ = self._read_below(unique)
            if found.any():
                rows = np.zeros((unique.shape[0], self.dim), dtype=np.float32)
                rows[found] = stored.weights
                hit = found[inverse]
                out[torch.from_numpy(pos[hit])] = torch.from_numpy(rows[inverse[hit]])
                missing[pos[hit]] = False
                if call is not None:
                    call.loaded += int(np.count_nonzero(found))
        return out, missing

    def read_unique(self, unique_ids: np.ndarray, counts: np.ndarray) -> torch.Tensor:
        """Rows of distinct ids for a read-only lookup (eval), counted per occurrence.

        Rows only in the store are served from it without entering memory, so evaluation
        never evicts and works with any batch size.

        Args:
            unique_ids: (u,) int64 distinct ids.
            counts: (u,) int64 occurrences of each in the call.

        Returns:
            (u, dim) float32; the default vector where absent.
        """
        call = CallStats(keys=int(counts.sum()))
        out, missing = self._find_gather(unique_ids, call, counts)
        call.hits = call.keys - call.misses
        call.defaults_served = int(counts[missing].sum())
        self.last_call = call
        self.counters.add_call(call)
        return out

    def read(self, ids: np.ndarray) -> torch.Tensor:
        """Rows of ids for a read-only lookup call (eval, serving), counted in the stats.

        Absent ids get the default vector and count as defaults served.

        Args:
            ids: (n,) int64.

        Returns:
            (n, dim) float32, not attached to autograd.
        """
        return self._read_counted(ids)[0]

    def _read_counted(self, ids: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
        """:meth:`read`, also returning the (n,) bool mask of ids without a row."""
        call = CallStats(keys=ids.shape[0])
        out, missing = self._find_gather(ids, call)
        call.hits = ids.shape[0] - call.misses
        call.defaults_served = int(np.count_nonzero(missing)) if call.misses else 0
        self.last_call = call
        self.counters.add_call(call)
        return out, missing

    def gather(self, slots: np.ndarray, *, missing: np.ndarray | None = None) -> torch.Tensor:
        """(u, dim) rows at ``slots``; the default vector where a slot is EMPTY.

        The copy is :func:`take_rows` (compiled and prefetching on the CPU).

        Args:
            slots: (u,) int64 slots.
            missing: ``slots == EMPTY`` if the caller has it already.
        """
        if missing is None:
            missing = slots == EMPTY
        if not missing.any():
            return take_rows(self.arena.weights, slots)
        if self.capacity() == 0:
            return self._default.expand(slots.shape[0], self.dim).clone()
        rows = take_rows(self.arena.weights, np.where(missing, 0, slots))
        rows[torch.from_numpy(missing)] = self._default
        return rows

    def _changed(self, slots: np.ndarray, *, marked: bool = False) -> None:
        """Marks rows changed for the store and the next checkpoint (for the store only when
        ``marked``: the checkpoint's marks are set already); write-through writes them at
        once.

        Raises:
            StoreError: a write-through failed; the change stays in memory, marked.
        """
        self.writes += 1
        if not marked:
            self.changes.mark(slots)
        if self.tier is not None:
            self.tier.mark(slots)
            if self.tier.write_through:
                try:
                    self.counters.store_writes += self.tier.write(slots)
                except StoreError as exc:
                    raise type(exc)(
                        f"{exc}; write-through failed after the change was made in memory: "
                        "the rows stay marked and the next flush() or eviction writes them, "
                        "so do not apply the change again") from exc

    # ----------------------------------------------------------------- public verbs
    def find(self, keys) -> FindResult:
        """Rows of keys without inserting or touching metadata; a lookup call in the stats,
        as an eval-mode lookup.

        Args:
            keys: (n,) keys (int64 ids, or str/bytes).

        Returns:
            FindResult(values (n, dim), found (n,) bool); default vector where not found.
        """
        values, missing = self._read_counted(self.ids_of(keys).ids)
        return FindResult(values, torch.from_numpy(~missing))

    def contains(self, keys) -> torch.Tensor:
        """(n,) bool, whether each key has a row (in memory or in the store)."""
        ids = self.ids_of(keys).ids
        slots = self.index.find(ids)
        return torch.from_numpy((slots != EMPTY) | self._stored_only(ids, slots))

    def _store_meaning(self) -> dict:
        """What a store's rows must share with this table besides their layout: the string
        hash seed, and the optimizer when the table has one (a table without one, e.g. for
        evaluation, reads a trained table's rows whatever their optimizer)."""
        meaning = {"hash_seed": self.config.hash_seed}
        if self.config.optimizer is not None:
            meaning["optimizer"] = type(self.config.optimizer).__name__
        return meaning

    def find_or_insert(self, keys) -> InsertResult:
        """Rows of keys, creating (initialising) missing ones, admission aside. Does not
        touch metadata. A lookup call in the stats (its new rows count as inserts).

        Returns:
            InsertResult(values (n, dim), inserted (n,) bool).

        Raises:
            ReadOnlyTableError: the table is read-only.
            ValueError: keys of other ranks' shards (see :meth:`owned`).
            MemoryBudgetError: more distinct keys than ``max_rows`` and no store.
            StoreError: the store failed (what stays applied: see the class docstring).
        """
        self._check_writable("find_or_insert")
        batch = self.ids_of(keys)
        self._refuse_foreign(batch.ids, "find_or_insert")
        unique, inverse, counts = unique_inverse(batch.ids)
        self._check_fits_without_store(unique.shape[0], "find_or_insert")
        values = torch.empty((unique.shape[0], self.dim), dtype=torch.float32)
        created = np.zeros(unique.shape[0], dtype=bool)
        call = CallStats(keys=batch.ids.shape[0])
        later = self._later_chunks(unique)
        for part in self._chunks(unique.shape[0]):
            slots = self.index.find(unique[part])
            call.misses += int(counts[part][slots == EMPTY].sum())
            created[part] = self._fill_missing(unique[part], counts[part], slots,
                                               create=CREATE_ALL, step=self.step,
                                               call=call, keep=later(part))[1]
            values[part] = self.gather(slots)
        if created.any() and self.key_log is not None and batch.strings is not None:
            self.key_log.add(batch.ids, batch.strings)
        call.hits = call.keys - call.misses
        self.last_call = call
        self.counters.add_call(call)
        pick = torch.from_numpy(inverse)
        return InsertResult(values.index_select(0, pick), torch.from_numpy(created[inverse]))

    def _chunks(self, n: int):
        """Slices of a batch of n distinct ids small enough to sit in memory at once (the
        whole batch without a budget)."""
        step = n if self.max_rows is None else max(1, self.max_rows // 2)
        return [slice(start, start + step) for start in range(0, n, max(step, 1))]

    def _check_fits_without_store(self, distinct: int, verb: str) -> None:
        """Refuses a write of more distinct keys than memory holds when there is no store:
        its own rows would be discarded to make room for its later ones, and come back as
        new rows with their state lost.

        Raises:
            MemoryBudgetError: ``distinct`` is over ``max_rows`` and there is no store.
        """
        if self.tier is None and self.max_rows is not None and distinct > self.max_rows:
            raise MemoryBudgetError(
                f"{verb} of {distinct} distinct keys needs them in memory at once, but the "
                f"budget holds {self.max_rows} rows and the table has no store to keep the "
                "rest; split the call into batches of at most max_rows keys, raise "
                "memory_budget / max_rows, or give the table a store")

    def _later_chunks(self, unique: np.ndarray):
        """For a call over the :meth:`_chunks` of ``unique``: a function of a chunk giving
        the slots, in memory when the call began, of the chunks after it (to keep there)."""
        if self.max_rows is None or unique.shape[0] <= self.max_rows // 2:
            return lambda part: None
        resident = self.index.find(unique)

        def later(part: slice) -> np.ndarray:
            rest = resident[part.stop:]
            return rest[rest != EMPTY]

        return later

    def insert_or_assign(self, keys, values: torch.Tensor, *,
                         optimizer_state: torch.Tensor | None = None) -> None:
        """Writes rows for keys, creating missing ones. With duplicates, the last one wins.

        Args:
            keys: (n,) keys.
            values: (n, dim) new vectors.
            optimizer_state: optional (n, state_width) optimizer state; new rows otherwise
                start from the optimizer's initial state and existing rows keep theirs.

        Raises:
            ReadOnlyTableError: the table is read-only.
            ValueError: shapes do not match, a row holds NaN/inf, or ``optimizer_state``
                a negative sum of squares (nothing is written); keys of other ranks'
                shards (see :meth:`owned`).
            MemoryBudgetError: more distinct keys than ``max_rows`` and no store.
            StoreError: the store failed (what stays applied: see the class docstring).
        """
        self._check_writable("insert_or_assign")
        batch = self.ids_of(keys)
        self._refuse_foreign(batch.ids, "insert_or_assign")
        n = batch.ids.shape[0]
        values = checked_rows("values", values, n, self.dim, self.arena.weights.device)
        if optimizer_state is not None:
            optimizer_state = checked_rows("optimizer_state", optimizer_state, n,
                                           self.arena.state_width, self.arena.state.device)
            check_accumulators(self.optimizer, self.dim, optimizer_state)
        unique, last = _last_occurrence(batch.ids)
        self._check_fits_without_store(unique.shape[0], "insert_or_assign")
        later = self._later_chunks(unique)
        created_any = False
        try:
            for part in self._chunks(unique.shape[0]):
                slots = self.index.find(unique[part])
                _, created = self._fill_missing(unique[part], np.ones_like(slots), slots,
                                                create=CREATE_ALL, step=self.step,
                                                keep=later(part))
                created_any |= bool(created.any())
                rows, pick = torch.from_numpy(slots), torch.from_numpy(last[part])
                self.arena.weights[rows] = values[pick]
                if optimizer_state is not None:
                    self.arena.state[rows] = optimizer_state[pick]
                self._changed(slots)
        finally:
            # once, after the chunks (also those done before a store failure): logging the
            # whole batch per chunk made a batch far past a small memory budget quadratic
            # (160k keys over 2,000 rows: 8.5 s against 1.5 s without the key log)
            if created_any and self.key_log is not None and batch.strings is not None:
                self.key_log.add(batch.ids, batch.strings)

    def assign(self, keys, values: torch.Tensor) -> torch.Tensor:
        """Overwrites the vectors of keys that have rows; others are left absent.

        Returns:
            (n,) bool, whether each key was found and written.

        Raises:
            ReadOnlyTableError: the table is read-only.
            ValueError: ``values`` is not (n, dim) or holds NaN/inf (nothing is written);
                keys of other ranks' shards (see :meth:`owned`).
            MemoryBudgetError: more distinct keys than ``max_rows``, a lazily opened
                checkpoint to read them from and no store.
            StoreError: the store failed (what stays applied: see the class docstring).
        """
        self._check_writable("assign")
        ids = self.ids_of(keys).ids
        self._refuse_foreign(ids, "assign")
        values = checked_rows("values", values, ids.shape[0], self.dim,
                              self.arena.weights.device)
        unique, last = _last_occurrence(ids)
        if self.base is not None:  # else no row enters memory: nothing is evicted
            self._check_fits_without_store(unique.shape[0], "assign")
        found = np.zeros(unique.shape[0], dtype=bool)
        later = self._later_chunks(unique)
        for part in self._chunks(unique.shape[0]):
            slots = self.index.find(unique[part])
            self._fill_missing(unique[part], np.ones_like(slots), slots, create=CREATE_NONE,
                               step=self.step, keep=later(part))
            hit = slots != EMPTY
            rows, pick = torch.from_numpy(slots[hit]), torch.from_numpy(last[part][hit])
            self.arena.weights[rows] = values[pick]
            self._changed(slots[hit])
            found[part] = hit
        return torch.from_numpy(found[unique_inverse(ids)[1]])

    def erase(self, keys) -> int:
        """Removes the rows of keys, from memory and from the store; their slots are reused
        by later inserts.

        Returns:
            How many rows were removed (absent keys are ignored).

        Raises:
            ReadOnlyTableError: the table is read-only.
            ValueError: keys of other ranks' shards (see :meth:`owned`); over a store the
                ranks share, their rows are the owners'.
            StoreError: the store failed; nothing was removed.
        """
        self._check_writable("erase")
        unique = unique_inverse(self.ids_of(keys).ids)[0]
        self._refuse_foreign(unique, "erase")
        slots = self.index.find(unique)
        stored = self._stored_only(unique, slots)
        if self.tier is not None:
            self.tier.delete(unique)  # first: it may fail
        # Only keys that had a row start an erasure epoch: lookups of absent keys have no
        # gradient to protect, and every epoch makes pending backward passes resolve again.
        present = unique[(slots != EMPTY) | stored]
        freed = self._release(present, erased=True) if present.shape[0] else present
        if self.key_log is not None:
            self.key_log.discard(unique)
        removed = int(freed.shape[0]) + int(np.count_nonzero(stored))
        self.counters.erased += removed
        return removed

    def clear(self) -> None:
        """Removes every row, from memory and from the store (capacity is kept); all of them
        are counted as erased.

        Raises:
            ReadOnlyTableError: the table is read-only.
            StoreError: the store failed part way (see :meth:`clear_store`); memory is
                unchanged.
        """
        self._check_writable("clear")
        erased = self.size() + self.count_below_memory()
        if self.tier is not None:
            self._empty_store()
        self._clear_memory()
        self.counters.erased += erased

    def _clear_memory(self) -> None:
        self.wipes += 1
        self.changes.wipe()
        if self.base is not None:
            self.base.close()
            self.base = None
        if self.tier is not None:
            self.tier.forget(np.arange(self.tier.dirty.shape[0]))
        self.arena.np("meta")[:self._high_water, LAST_STEP] = FREE_STEP
        self._log_removal(None, wipe=True)
        self.index.clear()
        self._free_top = 0
        self._high_water = 0
        self._drop_queued()  # deferred gradients of rows that are gone, as after an erase
        if self.key_log is not None:
            self.key_log = KeyLog()
