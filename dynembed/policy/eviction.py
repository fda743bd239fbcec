"""Eviction policies: one score per row, larger means keep.

LRU, LFU with time decay, TTL and user functions differ only in how they compute the score
from a row's metadata (count of training lookups, step of the last one). When memory passes
its budget the table evicts the rows with the lowest scores; scheduled sweeps and explicit
``table.evict()`` calls also evict every row the policy calls *expired*.
"""

from __future__ import annotations

import bisect
import inspect
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from dynembed._args import check_int, check_score, is_real, plain_fields


class StepClock:
    """Wall-clock time of table steps, so a time-to-live in seconds can be turned into a step.

    Args:
        horizon_s: the longest time back it will be asked about (a TTL's seconds; None:
            nothing reads it, so nothing is recorded). It samples the step at most once per
            ``max(1 s, horizon_s / 4096)`` and forgets samples older than the horizon
            (keeping the last one before it), so its memory stays bounded however long the
            job runs (it once kept one sample per second forever: 180 MiB a month).
    """

    def __init__(self, horizon_s: float | None = math.inf) -> None:
        self.horizon_s = horizon_s
        finite = horizon_s is not None and math.isfinite(horizon_s)
        self.resolution_s = max(1.0, horizon_s / 4096) if finite else 1.0
        self.steps: list[int] = []
        self.times: list[float] = []

    def tick(self, step: int, now: float | None = None) -> None:
        """Records that ``step`` happened at ``now`` (default: time.time())."""
        if self.horizon_s is None:
            return
        now = time.time() if now is None else now
        if not self.times or now - self.times[-1] >= self.resolution_s:
            self.steps.append(step)
            self.times.append(now)
            # forget what is past the horizon but the last sample before it, in amortised
            # chunks (half the list at least) so ticks stay O(1)
            old = bisect.bisect_left(self.times, now - self.horizon_s) - 1
            if old > 0 and 2 * old >= len(self.times):
                del self.steps[:old], self.times[:old]

    def reset(self, step: int, now: float | None = None) -> None:
        """Starts again from ``step`` at ``now``: the steps of a loaded state happened at no
        known time, so its rows count as seen at the load (their time to live starts)."""
        self.steps.clear()
        self.times.clear()
        self.tick(step, now)

    def last_step_before(self, t: float) -> int:
        """The last recorded step that happened before time ``t`` (-1 if none)."""
        i = bisect.bisect_left(self.times, t)
        return self.steps[i - 1] if i else -1


@dataclass(frozen=True)
class RowView:
    """Metadata of the rows a policy scores (numpy views; do not modify).

    Attributes:
        counts: (n,) int64 training lookups.
        last_step: (n,) int64 step of the last training lookup.
        step: the table's current step.
        clock: the table's step clock (for time-based policies).
    """

    counts: np.ndarray
    last_step: np.ndarray
    step: int
    clock: StepClock


@dataclass(frozen=True, kw_only=True)
class EvictionPolicy:
    """Base of the eviction policies."""

    def scores(self, rows: RowView) -> np.ndarray:
        """(n,) float64 score per row, larger means keep."""
        raise NotImplementedError

    def expired(self, rows: RowView) -> np.ndarray | None:
        """(n,) bool rows to evict at a sweep even under the budget; None if never."""
        return None

    @property
    def expires(self) -> bool:
        """Whether :meth:`expired` can ever name a row (scheduled sweeps need it)."""
        return type(self).expired is not EvictionPolicy.expired

    @property
    def clock_horizon_s(self) -> float | None:
        """How far back the policy asks ``rows.clock`` about, in seconds (None: it never
        reads the clock)."""
        return None


@dataclass(frozen=True, kw_only=True)
class LRU(EvictionPolicy):
    """Least recently used goes first: the score is the step of the last training lookup."""

    def scores(self, rows):
        return rows.last_step.astype(np.float64)


@dataclass(frozen=True, kw_only=True)
class LFU(EvictionPolicy):
    """Least frequently used goes first, with time decay: the score is the lookup count
    halved for every ``half_life`` steps since the last lookup (no decay if None).
    With ``min_score``, sweeps also evict rows scoring below it."""

    half_life: float | None = None
    """Steps over which a row's score halves while it is not looked up."""
    min_score: float | None = None
    """Rows below this score are expired at sweeps."""

    def __post_init__(self) -> None:
        plain_fields(self)
        if self.half_life is not None and (not is_real(self.half_life)
                                           or not 0 < self.half_life < math.inf):
            raise ValueError(f"half_life must be None or a number of steps > 0, got "
                             f"{self.half_life!r}")
        check_score("min_score", self.min_score)

    def scores(self, rows):
        score = rows.counts.astype(np.float64)
        if self.half_life is not None:
            age = (rows.step - rows.last_step).astype(np.float64)
            score *= np.exp2(-age / self.half_life)
        return score

    def expired(self, rows):
        return None if self.min_score is None else self.scores(rows) < self.min_score

    @property
    def expires(self) -> bool:
        return self.min_score is not None


