"""Candidate samplers: negatives drawn from a dynamic table's live rows.

A sampler draws ``num`` candidate ids (with replacement) and gives, for any id, the log of
its *expected count* in such a draw, ``log(num * p(id))``, which the logQ correction
subtracts from the logits (Jean et al. 2015; Bengio & Senecal 2008). Negatives come from
rows in memory (a table over a store samples its working set) and are never inserted.

- :class:`Uniform`: every live row equally likely; drawn by picking arena slots at random
  and keeping live ones, so no table-sized work per draw.
- :class:`LogUniform`: Zipfian by frequency rank, p(r) = log((r + 2) / (r + 1)) / log(N + 1)
  for rows ranked by their training count (TensorFlow's ``log_uniform_candidate_sampler``,
  with ranks from the live counts instead of a fixed vocabulary order).
- :class:`Unigram`: p(row) proportional to count ** power (0.75: Word2Vec's unigram^0.75).
- :class:`InBatch`: the other examples' positives are the negatives; p(row) is its share of
  the table's counts (the sampling-bias correction of two-tower retrieval).

The frequency samplers keep a snapshot of the live rows' counts and refresh it every
``refresh_every`` training steps of the table, when rows equal to a tenth of it entered or
left memory since (growth, eviction under a budget, erasure), or when all its rows were
replaced (a clear, a state loaded), so a draw costs O(num log N), not O(N).
"""

from __future__ import annotations

import abc
import weakref
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from dynembed.table.arena import COUNT, ID, LAST_STEP
from dynembed.table.eviction import FREE_STEP


class _Stamp(NamedTuple):
    """When something derived from a table's live rows was read (see :meth:`stale`)."""

    # The table itself, weakly: a sampler may serve several, and id(table) is no identity
    # (a table created after another was freed often gets its id, and then its snapshot).
    table: weakref.ref
    step: int
    size: int
    moved: int  # rows that had entered or left its memory
    wipes: int  # times all its rows had been replaced

    @classmethod
    def of(cls, table) -> _Stamp:
        return cls(weakref.ref(table), table.step, table.size(), table.rows_moved,
                   table.wipes)

    def stale(self, table, refresh_every: int) -> bool:
        """Whether ``table`` has changed enough since: another table, ``refresh_every``
        steps, a tenth of the rows in or out of memory, or all of them replaced."""
        now = _Stamp.of(table)
        return (self.table() is not table or now.step - self.step >= refresh_every
                or now.wipes != self.wipes or now.moved - self.moved > self.size // 10
                or self.size == 0)


def _live(table) -> tuple[np.ndarray, np.ndarray]:
    """(ids, counts) of the rows in memory."""
    _, slots = table.index.items()
    meta = table.arena.np("meta")
    return meta[slots, ID].copy(), meta[slots, COUNT].copy()


class CandidateSampler(abc.ABC):
    """Draws candidate ids from a table's live rows."""

    @abc.abstractmethod
    def sample(self, table, num: int, rng: np.random.Generator,
               positives: np.ndarray) -> np.ndarray:
        """(num,) int64 ids drawn with replacement (fewer only if the table has no row).

        Args:
            table: the output table.
            num: how many to draw.
            rng: the random generator.
            positives: (p,) int64 the batch's positive ids (used by :class:`InBatch`).
        """

    @abc.abstractmethod
    def log_expected_count(self, table, ids: np.ndarray, num: int,
                           counts: np.ndarray | None = None) -> np.ndarray:
        """(n,) float64 ``log(num * p(id))`` for each id (the logQ correction).

        Args:
            table: the output table.
            ids: (n,) int64 ids.
            num: the draws (see :meth:`draws`).
            counts: (n,) int64 training counts of the ids' rows where the caller read them
                wherever the rows live (eval reads rows in the store without bringing them
                into memory); None: counts are read from memory. Only samplers whose
                probability of a given id depends on its own count use them.
        """

    def __getstate__(self) -> dict:
        # Cached snapshots hold their table by weak reference, which does not pickle; a
        # copy in another process serves other tables anyway, so it starts without them.
        return {name: None if name in ("_snapshot", "_total") else value
                for name, value in self.__dict__.items()}

    def draws(self, num: int, positives: np.ndarray) -> int:
        """How many candidates one :meth:`sample` call draws (the ``num`` of the expected
        counts)."""
        return max(num, 1)


@dataclass
class Uniform(CandidateSampler):
    """Every live row in memory equally likely."""

    def sample(self, table, num, rng, positives):
        size, high = table.size(), table._high_water
        if size == 0 or num == 0:
            return np.empty(0, np.int64)
        meta = table.arena.np("meta")
        if size * 8 < high:  # mostly free slots (after erasures): draw among the live ones
            _, live = table.index.items()
            return meta[live[rng.integers(0, size, num)], ID].copy()
        out, have = [], 0
        while have < num:  # rejection of free slots; each round expects the rest, 8x at most
            need = num - have
            slots = rng.integers(0, high, min(int(need * high / size) + 16, 8 * need + 16))
            slots = slots[meta[slots, LAST_STEP] != FREE_STEP][:need]
            out.append(meta[slots, ID].copy())
            have += slots.shape[0]
        return np.concatenate(out)

    def log_expected_count(self, table, ids, num, counts=None):
        return np.full(ids.shape[0], np.log(num / max(table.size(), 1)))


