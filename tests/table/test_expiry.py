"""Expired rows (TTL, or below an eviction policy's min_score) are forgotten everywhere:
memory, the store, a lazily opened checkpoint and the next delta checkpoint. Moved to the
store, they came back trained when their key returned, and the store only grew."""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pytest
import torch

import dynembed as de
from dynembed.storage import MemoryStore


def _table(**kw):
    kw.setdefault("optimizer", de.optim.SGD(lr=0.5))
    kw.setdefault("initializer", de.init.Normal(std=1.0))
    return de.DynamicTable(de.TableConfig(dim=4, seed=1, **kw))


def _train(table, keys):
    """One training lookup of keys, each row moved by a gradient of ones."""
    ids = table.ids_of(keys).ids
    slots = table.lookup_slots(ids, np.ones_like(ids), insert=True)
    table.apply_gradients(ids, slots, torch.ones(ids.shape[0], 4))


def _fresh(key):
    """The initial row of key in a table like _table()'s."""
    return _table().find_or_insert([key]).values


@pytest.mark.parametrize("store", [MemoryStore, None])
def test_a_swept_row_is_gone_and_its_key_starts_again(store):
    table = _table(eviction=de.policy.TTL(steps=2), evict_every=1,
                   store=store() if store else None)
    _train(table, [7])  # step 1: trained away from its initial row
    assert not torch.equal(table.find([7]).values, _fresh(7))
    for _ in range(3):
        _train(table, [8])  # the sweep at step 4 expires 7 (last seen at 1)
    assert not table.contains([7]).any()
    if store:
        assert table.tier.store.size() == 0  # not written down: deleted
    totals = table.stats().totals
    assert totals.expired == 1 and totals.evicted == 0 and totals.discarded == 0
    assert torch.equal(table.find_or_insert([7]).values, _fresh(7))  # a new row


def test_evict_also_expires_the_rows_in_the_store():
    table = _table(eviction=de.policy.TTL(steps=3), max_rows=2, store=MemoryStore(),
                   evict_every=100)
    _train(table, [1, 2])  # step 1
    _train(table, [3, 4])  # step 2: 1 and 2 go to the store for room
    assert table.tier.store.size() == 2
    for _ in range(4):
        _train(table, [4])  # step 6: 1, 2 (step 1) and 3 (step 2) are expired
    assert table.evict() == 3  # 3 in memory, 1 and 2 in the store
    assert table.contains([1, 2, 3, 4]).tolist() == [False, False, False, True]
    assert table.tier.store.size() == 0
    assert table.stats().totals.expired == 3


@pytest.mark.parametrize("store", ["memory", "rocksdb"])
def test_scheduled_sweeps_reclaim_the_store_without_evict(store, tmp_path):
    """The store's expired rows are removed by training alone, a few per lookup (here
    sweep_rows=16: one stored row per lookup); a row read back and stored again while the
    pass ran is kept, though the pass had an expired copy of it (MemoryStore's pass holds
    a snapshot; RocksDB's reads the current rows)."""
    made = MemoryStore() if store == "memory" else de.storage.RocksDBStore(tmp_path / "db")
    table = _table(eviction=de.policy.TTL(steps=50), max_rows=2, store=made,
                   evict_every=100, sweep_rows=16)
    for key in range(20):
        _train(table, [f"k{key}"])  # steps 1-20: each goes to the store for room
    while table.step < 99:
        _train(table, ["h"])
    assert table.tier.store.size() == 19  # k19 is still in memory with h, k18 ... below
    table.flush()
    _train(table, ["h"])  # step 100: the sweep expires k19 in memory and starts a pass
    _train(table, ["k5"])  # read back expired: a new row (the pass holds the old copy)
    _train(table, ["h", "h2"])  # the new k5 goes to the store, seen at step 101
    trained = table.find(["k5"]).values
    for _ in range(30):  # the pass reaches every stored row
        _train(table, ["h"])
    totals = table.stats().totals
    assert totals.expired == 20  # k0-k19, and the old k5 read back at step 101
    assert table.contains([f"k{i}" for i in range(20)]).tolist() == [i == 5 for i in range(20)]
    assert table.tier.store.size() == 2  # k5 and h
    torch.testing.assert_close(table.find(["k5"]).values, trained)


