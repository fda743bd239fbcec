"""Counters of a table: what happened to keys, rows and gradients, per call and in total."""

from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass, field, fields

_ADDING = threading.Lock()
"""Held while a call's counts are added or the totals copied: a model server's workers
look tables up from several threads at once (one lock for every table: it is held for
microseconds)."""


@dataclass
class CallStats:
    """What one lookup call did: ``keys``, ``hits``, ``misses``, ``defaults_served`` and
    ``not_admitted`` count key occurrences (``[1, 1, 1, 2]`` is four keys), while
    ``inserts`` and ``loaded`` count rows (one per distinct key). So ``keys == hits +
    misses`` always, but ``misses`` exceeds ``loaded + inserts + defaults_served`` when a
    missed key occurs more than once."""

    keys: int = 0
    """Keys looked up (with duplicates)."""
    hits: int = 0
    """Keys whose row was in memory."""
    misses: int = 0
    """Keys whose row was not in memory: read from the store or a lazily opened checkpoint
    (see ``loaded``), inserted in training, or answered with the default vector (see
    ``defaults_served``)."""
    inserts: int = 0
    """Rows created by the call."""
    defaults_served: int = 0
    """Keys answered with the default vector (unseen in eval or read-only mode, or not
    admitted)."""
    not_admitted: int = 0
    """Keys refused a row by the admission policy (they get the default vector)."""
    loaded: int = 0
    """Rows read from the store or a lazily opened checkpoint (misses of memory they
    answered); a training lookup brings them into memory, a read serves them without."""


_CALL_FIELDS = tuple(f.name for f in fields(CallStats))
"""CallStats' field names (``fields()`` per lookup cost more than the additions)."""


@dataclass
class Counters(CallStats):
    """Cumulative counters since the table was made (or reset)."""

    lookup_calls: int = 0
    """Lookup calls: module calls, and the table's ``find`` / ``find_or_insert``."""
    erased: int = 0
    """Rows removed by erase or clear."""
    updated_rows: int = 0
    """Row updates applied by the optimizer."""
    skipped_gradients: int = 0
    """Gradient rows not applied: non-finite (policy "skip"; with "raise", or in a loss
    scale's overflowed step, every row of that update), whose key was erased between
    forward and the update, or dropped because the store failed."""
    nonfinite_gradients: int = 0
    """Gradient rows that held NaN or inf."""
    unadmitted_gradients: int = 0
    """Gradient rows dropped because their key was not admitted (it has no row)."""
    zeroed_gradients: int = 0
    """Deferred-mode gradient rows dropped by ``zero_grad()`` before a step applied them
    (asked for, so not counted as skipped)."""
    evicted: int = 0
    """Rows moved out of memory by eviction and kept: in the store, or (without one) in
    the lazily opened checkpoint they were read from, unchanged since."""
    discarded: int = 0
    """Rows evicted with no store to keep them: lost, and logged (rate-limited)."""
    expired: int = 0
    """Rows the eviction policy expired (TTL, or below ``min_score``), removed from memory,
    the store and a lazily opened checkpoint alike."""
    store_writes: int = 0
    """Rows written to the store (evictions, flushes, write-through)."""

    def add_call(self, call: CallStats) -> None:
        """Adds one call's counts to the totals (thread-safe with :meth:`snapshot`)."""
        with _ADDING:
            for name in _CALL_FIELDS:
                setattr(self, name, getattr(self, name) + getattr(call, name))
            self.lookup_calls += 1

    def snapshot(self) -> Counters:
        """A copy, never taken half way through an :meth:`add_call`."""
        with _ADDING:
            return dataclasses.replace(self)


@dataclass(frozen=True)
class TableStats:
    """A snapshot of a table's size and counters (see :meth:`DynamicTable.stats`)."""

    rows: int
    """Live rows in memory (rows only in the store or a lazily opened checkpoint are not
    counted: see ``DynamicTable.count_below_memory``)."""
    capacity: int
    """Rows the arena can hold before it grows."""
    bytes_used: int
    """Bytes of live rows (weights, optimizer state, metadata) plus the index."""
    bytes_allocated: int
    """Bytes allocated for the arena and index (capacity, not only live rows): what
    ``memory_budget`` bounds."""
    payload_bytes_per_row: int
    """Weights plus optimizer state of one row."""
    key_log_bytes: int = 0
    """Bytes the key log holds (``key_log=True``), outside ``memory_budget``."""
    totals: Counters = field(default_factory=Counters)
    """Cumulative counters."""
    last_call: CallStats = field(default_factory=CallStats)
    """Counters of the most recent lookup call."""
