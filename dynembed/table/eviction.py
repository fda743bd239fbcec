"""Evictor: picks the rows that leave memory, with a bounded pause per call.

Budget evictions look at a window of slots after a moving hand (a few times the number of
rows to evict, at least ``_MIN_WINDOW``), not at the whole arena, and evict the
lowest-scoring rows in it, like Redis's sampled LRU: each call costs time proportional to
its batch, never to the table. Scheduled sweeps walk the arena ``sweep_rows`` slots per
lookup and evict expired rows.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from dynembed.policy.eviction import EvictionPolicy, RowView, StepClock

_MIN_WINDOW = 8192
_WINDOW_FACTOR = 8
FREE_STEP = -1
"""``last_step`` of a slot that holds no row (freed by erase or eviction)."""

log = logging.getLogger("dynembed.eviction")


class DiscardLog:
    """Rate-limited warning about rows discarded for lack of a store (one line a minute)."""

    def __init__(self, interval: float = 60.0) -> None:
        self.interval = interval
        self.pending, self.total, self.last = 0, 0, -float("inf")

    def add(self, rows: int, table: str) -> None:
        """Counts ``rows`` discarded from ``table`` (its name in the line), and logs them
        (with those not logged yet) unless a line went out less than a minute ago."""
        self.pending += rows
        self.total += rows
        now = time.monotonic()
        if now - self.last >= self.interval:
            log.warning("%s: discarded %d evicted rows (%d in total) because the table has no "
                        "store; give it store= to keep them", table, self.pending,
                        self.total)
            self.pending, self.last = 0, now


class Evictor:
    """The eviction state of one table.

    Args:
        policy: the score policy.
        max_rows: the most live rows memory may hold (None: no budget).
        sweep_every: steps between sweeps for expired rows (None: no sweeps).
        sweep_rows: slots a sweep examines per lookup.
    """

    def __init__(self, policy: EvictionPolicy, max_rows: int | None,
                 sweep_every: int | None, sweep_rows: int = 1 << 16) -> None:
        self.policy, self.max_rows = policy, max_rows
        self.sweep_every, self.sweep_rows = sweep_every, sweep_rows
        self.clock = StepClock(policy.clock_horizon_s)
        self._hand = 0
        self._sweep_at: int | None = None  # next slot of a running sweep, None when idle
        self._protect = np.zeros(0, dtype=bool)

    def _view(self, meta: np.ndarray, slots, step: int) -> RowView:
        return RowView(meta[slots, 1], meta[slots, 2], step, self.clock)

    def victims(self, meta: np.ndarray, high_water: int, need: int, protect: np.ndarray,
                step: int, *, whole: bool = False) -> np.ndarray:
        """Slots of the ``need`` lowest-scoring live rows near the hand, none in ``protect``.

        Args:
            meta: (capacity, 3) arena metadata.
            high_water: slots ever used (live rows are below it).
            need: rows to pick.
            protect: (p,) slots that must stay (rows of the current lookup).
            step: the table step.
            whole: score every row (exact; for explicit calls) rather than a window.

        Returns:
            (m,) int64 slots, m <= need (fewer only if fewer rows are evictable).
        """
        if need <= 0 or high_water == 0:
            return np.empty(0, dtype=np.int64)
        if self._protect.shape[0] < high_water:
            self._protect = np.zeros(meta.shape[0], dtype=bool)
        self._protect[protect] = True
        try:
            width = min(high_water, max(_MIN_WINDOW, _WINDOW_FACTOR * need))
            if whole:
                width = high_water
            for attempt in range(2):  # the window, then (rarely needed) the whole arena
                start = self._hand % high_water
                window = (start + np.arange(width)) % high_water
                candidates = window[(meta[window, 2] != FREE_STEP) & ~self._protect[window]]
                if candidates.shape[0] >= need or width == high_water:
                    break
                width = high_water
            self._hand = (start + width) % high_water
            if candidates.shape[0] <= need:
                return candidates
            scores = self.policy.scores(self._view(meta, candidates, step))
            return candidates[np.argpartition(scores, need - 1)[:need]]
        finally:
            self._protect[protect] = False

    def expired(self, meta: np.ndarray, start: int, stop: int, step: int) -> np.ndarray:
        """Slots in [start, stop) holding rows the policy calls expired (not this step's)."""
        slots = np.arange(start, stop, dtype=np.int64)
        slots = slots[meta[slots, 2] != FREE_STEP]
        mask = self.expired_rows(meta[slots, 1], meta[slots, 2], step)
        return slots[:0] if mask is None else slots[mask]  # None: the policy never expires

    def expired_rows(self, counts: np.ndarray, last_step: np.ndarray,
                     step: int) -> np.ndarray | None:
        """(n,) bool: which rows of the given metadata (rows outside memory: the store's, a
        checkpoint's) the policy calls expired at ``step``, none of this step's; None if
        the policy never expires rows."""
        if not self.policy.expires:
            return None
        mask = self.policy.expired(RowView(counts, last_step, step, self.clock))
        return None if mask is None else mask & (last_step != step)

    def sweep_range(self, high_water: int, step: int) -> tuple[int, int] | None:
        """The slot range a scheduled sweep examines at this step, or None."""
        if self.sweep_every is None:
            return None
        if self._sweep_at is None:
            if step % self.sweep_every:
                return None
            self._sweep_at = 0
        start = self._sweep_at
        stop = min(high_water, start + self.sweep_rows)
        self._sweep_at = None if stop >= high_water else stop
        return start, stop
