"""Eviction policies: one score per row (larger means keep) and which rows expire.

Orders are checked on small tables with a known history, through ``table.evict``.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

import dynembed as de
from dynembed.policy.eviction import RowView, StepClock


def _table(eviction, **kw):
    return de.DynamicTable(de.TableConfig(dim=4, seed=1, eviction=eviction, **kw))


def _lookup(table, keys, counts=None):
    keys = np.asarray(keys, dtype=np.int64)
    counts = np.ones_like(keys) if counts is None else np.asarray(counts, dtype=np.int64)
    return table.lookup_slots(keys, counts, insert=True)


def _present(table, keys):
    return [k for k, c in zip(keys, table.contains(keys).tolist()) if c]


def _view(counts, last_step, step, clock=None):
    return RowView(np.asarray(counts, dtype=np.int64), np.asarray(last_step, dtype=np.int64),
                   step, clock or StepClock())


# ---------------------------------------------------------------------- LRU
def test_lru_evicts_least_recently_used_first():
    t = _table(de.policy.LRU())
    keys = list(range(10, 20))
    for key in keys:  # key 10 at step 1, ..., 19 at step 10
        _lookup(t, [key])
    _lookup(t, [10, 11])  # step 11: the two oldest become the newest
    assert t.evict(rows=3) == 3
    assert _present(t, keys) == [10, 11, 15, 16, 17, 18, 19]
    assert t.evict(rows=2) == 2
    assert _present(t, keys) == [10, 11, 17, 18, 19]
    assert t.size() == 5


def test_lru_ignores_lookup_frequency():
    t = _table(de.policy.LRU())
    _lookup(t, [1], [100])  # step 1, many occurrences
    _lookup(t, [2])  # step 2
    t.evict(rows=1)
    assert _present(t, [1, 2]) == [2]


def test_lru_is_the_default_with_a_budget():
    t = de.DynamicTable(de.TableConfig(dim=4, seed=1, max_rows=3))
    assert isinstance(t.evictor.policy, de.policy.LRU)
    assert de.DynamicTable(de.TableConfig(dim=4)).evictor is None


def test_evict_without_policy_and_bad_rows():
    t = de.DynamicTable(de.TableConfig(dim=4))
    with pytest.raises(ValueError, match="eviction"):
        t.evict()
    t = _table(de.policy.LRU())
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="rows"):
            t.evict(rows=bad)
    assert t.evict(rows=0) == 0 and t.evict(rows=5) == 0  # empty table


def test_evict_more_rows_than_there_are_evicts_all():
    t = _table(de.policy.LRU())
    _lookup(t, [1, 2, 3])
    assert t.evict(rows=10) == 3
    assert t.size() == 0


# ---------------------------------------------------------------------- LFU
def _lfu_history(policy):
    """a: 8 lookups long ago (step 1); b: 2 lookups just now; c: one lookup per step."""
    t = _table(policy)
    _lookup(t, [1], [8])  # a, step 1
    for _ in range(18):  # steps 2..19
        _lookup(t, [3])
    _lookup(t, [2], [2])  # b, step 20
    return t


def test_lfu_without_decay_evicts_the_least_frequent():
    t = _lfu_history(de.policy.LFU())
    t.evict(rows=1)
    assert _present(t, [1, 2, 3]) == [1, 3]
    t.evict(rows=1)
    assert _present(t, [1, 2, 3]) == [3]


def test_lfu_with_half_life_forgets_old_popularity():
    # a: 8 * 2**(-19/5) ~ 0.57 < b: 2 < c: 18 * 2**(-1/5)
    t = _lfu_history(de.policy.LFU(half_life=5))
    t.evict(rows=1)
    assert _present(t, [1, 2, 3]) == [2, 3]
    t.evict(rows=1)
    assert _present(t, [1, 2, 3]) == [3]


def test_lfu_scores_match_the_formula():
    view = _view([8, 2, 4], [1, 20, 10], 20)
    np.testing.assert_allclose(de.policy.LFU().scores(view), [8, 2, 4])
    np.testing.assert_allclose(de.policy.LFU(half_life=5).scores(view),
                               [8 * 2 ** (-19 / 5), 2, 4 * 2 ** (-10 / 5)])


def test_lfu_min_score_expires_rows_at_explicit_evict():
    t = _lfu_history(de.policy.LFU(half_life=5, min_score=1.0))
    assert t.evict() == 1  # only a is below 1
    assert _present(t, [1, 2, 3]) == [2, 3]
    assert de.policy.LFU().expired(_view([1], [1], 5)) is None


@pytest.mark.parametrize("kw", [{"half_life": 0}, {"half_life": -1}, {"half_life": "1"},
                                {"half_life": True}, {"half_life": float("inf")},
                                {"min_score": "low"}, {"min_score": float("nan")}])
def test_lfu_arguments_are_validated(kw):
    with pytest.raises(ValueError, match=next(iter(kw))):
        de.policy.LFU(**kw)


# ---------------------------------------------------------------------- TTL
def test_ttl_steps_expires_rows_not_looked_up_for_that_many_steps():
    t = _table(de.policy.TTL(steps=5))
    _lookup(t, [1])  # step 1
    _lookup(t, [2])  # step 2
    _lookup(t, [3])  # step 3
    for _ in range(4):  # steps 4..7
        _lookup(t, [4])
    # step 7: 1 is 6 steps old (> 5), 2 is 5 steps old (not more than 5)
    assert t.evict() == 1
    assert _present(t, [1, 2, 3, 4]) == [2, 3, 4]
    _lookup(t, [4])  # step 8: now 2 is 6 steps old
    assert t.evict() == 1
    assert _present(t, [1, 2, 3, 4]) == [3, 4]
    assert t.evict() == 0
    totals = t.stats().totals
    assert totals.expired == 2 and totals.discarded == 0  # expired, not lost for room


def test_ttl_under_budget_scores_like_lru():
    t = _table(de.policy.TTL(steps=1000))
    for key in (5, 6, 7):
        _lookup(t, [key])
    _lookup(t, [5])
    t.evict(rows=1)
    assert _present(t, [5, 6, 7]) == [5, 7]
    assert t.evict() == 0  # nothing is older than 1000 steps


def test_ttl_seconds_uses_the_step_clock():
    t = _table(de.policy.TTL(seconds=30))
    for key in (1, 2, 3):  # steps 1, 2, 3
        _lookup(t, [key])
    # Replay the history with explicit times: step 1 happened 100 s ago, step 2 50 s ago,
    # step 3 just now. The clock resolution is one second.
    now = time.time()
    clock = StepClock()
    clock.tick(1, now=now - 100)
    clock.tick(2, now=now - 50)
    clock.tick(3, now=now - 2)
    t.evictor.clock = clock
    assert t.evict() == 2  # 1 and 2 were last looked up more than 30 s ago
    assert _present(t, [1, 2, 3]) == [3]


def test_ttl_seconds_keeps_rows_younger_than_the_ttl():
    t = _table(de.policy.TTL(seconds=75))
    for key in (1, 2, 3):
        _lookup(t, [key])
    now = time.time()
    clock = StepClock()
    for step, age in ((1, 100), (2, 50), (3, 2)):
        clock.tick(step, now=now - age)
    t.evictor.clock = clock
    assert t.evict() == 1
    assert _present(t, [1, 2, 3]) == [2, 3]


def test_step_clock_samples_at_most_once_a_second():
    clock = StepClock()
    clock.tick(1, now=100.0)
    clock.tick(2, now=100.5)  # dropped: within a second of the last sample
    clock.tick(3, now=101.0)
    clock.tick(9, now=160.0)
    assert clock.steps == [1, 3, 9]
    assert clock.last_step_before(100.0) == -1
    assert clock.last_step_before(100.7) == 1
    assert clock.last_step_before(150.0) == 3
    assert clock.last_step_before(1e12) == 9


def test_ttl_seconds_expiry_on_a_row_view():
    clock = StepClock()
    clock.tick(10, now=time.time() - 3600)
    clock.tick(20, now=time.time() - 10)
    view = _view([1, 1, 1], [5, 10, 15], 20, clock)
    assert de.policy.TTL(seconds=60).expired(view).tolist() == [True, True, False]


@pytest.mark.parametrize("kw", [{}, {"steps": 5, "seconds": 5.0}, {"steps": 0},
                                {"steps": 1.5}, {"steps": True}, {"seconds": 0},
                                {"seconds": float("inf")}, {"seconds": -3}])
def test_ttl_arguments_are_validated(kw):
    with pytest.raises(ValueError, match="steps|seconds"):
        de.policy.TTL(**kw)


def test_ttl_takes_numpy_numbers_as_python_numbers():
    assert de.policy.TTL(steps=np.int64(100)) == de.policy.TTL(steps=100)
    assert type(de.policy.TTL(seconds=np.float32(2.5)).seconds) is float


@pytest.mark.parametrize("min_score", ["high", float("nan"), True])
def test_score_function_min_score_is_validated(min_score):
    """"high" failed inside numpy at the first sweep; NaN silently never expired a row."""
    with pytest.raises(ValueError, match="min_score must be None or a number"):
        de.policy.ScoreFunction(fn=lambda c, last, s: c, min_score=min_score)


# ---------------------------------------------------------------------- user score
def test_score_function_sets_a_custom_order():
    # Most recently used goes first (MRU): score = -last_step.
    seen = {}

    def mru(counts, last_step, step):
        seen["args"] = (counts.copy(), last_step.copy(), step)
        return -last_step

    t = _table(de.policy.ScoreFunction(fn=mru))
    for key in (1, 2, 3, 4, 5):  # steps 1..5
        _lookup(t, [key], [key])
    assert t.evict(rows=2) == 2
    assert _present(t, [1, 2, 3, 4, 5]) == [1, 2, 3]
    counts, last_step, step = seen["args"]
    assert sorted(counts.tolist()) == [1, 2, 3, 4, 5]
    assert sorted(last_step.tolist()) == [1, 2, 3, 4, 5] and step == 5


def test_score_function_min_score_expires_rows():
    t = _table(de.policy.ScoreFunction(fn=lambda c, last, s: c.astype(float), min_score=3))
    _lookup(t, [1, 2, 3, 4], [1, 2, 3, 4])  # step 1
    _lookup(t, [9])  # step 2
    _lookup(t, [4])  # step 3
    assert t.evict() == 3  # counts 1, 2 and 1 (key 9) are below 3
    assert _present(t, [1, 2, 3, 4, 9]) == [3, 4]


@pytest.mark.parametrize("bad", [lambda c, last, s: np.zeros(1),
                                 lambda c, last, s: 0.0,
                                 lambda c, last, s: np.zeros((c.shape[0], 2))])
def test_score_function_with_bad_shape_raises_and_evicts_nothing(bad):
    t = _table(de.policy.ScoreFunction(fn=bad))
    _lookup(t, [1, 2, 3, 4, 5])
    with pytest.raises(ValueError, match="one score per row"):
        t.evict(rows=2)
    assert t.size() == 5 and t.stats().totals.discarded == 0


@pytest.mark.parametrize("bad", [lambda c, last, s: np.full(c.shape[0], "high"),
                                 lambda c, last, s: "keep"])
def test_score_function_returning_strings_is_named_and_evicts_nothing(bad):
    """numpy's "could not convert string to float" named neither fn nor the policy."""
    t = _table(de.policy.ScoreFunction(fn=bad))
    _lookup(t, [1, 2, 3, 4, 5])
    with pytest.raises(TypeError, match=r"ScoreFunction\(fn=.*returned .*not numbers"):
        t.evict(rows=2)
    assert t.size() == 5 and t.stats().totals.discarded == 0