class _UnscannableStore(MemoryStore):
    """A real MemoryStore whose scans fail once ``failing`` (a store another program wrote
    into, say)."""

    failing = False

    def _scan(self, batch_size):
        if self.failing:
            raise de.errors.StoreCorruptError(f"{self.name}: injected scan failure")
        yield from super()._scan(batch_size)


def test_a_store_that_fails_the_pass_is_logged_and_training_goes_on(caplog):
    """The pass is upkeep: it failed every training lookup at the sweep's step (a retry
    failed again), though the rows they needed were all in memory."""
    store = _UnscannableStore()
    table = _table(eviction=de.policy.TTL(steps=50), store=store, evict_every=2)
    store.failing = True
    with caplog.at_level(logging.WARNING, logger="dynembed.table.lifecycle"):
        for _ in range(5):
            _train(table, [1])
    assert table.step == 5
    failures = [r for r in caplog.records if "pass over the store" in r.getMessage()]
    assert len(failures) == 2 and "injected scan failure" in failures[0].getMessage()


def test_a_training_lookup_does_not_bring_an_expired_row_back_from_the_store():
    table = _table(eviction=de.policy.TTL(steps=2), max_rows=1, store=MemoryStore(),
                   evict_every=100)
    _train(table, [1])  # step 1
    _train(table, [2])  # step 2: 1 goes to the store, trained
    read = table.read(table.ids_of([1]).ids)  # a read (eval, serving) leaves it there
    assert torch.equal(read, table.find([1]).values) and table.tier.store.size() == 1
    _train(table, [2])
    _train(table, [2])  # step 4: 1 (seen at step 1) is expired
    loaded = table.stats().totals.loaded  # the reads above served it from the store
    _train(table, [1])  # step 5: read back expired: removed, a new row instead
    totals = table.stats().totals
    assert totals.expired == 1 and totals.loaded == loaded and totals.inserts == 3
    expected = _fresh(1) - 0.5  # the new row, after this step's update
    torch.testing.assert_close(table.find([1]).values, expected)


def test_an_expired_row_stays_out_of_a_delta_checkpoint_and_a_lazy_one(tmp_path):
    table = _table(eviction=de.policy.TTL(steps=2), evict_every=1)
    _train(table, [1, 2])
    de.checkpoint.save(tmp_path / "full", tables={"t": table})
    for _ in range(3):
        _train(table, [2])  # 1 expires
    assert not table.contains([1]).any()
    de.checkpoint.save(tmp_path / "delta", tables={"t": table}, parent=tmp_path / "full")
    restored = _table(eviction=de.policy.TTL(steps=2), evict_every=1)
    de.checkpoint.load(tmp_path / "delta", tables={"t": restored})
    assert restored.contains([1, 2]).tolist() == [False, True]

    lazy = _table(eviction=de.policy.TTL(steps=2), evict_every=1)
    de.checkpoint.load(tmp_path / "full", tables={"t": lazy}, lazy=True)  # 1 and 2: step 1
    for _ in range(3):
        _train(lazy, [3])
    assert lazy.evict() == 2  # both were only in the checkpoint
    assert not lazy.contains([1, 2]).any() and lazy.stats().totals.expired == 2


def test_expiry_without_a_store_is_not_reported_as_a_discard(caplog):
    caplog.set_level(logging.WARNING, logger="dynembed.eviction")
    table = _table(eviction=de.policy.TTL(steps=1), evict_every=1)
    _train(table, [1])
    _train(table, [2])
    _train(table, [2])
    assert not table.contains([1]).any()
    assert table.stats().totals.expired == 1 and table.stats().totals.discarded == 0
    assert not caplog.records  # "give it store= to keep them" is no advice for expiry


def test_an_expiring_policy_without_sweeps_warns_at_the_callers_line():
    with pytest.warns(UserWarning, match=r"evict_every is not set.*Set evict_every=N") as w:
        de.DynamicEmbedding(dim=4, eviction=de.policy.TTL(steps=5))
    assert w[0].filename == __file__
    with pytest.warns(UserWarning, match="evict_every"):
        de.TableConfig(dim=4, eviction=de.policy.LFU(min_score=0.5))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        de.TableConfig(dim=4, eviction=de.policy.TTL(steps=5), evict_every=10)
        de.TableConfig(dim=4, eviction=de.policy.LRU(), max_rows=10)  # never expires