def _check_refresh_every(value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"refresh_every must be an int >= 1, got {value!r}")


@dataclass
class _Snapshot:
    ids: np.ndarray  # live ids in draw order
    cumulative: np.ndarray  # (n,) float64 running sum of weights (draw by searchsorted)
    by_id: np.ndarray  # ids sorted, for probability lookups
    p_by_id: np.ndarray  # p of each of by_id
    stamp: _Stamp


@dataclass(kw_only=True)
class _FrequencySampler(CandidateSampler):
    refresh_every: int = 1000
    _snapshot: _Snapshot | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        _check_refresh_every(self.refresh_every)

    @abc.abstractmethod
    def _weights(self, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(order of the rows to draw from, their probabilities in that order)."""

    def snapshot(self, table) -> _Snapshot:
        """The current snapshot of the live rows' probabilities (refreshed when stale)."""
        snap = self._snapshot
        if snap is None or snap.stamp.stale(table, self.refresh_every):
            ids, counts = _live(table)
            order, p = self._weights(counts)
            ids = ids[order]
            by = np.argsort(ids)
            snap = _Snapshot(ids, np.cumsum(p), ids[by], p[by], _Stamp.of(table))
            self._snapshot = snap
        return snap

    def sample(self, table, num, rng, positives):
        snap = self.snapshot(table)
        if snap.ids.shape[0] == 0 or num == 0:
            return np.empty(0, np.int64)
        u = rng.random(num) * snap.cumulative[-1]
        pick = np.minimum(np.searchsorted(snap.cumulative, u, side="right"),
                          snap.ids.shape[0] - 1)
        return snap.ids[pick]

    def log_expected_count(self, table, ids, num, counts=None):
        # p comes from the snapshot of the rows drawn from (memory), not from ``counts``
        snap = self.snapshot(table)
        p = np.full(ids.shape[0], snap.p_by_id.min() if snap.p_by_id.shape[0] else 1.0)
        if snap.by_id.shape[0]:
            at = np.minimum(np.searchsorted(snap.by_id, ids), snap.by_id.shape[0] - 1)
            hit = snap.by_id[at] == ids
            p[hit] = snap.p_by_id[at[hit]]
        return np.log(num * p)


@dataclass(kw_only=True)
class LogUniform(_FrequencySampler):
    """Zipfian over frequency ranks: the most counted row is rank 0."""

    def _weights(self, counts):
        order = np.argsort(-counts, kind="stable")
        ranks = np.arange(counts.shape[0], dtype=np.float64)
        p = np.log((ranks + 2) / (ranks + 1)) / np.log(counts.shape[0] + 1)
        return order, p


@dataclass(kw_only=True)
class Unigram(_FrequencySampler):
    """p(row) proportional to max(count, 1) ** power."""

    power: float = 0.75

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.power, bool) or not isinstance(self.power, (int, float)) \
                or not 0 <= self.power <= 1:
            raise ValueError(f"power must be a number in [0, 1], got {self.power!r}")

    def _weights(self, counts):
        w = np.maximum(counts, 1).astype(np.float64) ** self.power
        return np.arange(counts.shape[0]), w / w.sum()


@dataclass(kw_only=True)
class InBatch(CandidateSampler):
    """The batch's positives are everyone's negatives (no extra rows are read). The total
    of the live rows' counts is refreshed like the frequency samplers' snapshots."""

    refresh_every: int = 1000
    _total: tuple[_Stamp, float] | None = field(default=None, init=False, repr=False)
    """The live rows' total count, and when it was read."""

    def __post_init__(self) -> None:
        _check_refresh_every(self.refresh_every)

    def sample(self, table, num, rng, positives):
        return np.unique(positives)

    def draws(self, num, positives):
        return max(int(np.unique(positives).shape[0]), 1)

    def log_expected_count(self, table, ids, num, counts=None):
        """log(batch positives * the id's share of the live rows' training counts).

        The total is over the rows in memory, the same for every id, so it shifts all
        logits alike and leaves the softmax as it is; what matters is each id's own count,
        taken from ``counts`` where given (rows in the store count as much as in memory).
        """
        if self._total is None or self._total[0].stale(table, self.refresh_every):
            self._total = (_Stamp.of(table), float(max(_live(table)[1].sum(), 1)))
        if counts is None:  # training: the lookup brought every existing row into memory
            counts = table.training_counts(ids, below=False)
        return np.log(num * np.maximum(counts, 1) / self._total[1])