def test_score_function_must_be_callable():
    with pytest.raises(TypeError, match="fn"):
        de.policy.ScoreFunction(fn=3)


@pytest.mark.parametrize("fn", [lambda counts: counts, lambda c, last, s, extra: c])
def test_score_function_of_other_arguments_is_refused_when_made(fn):
    """It was accepted, and the first eviction failed inside a training lookup with a
    TypeError naming neither fn nor the policy."""
    with pytest.raises(TypeError, match=r"fn must take the three arguments \(counts, "
                                        r"last_step, step\).*signature"):
        de.policy.ScoreFunction(fn=fn)


@pytest.mark.parametrize("fn", [lambda *args: args[0], lambda c, last, s, scale=1.0: c * scale,
                                np.maximum])  # np.maximum: (x1, x2, out), it binds
def test_score_functions_that_take_three_arguments_are_accepted(fn):
    de.policy.ScoreFunction(fn=fn)


def test_eviction_must_be_a_policy():
    with pytest.raises(TypeError, match="eviction"):
        de.TableConfig(dim=4, eviction="lru")


def test_the_step_clock_keeps_only_what_its_ttl_can_ask_about():
    """It kept one sample per second forever: 2.6M samples (180 MiB) after a month."""
    clock = StepClock(horizon_s=60)
    start = 1_000_000.0
    for second in range(30 * 86_400 // 10):  # a month of ticks every 10 s
        clock.tick(second, now=start + 10 * second)
    assert len(clock.times) <= 2 * 60 // 10 + 2
    now = start + 10 * (30 * 86_400 // 10 - 1)
    assert clock.last_step_before(now - 60) == 30 * 86_400 // 10 - 8  # the sample before
    long = StepClock(horizon_s=86_400 * 365)
    for minute in range(20_000):
        long.tick(minute, now=start + 60 * minute)
    assert long.resolution_s == 86_400 * 365 / 4096 and len(long.times) <= 2_000
    none = StepClock(horizon_s=None)
    none.tick(5)
    assert none.times == []
    assert _table(de.policy.LRU()).evictor.clock.horizon_s is None  # LRU never reads it
    assert _table(de.policy.TTL(seconds=30)).evictor.clock.horizon_s == 30


def test_ttl_seconds_counts_rows_of_a_loaded_state_from_the_load():
    """Loading a state with an earlier step kept the clock's samples of the later steps:
    rows looked up after the load counted as older than the TTL and were evicted at once."""
    t = _table(de.policy.TTL(seconds=2))
    state = t.state_dict()  # step 0
    now = time.time()
    for step, age in ((1, 10.0), (97, 5.0), (193, 3.0), (288, 0.5)):
        t.evictor.clock.tick(step, now=now - age)
    t.step = 288
    t.load_state_dict(state)
    _lookup(t, [42])
    _lookup(t, [43])
    assert t.evict() == 0 and _present(t, [42, 43]) == [42, 43]


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_score_function_nan_scores_raise_naming_the_policy(bad):
    """NaN scores sorted last in numpy's argpartition: those rows were silently never
    evicted (and never expired: NaN < min_score is False). +-inf are plain scores."""
    def fn(counts, last_step, step):
        score = last_step.astype(np.float64)
        score[:3] = bad
        return score

    t = _table(de.policy.ScoreFunction(fn=fn))
    _lookup(t, [1, 2, 3, 4, 5, 6])
    if not np.isnan(bad):  # inf keeps a row, -inf evicts it first: an order, not an error
        assert t.evict(rows=3) == 3
        assert _present(t, [1, 2, 3, 4, 5, 6]) == ([1, 2, 3] if bad > 0 else [4, 5, 6])
        return
    with pytest.raises(ValueError, match=r"ScoreFunction.*3 NaN scores? of 6 rows"):
        t.evict(rows=2)
    assert t.size() == 6 and t.stats().totals.discarded == 0


def test_rows_inserted_between_steps_live_from_the_next_step():
    """insert_or_assign stamped new rows with the last training step: after a pause longer
    than TTL(seconds=), the next step's sweep expired a row inserted a moment before; with
    TTL(steps=) it aged one step more than a row first trained at the next step."""
    t = _table(de.policy.TTL(seconds=60), evict_every=1)
    _lookup(t, [1])  # step 1
    t.evictor.clock.times[-1] -= 3600  # step 1 happened an hour ago: training paused
    t.insert_or_assign([2], torch.ones(1, 4))  # inserted now
    assert t.export().last_step.tolist() == [1, 2]  # 2: the step the next lookup will have
    _lookup(t, [3])  # step 2 (its sweep expires 1, seen an hour ago)
    assert _present(t, [1, 2, 3]) == [2, 3]
    assert t.evict() == 0

    t = _table(de.policy.TTL(steps=2))
    _lookup(t, [1])  # step 1
    t.insert_or_assign([2], torch.ones(1, 4))
    _lookup(t, [3])  # step 2: 2 and 3 are equally fresh
    _lookup(t, [4])
    _lookup(t, [4])  # step 4: 1 is 3 steps old, 2 and 3 are 2
    assert t.evict() == 1 and _present(t, [1, 2, 3]) == [2, 3]
