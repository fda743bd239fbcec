"""Eviction in a table: memory budgets, scheduled sweeps, explicit calls, and where evicted
rows go (the store, or discarded and counted and logged). No key is lost silently."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import dynembed as de
from dynembed.errors import MemoryBudgetError
from dynembed.table.budget import parse_bytes
from dynembed.table.index import EMPTY

LOGGER = "dynembed.eviction"


def _table(dim=4, **kw):
    kw.setdefault("optimizer", de.optim.SGD(lr=0.1))
    return de.DynamicTable(de.TableConfig(dim=dim, seed=1, **kw))


def _lookup(table, keys, counts=None):
    keys = np.asarray(keys, dtype=np.int64)
    counts = np.ones_like(keys) if counts is None else np.asarray(counts, dtype=np.int64)
    return table.lookup_slots(keys, counts, insert=True)


def _in_memory(table, keys):
    return table.index.find(np.asarray(keys, dtype=np.int64)) != EMPTY


def _sorted_export(table):
    e = table.export()
    order = torch.argsort(e.ids)
    return {name: getattr(e, name)[order] for name in
            ("ids", "weights", "optimizer_state", "counts", "last_step")}


def _discard_records(caplog):
    return [r for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]


# ---------------------------------------------------------------------- budgets
@settings(max_examples=40, deadline=None)
@given(stream=st.lists(st.lists(st.integers(0, 300), min_size=1, max_size=40), max_size=25),
       max_rows=st.integers(40, 200),
       policy=st.sampled_from([de.policy.LRU(), de.policy.LFU(half_life=3.0),
                               de.policy.TTL(steps=4)]))
def test_size_never_exceeds_max_rows_and_the_batch_stays(stream, max_rows, policy):
    t = _table(max_rows=max_rows, eviction=policy)
    for batch in stream:
        ids, counts = np.unique(np.array(batch, dtype=np.int64), return_counts=True)
        slots = _lookup(t, ids, counts)
        assert (slots != EMPTY).all()
        assert t.size() <= max_rows
        # the rows of this batch were not evicted to make room for it
        assert _in_memory(t, ids).all()
        assert np.array_equal(t.index.find(ids), slots)
        totals = t.stats().totals
        # every row ever made is either still here or counted as discarded
        assert totals.inserts == t.size() + totals.discarded
        assert totals.evicted == 0


def test_a_batch_of_exactly_max_rows_new_keys_replaces_everything():
    t = _table(max_rows=10)
    _lookup(t, np.arange(10))
    _lookup(t, np.arange(100, 110))
    assert t.size() == 10 and _in_memory(t, np.arange(100, 110)).all()
    assert t.stats().totals.discarded == 10


def test_memory_budget_error_when_one_batch_needs_too_many_rows():
    t = _table(max_rows=10)
    with pytest.raises(MemoryBudgetError, match="budget"):
        _lookup(t, np.arange(11))
    assert t.size() == 0 and t.step == 0
    _lookup(t, np.arange(8))
    # hits count too: 8 rows of the batch plus 3 new ones do not fit in 10
    with pytest.raises(MemoryBudgetError):
        _lookup(t, np.arange(11))
    assert t.size() == 8 and t.stats().totals.discarded == 0
    assert _in_memory(t, np.arange(8)).all()
    # without the hits the 3 new keys fit (evicting older rows)
    _lookup(t, np.arange(8, 11))
    assert t.size() == 10


def test_memory_budget_error_through_the_module():
    emb = de.DynamicEmbedding(dim=4, optimizer=de.optim.SGD(lr=0.1), seed=1, max_rows=5)
    assert isinstance(emb.table.evictor.policy, de.policy.LRU)
    with pytest.raises(MemoryBudgetError):
        emb(torch.arange(6))
    emb(torch.arange(5)).sum().backward()
    emb(torch.arange(5, 10)).sum().backward()
    assert emb.table.size() == 5
    assert not emb.table.contains(torch.arange(5)).any()  # no store: discarded
    assert emb.stats().totals.discarded == 5


def test_only_admitted_keys_need_room():
    adm = de.policy.FrequencyAdmission(threshold=2, width=1 << 14)
    t = _table(max_rows=10, admission=adm)
    slots = _lookup(t, np.arange(50))  # none admitted: nothing needs a row
    assert (slots == EMPTY).all() and t.size() == 0
    with pytest.raises(MemoryBudgetError):
        _lookup(t, np.arange(50))  # now all 50 are admitted at once


def test_memory_budget_sets_max_rows_from_bytes():
    tables = {b: _table(memory_budget=b) for b in ("64KiB", "256KiB", "1MiB")}
    rows = {b: t.max_rows for b, t in tables.items()}
    assert 0 < rows["64KiB"] < rows["256KiB"] < rows["1MiB"]
    per_row = tables["1MiB"].arena.bytes_per_row()  # 4 * 4 + 3 * 8 for SGD at dim 4
    assert per_row == 40
    assert rows["1MiB"] < 2**20 // per_row
    # an int budget and max_rows combine: the smaller limit applies
    assert _table(memory_budget=2**20).max_rows == rows["1MiB"]
    assert _table(memory_budget="1MiB", max_rows=100).max_rows == 100
    assert _table(memory_budget="1MiB", max_rows=10**9).max_rows == rows["1MiB"]
    # bigger rows, fewer of them
    assert _table(memory_budget="1MiB", optimizer=de.optim.Adam(lr=0.1)).max_rows \
        < rows["1MiB"]


@pytest.mark.parametrize("budget", ["64KiB", "256KiB", "1MiB", 30_000])
def test_bytes_allocated_stay_within_the_memory_budget(budget):
    t = _table(memory_budget=budget, optimizer=de.optim.Adagrad(lr=0.1))
    limit = parse_bytes(budget)
    rng = np.random.default_rng(0)
    batch = max(1, t.max_rows // 3)
    for _ in range(60):
        keys = np.unique(rng.integers(0, 10**7, size=batch))
        _lookup(t, keys)
        stats = t.stats()
        assert stats.rows <= t.max_rows
        assert stats.bytes_allocated <= limit, (stats.bytes_allocated, limit)
    assert t.stats().totals.discarded > 0


@pytest.mark.parametrize("bad", ["lots", "-1GiB", "2 parsecs", 0, -5, "0B", "1.5", "2.5B"])
def test_memory_budget_is_validated(bad):
    with pytest.raises(ValueError, match="memory_budget"):
        de.TableConfig(dim=4, memory_budget=bad)


def test_memory_budget_too_small_for_one_row():
    with pytest.raises(ValueError, match="memory_budget"):
        _table(memory_budget=16)


def test_budget_evictions_per_lookup_are_bounded():
    # A lookup evicts what it needs plus a small slack (1/128 of the budget), not more.
    t = _table(max_rows=1280)
    _lookup(t, np.arange(1280))
    before = t.stats().totals.discarded
    _lookup(t, np.arange(10_000, 10_005))
    evicted = t.stats().totals.discarded - before
    assert 5 <= evicted <= 5 + 1280 // 128
    assert t.size() == 1280 + 5 - evicted
    # the slack means the next few new keys need no eviction at all
    before = t.stats().totals.discarded
    _lookup(t, [20_000])
    assert t.stats().totals.discarded == before


def test_budget_eviction_follows_the_policy():
    t = _table(max_rows=4, eviction=de.policy.LFU())
    _lookup(t, [1, 2, 3, 4], [5, 1, 7, 3])
    _lookup(t, [9])  # needs one slot: key 2 (count 1) goes
    assert t.contains([1, 2, 3, 4, 9]).tolist() == [True, False, True, True, True]


# ---------------------------------------------------------------------- discard
def test_discarded_rows_are_counted_and_logged_once(caplog):
    caplog.set_level(logging.WARNING, logger=LOGGER)
    t = _table(eviction=de.policy.LRU())
    _lookup(t, np.arange(10))
    assert t.evict(rows=3) == 3
    assert t.evict(rows=2) == 2  # right after: rate-limited, no second line
    totals = t.stats().totals
    assert totals.discarded == 5 and totals.evicted == 0 and totals.store_writes == 0
    assert t.size() == 5
    records = _discard_records(caplog)
    assert len(records) == 1
    assert "discarded 3" in records[0].getMessage()
    assert "store" in records[0].getMessage()


def test_budget_discards_are_counted_and_logged(caplog):
    caplog.set_level(logging.WARNING, logger=LOGGER)
    t = _table(max_rows=8)
    for start in range(0, 80, 8):
        _lookup(t, np.arange(start, start + 8))
    totals = t.stats().totals
    assert totals.discarded == 72 and totals.inserts == 80 and t.size() == 8
    assert len(_discard_records(caplog)) == 1


def test_each_table_logs_its_own_discards(caplog):
    caplog.set_level(logging.WARNING, logger=LOGGER)
    for _ in range(2):
        t = _table(eviction=de.policy.LRU())
        _lookup(t, [1, 2])
        t.evict(rows=1)
    assert len(_discard_records(caplog)) == 2


def test_no_log_line_when_nothing_is_discarded(caplog):
    caplog.set_level(logging.WARNING, logger=LOGGER)
    t = _table(max_rows=100)
    _lookup(t, np.arange(50))
    assert t.evict() == 0
    assert _discard_records(caplog) == []
    assert t.stats().totals.discarded == 0


# ---------------------------------------------------------------------- sweeps
def test_scheduled_sweep_evicts_expired_rows_within_a_bounded_number_of_lookups():
    ttl, every = 3, 5
    t = _table(eviction=de.policy.TTL(steps=ttl), evict_every=every)
    _lookup(t, [1, 2, 3])  # step 1
    lookups = 0
    while t.contains([1, 2, 3]).any():
        _lookup(t, [99])
        lookups += 1
        assert lookups <= ttl + every + 1, "expired rows survived the sweeps"
    # expired once the step passes 1 + ttl; the next sweep (a multiple of every) removes them
    assert t.step == every
    assert t.contains([99]).all()
    assert t.stats().totals.expired == 3 and t.stats().totals.discarded == 0


def test_sweep_keeps_rows_in_use():
    t = _table(eviction=de.policy.TTL(steps=2), evict_every=1)
    for _ in range(20):
        _lookup(t, [1, 2])
    assert t.contains([1, 2]).all() and t.stats().totals.discarded == 0


def test_sweep_pause_is_bounded_by_sweep_rows():
    n, sweep_rows = 40, 4
    t = _table(eviction=de.policy.TTL(steps=1), evict_every=5, sweep_rows=sweep_rows)
    _lookup(t, np.arange(n))  # step 1
    previous = 0
    for _ in range(4 + math.ceil((n + 1) / sweep_rows)):
        _lookup(t, [1000])
        expired = t.stats().totals.expired
        assert expired - previous <= sweep_rows  # one lookup examines sweep_rows slots
        previous = expired
    assert previous == n
    assert t.size() == 1


def test_no_sweep_without_evict_every():
    t = _table(eviction=de.policy.TTL(steps=1))
    _lookup(t, [1])
    for _ in range(10):
        _lookup(t, [2])
    assert t.contains([1]).all()  # only explicit calls evict
    assert t.evict() == 1
    assert not t.contains([1]).any()


def test_evict_every_needs_an_eviction_policy_that_expires_rows():
    with pytest.raises(ValueError, match="evict_every"):
        de.TableConfig(dim=4, evict_every=5)
    with pytest.raises(ValueError, match="evict_every"):
        de.TableConfig(dim=4, eviction=de.policy.LRU(), evict_every=0)
    for never in (de.policy.LRU(), de.policy.LFU(half_life=3.0),
                  de.policy.ScoreFunction(fn=lambda c, s, now: c)):
        with pytest.raises(ValueError, match="expires rows"):
            de.TableConfig(dim=4, eviction=never, evict_every=5)
    for expiring in (de.policy.TTL(steps=3), de.policy.LFU(min_score=1.0),
                     de.policy.ScoreFunction(fn=lambda c, s, now: c, min_score=1.0)):
        assert de.TableConfig(dim=4, eviction=expiring, evict_every=5).evict_every == 5


@pytest.mark.parametrize("policy", [de.policy.LRU(), de.policy.LFU(half_life=3.0),
                                    de.policy.ScoreFunction(fn=lambda c, s, now: c)])
def test_evict_with_a_policy_that_never_expires_only_gets_under_budget(policy):
    """None from ``expired`` means nothing expires: an explicit evict() under the budget
    removes no row (it once removed every row not looked up this step)."""
    t = _table(max_rows=100, eviction=policy)
    for start in (0, 10, 20):
        _lookup(t, range(start, start + 10))
    assert t.evict() == 0
    assert t.size() == 30 and t.stats().totals.discarded == 0
    t.max_rows = 25
    assert t.evict() == 5
    assert t.size() == 25


def test_explicit_evict_removes_expired_rows_then_gets_under_budget():
    t = _table(max_rows=100, eviction=de.policy.TTL(steps=2))
    _lookup(t, [1, 2])  # step 1
    _lookup(t, [3])  # step 2
    _lookup(t, [4])  # step 3
    _lookup(t, [5])  # step 4: 1 and 2 are 3 steps old
    assert t.evict() == 2
    assert t.contains([1, 2, 3, 4, 5]).tolist() == [False, False, True, True, True]


# ---------------------------------------------------------------------- with a store
def test_evicted_rows_go_to_the_store_and_come_back_identical():
    emb = de.DynamicEmbedding(dim=4, optimizer=de.optim.Adagrad(lr=0.1), seed=1,
                              eviction=de.policy.LRU(), store=de.storage.MemoryStore())
    t = emb.table
    keys = torch.arange(10)
    for _ in range(3):
        emb(keys).pow(2).sum().backward()
    before = _sorted_export(t)
    assert t.evict(rows=4) == 4
    totals = t.stats().totals
    assert totals.evicted == 4 and totals.discarded == 0 and totals.store_writes == 4
    assert t.size() == 6 and t.contains(keys).all()  # still in the table, via the store
    # the whole table (memory plus store) is unchanged, state and metadata included
    after = _sorted_export(t)
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor), name

    emb.eval()
    values = emb(keys)  # reads the evicted rows through the store
    assert torch.equal(values, before["weights"])
    call = t.stats().last_call
    assert call.loaded == 4 and call.defaults_served == 0 and call.hits == 6

    emb.train()
    values = emb(keys)  # a training lookup brings them back into memory
    assert torch.equal(values.detach(), before["weights"])
    call = t.stats().last_call
    assert call.loaded == 4 and call.inserts == 0 and call.hits == 6
    assert t.size() == 10
    assert t.stats().totals.loaded == 8
    exported = _sorted_export(t)
    assert torch.equal(exported["optimizer_state"], before["optimizer_state"])
    assert torch.equal(exported["counts"], before["counts"] + 1)


def test_training_after_eviction_matches_a_table_that_never_evicted():
    # No key is lost: a table with a 16-row budget over a store trains exactly like an
    # unbounded one.
    def make(**kw):
        return de.DynamicEmbedding(dim=4, optimizer=de.optim.Adagrad(lr=0.1), seed=1, **kw)

    small = make(max_rows=16, store=de.storage.MemoryStore())
    big = make()
    rng = np.random.default_rng(0)
    for _ in range(30):
        keys = torch.from_numpy(rng.integers(0, 60, size=12))
        for emb in (small, big):
            emb(keys).pow(2).sum().backward()
        assert small.table.size() <= 16
    totals = small.stats().totals
    assert totals.evicted > 0 and totals.discarded == 0 and totals.loaded > 0
    a, b = _sorted_export(small.table), _sorted_export(big.table)
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_reloaded_rows_count_as_loaded_in_training():
    t = _table(store=de.storage.MemoryStore(), eviction=de.policy.LRU())
    _lookup(t, np.arange(10))
    t.evict(rows=10)
    assert t.size() == 0 and t.stats().totals.evicted == 10
    slots = _lookup(t, np.arange(5))
    assert (slots != EMPTY).all()
    call = t.stats().last_call
    assert call.loaded == 5 and call.inserts == 0
    assert t.stats().totals.loaded == 5


def test_stored_rows_skip_admission():
    # A row evicted to the store was admitted already: it comes back at its next lookup.
    adm = de.policy.FrequencyAdmission(threshold=3, width=1 << 14)
    t = _table(store=de.storage.MemoryStore(), eviction=de.policy.LRU(), admission=adm)
    _lookup(t, [7], [3])
    before = t.find([7]).values.clone()
    t.evict(rows=1)
    assert t.size() == 0
    t.admitter.sketch[...] = 0  # forget the sightings: the store alone must bring it back
    slots = _lookup(t, [7])
    assert (slots != EMPTY).all()
    assert torch.equal(t.gather(slots), before)
    assert t.stats().totals.not_admitted == 0


def test_budget_with_store_evicts_and_counts():
    t = _table(max_rows=8, store=de.storage.MemoryStore())
    for start in range(0, 40, 8):
        _lookup(t, np.arange(start, start + 8))
    totals = t.stats().totals
    assert totals.evicted == 32 and totals.discarded == 0
    assert t.size() == 8 and t.contains(np.arange(40)).all()
    assert sorted(t.export().ids.tolist()) == list(range(40))


def test_gradient_of_a_row_evicted_before_backward_is_not_lost_silently():
    # The row of key 1 moves to the store between forward and backward (its slot is freed
    # and not reused). Its gradient must either reach the row or be counted as skipped;
    # it must not be applied to the freed slot and reported as an update.
    lr = 1.0
    emb = de.DynamicEmbedding(dim=2, optimizer=de.optim.SGD(lr=lr), seed=0,
                              eviction=de.policy.LRU(), store=de.storage.MemoryStore())
    t = emb.table
    emb(torch.tensor([1, 2])).sum().backward()
    before = t.find([1]).values.clone()
    updated = t.stats().totals.updated_rows
    out = emb(torch.tensor([1]))
    assert t.evict(rows=2) == 2 and t.size() == 0
    out.sum().backward()
    totals = t.stats().totals
    now = t.find([1]).values  # from the store
    applied = torch.equal(now, before - lr)
    assert applied or torch.equal(now, before)
    if applied:
        assert totals.updated_rows == updated + 1 and totals.skipped_gradients == 0
    else:
        assert totals.skipped_gradients == 1, "the dropped gradient was not counted"
        assert totals.updated_rows == updated, "a dropped gradient was counted as an update"


@pytest.mark.parametrize("verb", ["insert_or_assign", "find_or_insert"])
def test_a_chunked_call_does_not_evict_the_rows_its_later_chunks_write(verb):
    """A call of more keys than max_rows / 2 runs in chunks; an earlier chunk's eviction
    discarded (no store) the existing row of a key in a later chunk, which then came back
    as a new row: its optimizer state and count reset, its vector re-initialised."""
    table = de.DynamicTable(de.TableConfig(dim=2, optimizer=de.optim.Adam(lr=0.1), seed=1,
                                           max_rows=4, eviction=de.policy.LRU()))
    emb = de.DynamicEmbedding(table=table)
    for key in (10, 11, 12, 13):  # 10 is the least recently used row
        emb(torch.tensor([key])).sum().backward()
    before = table.find([10]).values.clone()
    state = table.export()
    row = state.ids.tolist().index(10)
    keys, values = torch.tensor([1, 2, 10]), torch.zeros(3, 2)
    if verb == "insert_or_assign":
        table.insert_or_assign(keys, values)
    else:
        torch.testing.assert_close(table.find_or_insert(keys).values[2], before[0])
    after = table.export()
    assert 10 in after.ids.tolist()
    i = after.ids.tolist().index(10)
    torch.testing.assert_close(after.optimizer_state[i], state.optimizer_state[row])
    assert after.counts[i] == state.counts[row] == 1


@pytest.mark.parametrize("verb", ["insert_or_assign", "find_or_insert", "assign"])
def test_a_write_of_more_keys_than_memory_holds_without_a_store_is_refused(verb, tmp_path):
    """With no store, the call discarded rows it had just written (or existing rows of its
    own later keys, which came back re-initialised) to make room for the rest."""
    table = de.DynamicTable(de.TableConfig(dim=2, optimizer=de.optim.Adagrad(lr=0.1), seed=1,
                                           max_rows=8, eviction=de.policy.LRU()))
    table.insert_or_assign(torch.arange(8), torch.ones(8, 2))
    if verb == "assign":  # rows enter memory only from a lazily opened checkpoint
        de.checkpoint.save(tmp_path / "c", tables={"t": table})
        de.checkpoint.load(tmp_path / "c", tables={"t": table}, lazy=True)
    before = table.export()
    keys = torch.arange(-1, 8)  # nine distinct keys
    call = {"insert_or_assign": lambda: table.insert_or_assign(keys, torch.zeros(9, 2)),
            "find_or_insert": lambda: table.find_or_insert(keys),
            "assign": lambda: table.assign(keys, torch.zeros(9, 2))}[verb]
    with pytest.raises(MemoryBudgetError, match=rf"{verb} of 9 distinct keys.*no store"):
        call()
    after = table.export()
    assert after.ids.tolist() == before.ids.tolist() and table.stats().totals.discarded == 0
    torch.testing.assert_close(after.weights, before.weights)
    # as many distinct keys as the budget holds still work, in chunks
    assert table.find_or_insert(torch.arange(8)).inserted.sum() == 0


def test_the_discard_line_names_the_collections_table(caplog):
    """Two tables of one collection both logged "table(dim=4)": not told apart."""
    caplog.set_level(logging.WARNING, logger=LOGGER)
    coll = de.EmbeddingCollection(tables={
        "user": de.TableConfig(dim=4, optimizer=de.optim.SGD(lr=0.1), max_rows=3),
        "item": de.TableConfig(dim=4, optimizer=de.optim.SGD(lr=0.1), max_rows=3)})
    coll({"user": torch.arange(3), "item": torch.arange(3)})
    coll({"user": torch.arange(3, 6), "item": torch.arange(3, 6)})
    lines = sorted(r.getMessage().split(":")[0] for r in _discard_records(caplog))
    assert lines == ["table 'item'", "table 'user'"]