@dataclass(frozen=True, kw_only=True)
class TTL(EvictionPolicy):
    """Rows not looked up for more than ``steps`` steps or ``seconds`` seconds expire;
    under the budget the oldest go first (scores as LRU). Give exactly one of the two.

    With ``steps=3`` a row last looked up at step 1 lives through step 4 and expires at a
    sweep from step 5 on (``step - last_step > steps``)."""

    steps: int | None = None
    """Time to live in table steps (training lookups): the steps a row may go unseen."""
    seconds: float | None = None
    """Time to live in wall-clock seconds (resolution: one second, or seconds / 4096 if
    coarser). Rows of a loaded state count as seen at the load."""

    def __post_init__(self) -> None:
        plain_fields(self)
        if (self.steps is None) == (self.seconds is None):
            raise ValueError("TTL needs exactly one of steps= or seconds=, e.g. TTL(steps=1000)")
        if self.steps is not None:
            check_int("steps", self.steps)
        if self.seconds is not None and (not is_real(self.seconds)
                                         or not math.isfinite(self.seconds)
                                         or self.seconds <= 0):
            raise ValueError(f"seconds must be a number > 0, got {self.seconds!r}")

    def scores(self, rows):
        return rows.last_step.astype(np.float64)

    @property
    def clock_horizon_s(self) -> float | None:
        return self.seconds

    def expired(self, rows):
        if self.steps is not None:
            return rows.step - rows.last_step > self.steps
        return rows.last_step <= rows.clock.last_step_before(time.time() - self.seconds)


@dataclass(frozen=True, kw_only=True)
class ScoreFunction(EvictionPolicy):
    """A user-supplied score: ``fn(counts, last_step, step) -> scores`` on whole arrays.

    ``counts`` and ``last_step`` are (n,) int64 arrays, ``step`` the table's step; the result
    must be (n,) numbers, larger meaning keep, never NaN (``inf`` keeps a row as long as any
    other can go, ``-inf`` sends it first). With ``min_score``, sweeps also evict rows
    scoring below it.
    """

    fn: Callable[[np.ndarray, np.ndarray, int], np.ndarray]
    """The score function (vectorised over rows)."""
    min_score: float | None = None
    """Rows below this score are expired at sweeps."""

    def __post_init__(self) -> None:
        plain_fields(self)
        if not callable(self.fn):
            raise TypeError(f"fn must be callable(counts, last_step, step), got {self.fn!r}")
        # checked here: a function of other arguments failed only at the first eviction,
        # deep inside a training lookup, with a TypeError that named neither fn nor policy
        try:
            signature = inspect.signature(self.fn)
        except ValueError:  # some builtins publish none: a wrong one fails at its first call
            signature = None
        if signature is not None:
            try:
                signature.bind(None, None, None)
            except TypeError as e:
                raise TypeError(
                    f"fn must take the three arguments (counts, last_step, step), got "
                    f"{self.fn!r} with signature {signature} ({e}); e.g. ScoreFunction("
                    "fn=lambda counts, last_step, step: counts - 0.01 * (step - last_step))"
                ) from None
        check_score("min_score", self.min_score)

    def scores(self, rows):
        """(n,) float64 scores from ``fn``.

        Raises:
            ValueError: ``fn`` returned a shape other than (n,), or a NaN score.
            TypeError: ``fn`` returned what is not numbers (strings, None).
        """
        returned = self.fn(rows.counts, rows.last_step, rows.step)
        try:
            score = np.asarray(returned, dtype=np.float64)
        except (TypeError, ValueError) as e:  # strings, None, objects: numpy's words only
            raise TypeError(f"the eviction policy ScoreFunction(fn={self.fn!r}) returned "
                            f"{type(returned).__name__} {returned!r:.80}, not numbers ({e}); "
                            "fn must return one number per row") from None
        if score.shape != rows.counts.shape:
            raise ValueError(f"the eviction score function returned shape {score.shape} for "
                             f"{rows.counts.shape[0]} rows; it must return one score per row")
        # NaN compares neither below nor above anything: argpartition puts it last, so such
        # rows would never be evicted (nor expired by min_score), without a word
        nan = np.count_nonzero(np.isnan(score))
        if nan:
            raise ValueError(f"the eviction policy ScoreFunction(fn={self.fn!r}) returned "
                             f"{nan} NaN scores of {score.shape[0]} rows; NaN orders no row, "
                             "so those rows would never be evicted. Make fn return numbers "
                             "(e.g. np.nan_to_num(score, nan=-np.inf) to evict them first)")
        return score

    def expired(self, rows):
        return None if self.min_score is None else self.scores(rows) < self.min_score

    @property
    def expires(self) -> bool:
        return self.min_score is not None
