"""Tables as a cache over a store: read-through, write-back, write-through, flush."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import dynembed as de
from dynembed.storage import MemoryStore, RedisStore, RocksDBStore
from dynembed.table import DynamicTable, TableConfig

OPTIMIZERS = {
    "sgd_momentum": lambda: de.optim.SGD(lr=0.1, momentum=0.9),
    "adagrad": lambda: de.optim.Adagrad(lr=0.1),
    "adam": lambda: de.optim.Adam(lr=0.01),
    "ftrl": lambda: de.optim.FTRL(lr=0.1, l1=0.01),
}


def train(emb, batches):
    for keys in batches:
        emb(torch.as_tensor(keys, dtype=torch.int64)).pow(2).sum().backward()
    return emb


def by_id(export):
    order = np.argsort(export.ids.numpy())
    return {f: getattr(export, f)[order] for f in
            ("ids", "weights", "optimizer_state", "counts", "last_step")}


def assert_same_table(a, b):
    ea, eb = by_id(a.export()), by_id(b.export())
    for field in ea:
        assert torch.equal(ea[field], eb[field]), field


@settings(max_examples=20, deadline=None)
@given(batches=st.lists(st.lists(st.integers(-50, 50), min_size=1, max_size=12),
                        min_size=1, max_size=25),
       max_rows=st.integers(12, 40), optimizer=st.sampled_from(sorted(OPTIMIZERS)))
def test_small_budget_over_a_store_equals_an_unbounded_table(batches, max_rows, optimizer):
    """Property: with nothing discarded, memory bounds change nothing about the result."""
    make = OPTIMIZERS[optimizer]
    full = train(de.DynamicEmbedding(dim=3, optimizer=make(), seed=7), batches)
    bounded = train(de.DynamicEmbedding(dim=3, optimizer=make(), seed=7, max_rows=max_rows,
                                        store=MemoryStore()), batches)
    assert bounded.table.size() <= max_rows
    assert bounded.table.stats().totals.discarded == 0
    assert_same_table(full.table, bounded.table)


@pytest.mark.parametrize("backend", ["rocksdb", "redis"])
def test_budget_over_real_stores_equals_unbounded(backend, tmp_path, request):
    rng = np.random.default_rng(3)
    batches = [rng.zipf(1.2, 64) % 3000 for _ in range(60)]
    if backend == "rocksdb":
        store = RocksDBStore(tmp_path / "db")
    else:
        store = RedisStore(request.getfixturevalue("redis_server").url, namespace="equal")
    full = train(de.DynamicEmbedding(dim=8, optimizer=de.optim.Adagrad(lr=0.1), seed=2),
                 batches)
    bounded = train(de.DynamicEmbedding(dim=8, optimizer=de.optim.Adagrad(lr=0.1), seed=2,
                                        max_rows=100, store=store), batches)
    totals = bounded.table.stats().totals
    assert bounded.table.size() <= 100 and totals.evicted > 0 and totals.loaded > 0
    assert_same_table(full.table, bounded.table)
    store.close()


def test_keys_exceed_memory_many_times_and_flush_makes_the_store_complete(tmp_path):
    store = RocksDBStore(tmp_path / "db")
    emb = de.DynamicEmbedding(dim=4, optimizer=de.optim.SGD(lr=0.1), seed=1, max_rows=50,
                              store=store)
    train(emb, [np.arange(i * 25, (i + 1) * 25) for i in range(80)])  # 2,000 keys
    assert emb.table.size() <= 50
    written = emb.table.flush()
    assert written > 0 and emb.table.flush() == 0  # nothing dirty left
    assert store.size() == 2000
    expected = by_id(emb.table.export())
    store.close()
    # a new table over the reopened directory answers with the same rows
    reopened = DynamicTable(TableConfig(dim=4, optimizer=de.optim.SGD(lr=0.1), seed=1,
                                        store=RocksDBStore(tmp_path / "db")))
    assert reopened.size() == 0
    got = reopened.find(torch.from_numpy(expected["ids"].numpy()))
    assert got.found.all() and torch.equal(got.values, expected["weights"])
    reopened.config.store.close()


def test_write_through_keeps_the_store_current():
    store = MemoryStore()
    emb = de.DynamicEmbedding(dim=4, optimizer=de.optim.Adagrad(lr=0.1), seed=1,
                              store=store, write_policy="through")
    train(emb, [[1, 2, 3], [3, 4]])
    ids, slots = emb.table.index.items()
    found, stored = store.get(ids)
    assert found.all()
    assert np.array_equal(stored.weights, emb.table.arena.weights.numpy()[slots])
    assert np.array_equal(stored.state, emb.table.arena.state.numpy()[slots])


def test_write_back_writes_nothing_until_eviction_or_flush():
    store = MemoryStore()
    emb = train(de.DynamicEmbedding(dim=4, optimizer=de.optim.SGD(lr=0.1), store=store),
                [[1, 2, 3]])
    assert store.size() == 0 and emb.table.stats().totals.store_writes == 0
    emb.table.flush()
    assert store.size() == 3 and emb.table.stats().totals.store_writes == 3


def test_eval_lookups_read_through_without_training():
    store = MemoryStore()
    emb = de.DynamicEmbedding(dim=4, optimizer=de.optim.SGD(lr=0.5), seed=3, max_rows=4,
                              store=store)
    train(emb, [[1, 2, 3, 4], [5, 6, 7, 8]])  # 1-4 evicted to the store
    expected = {int(i): w for i, w in zip(*store.get(np.arange(1, 5))[1].ids[None],
                                          store.get(np.arange(1, 5))[1].weights)}
    emb.eval()
    got = emb(torch.tensor([1, 2, 99]))
    assert torch.equal(got[0], torch.from_numpy(expected[1]))
    assert torch.equal(got[1], torch.from_numpy(expected[2]))
    assert torch.equal(got[2], torch.zeros(4))  # unknown: default vector
    call = emb.table.last_call
    assert call.loaded == 2 and call.defaults_served == 1 and call.inserts == 0


def test_find_contains_erase_see_the_store():
    store = MemoryStore()
    table = DynamicTable(TableConfig(dim=2, seed=1, max_rows=2, store=store))
    table.insert_or_assign([1, 2, 3, 4], torch.arange(8.0).reshape(4, 2))
    assert table.size() <= 2
    assert table.contains([1, 2, 3, 4, 5]).tolist() == [True, True, True, True, False]
    found = table.find([1, 4])
    assert found.found.all() and torch.equal(found.values, torch.tensor([[0., 1.], [6., 7.]]))
    assert table.erase([1, 2, 3, 5]) == 3
    assert table.contains([1, 2, 3, 4]).tolist() == [False, False, False, True]
    table.flush()
    assert store.size() == 1


def test_assign_reaches_rows_in_the_store():
    store = MemoryStore()
    table = DynamicTable(TableConfig(dim=2, seed=1, max_rows=2, store=store))
    table.insert_or_assign([1, 2, 3], torch.zeros(3, 2))
    written = table.assign([1, 2, 3, 9], torch.ones(4, 2))
    assert written.tolist() == [True, True, True, False]
    assert torch.equal(table.find([1, 2, 3]).values, torch.ones(3, 2))


def test_state_dict_round_trip_through_a_tiered_table(tmp_path):
    emb = train(de.DynamicEmbedding(dim=4, optimizer=de.optim.Adam(lr=0.01), seed=5,
                                    max_rows=8, store=MemoryStore()),
                [np.arange(i, i + 6) for i in range(0, 40, 3)])
    state = emb.table.state_dict()
    assert state["ids"].shape[0] == 45  # memory and store together
    fresh = DynamicTable(TableConfig(dim=4, optimizer=de.optim.Adam(lr=0.01), seed=5,
                                     max_rows=8, store=RocksDBStore(tmp_path / "db")))
    fresh.load_state_dict(state)
    assert fresh.size() == 0  # rows wait in the store and fault in on use
    assert_same_table(emb.table, fresh)
    fresh.config.store.close()


def test_loading_more_rows_than_the_budget_without_a_store_is_refused():
    big = DynamicTable(TableConfig(dim=2, seed=1))
    big.find_or_insert(list(range(10)))
    small = DynamicTable(TableConfig(dim=2, seed=1, max_rows=5))
    with pytest.raises(de.StateDictError, match="budget"):
        small.load_state_dict(big.state_dict())


def test_clear_empties_the_store_too():
    store = MemoryStore()
    table = DynamicTable(TableConfig(dim=2, seed=1, max_rows=2, store=store))
    table.find_or_insert([1, 2, 3, 4])
    table.clear()
    assert table.size() == 0 and store.size() == 0
    assert not table.contains([1, 2, 3, 4]).any()


@pytest.mark.parametrize("options, match", [
    ({"write_policy": "sideways"}, "write_policy"),
    ({"write_policy": "through"}, "needs a store"),
    ({"store": "redis://localhost"}, "store must be"),
    ({"memory_budget": "lots"}, "memory_budget"),
    ({"memory_budget": -5}, "memory_budget"),
    ({"max_rows": 0}, "max_rows"),
    ({"evict_every": 10}, "evict_every"),
    ({"admission": "frequency"}, "admission"),
    ({"eviction": "lru"}, "eviction"),
])
def test_bad_tier_options_name_the_argument(options, match):
    with pytest.raises((ValueError, TypeError), match=match):
        TableConfig(dim=2, **options)


def test_memory_budget_bytes_bound_the_allocation():
    table = DynamicTable(TableConfig(dim=16, optimizer=de.optim.Adagrad(lr=0.1),
                                     memory_budget="256KiB", store=MemoryStore()))
    for start in range(0, 20000, 500):
        table.lookup_slots(np.arange(start, start + 500, dtype=np.int64),
                           np.ones(500, dtype=np.int64), insert=True)
    assert table.size() <= table.max_rows
    assert table.stats().bytes_allocated <= 256 * 1024
    assert table.stats().totals.evicted > 0 and table.stats().totals.discarded == 0


def test_admission_state_round_trips_through_state_dict():
    policy = de.policy.FrequencyAdmission(threshold=3, width=1024, depth=2)
    emb = de.DynamicEmbedding(dim=2, optimizer=de.optim.SGD(lr=0.1), seed=4, admission=policy)
    train(emb, [[1, 2], [1, 3], [4]])  # 1 seen twice, not admitted yet
    state = emb.state_dict()
    assert any(k.endswith("admission.sketch") for k in state)
    restored = de.DynamicEmbedding(dim=2, optimizer=de.optim.SGD(lr=0.1), seed=99,
                                   admission=policy)
    restored.load_state_dict(state)
    assert np.array_equal(restored.table.admitter.sketch, emb.table.admitter.sketch)
    train(restored, [[1]])  # the third lookup admits key 1 after the restore
    assert restored.table.contains([1]).item()


@settings(max_examples=20, deadline=None)
@given(batches=st.lists(st.lists(st.integers(-40, 40), min_size=1, max_size=10),
                        min_size=2, max_size=25),
       max_rows=st.integers(10, 30), write_policy=st.sampled_from(["back", "through"]),
       background=st.booleans())
def test_prefetching_the_next_batch_changes_nothing(batches, max_rows, write_policy,
                                                    background):
    """Property: prefetch and background writes give the same table as plain training."""
    full = train(de.DynamicEmbedding(dim=3, optimizer=de.optim.Adagrad(lr=0.1), seed=7),
                 batches)
    store = MemoryStore()
    store.background_io = background
    emb = de.DynamicEmbedding(dim=3, optimizer=de.optim.Adagrad(lr=0.1), seed=7,
                              max_rows=max_rows, store=store, write_policy=write_policy)
    for keys, upcoming in zip(batches, batches[1:] + [[]]):
        if upcoming:
            emb.prefetch(torch.tensor(upcoming))  # overlaps with this step
        emb(torch.tensor(keys)).pow(2).sum().backward()
    assert_same_table(full.table, emb.table)


def test_prefetched_rows_come_from_the_background_read(monkeypatch):
    store = MemoryStore()
    emb = de.DynamicEmbedding(dim=2, optimizer=de.optim.SGD(lr=0.1), seed=1, max_rows=4,
                              store=store)
    train(emb, [[1, 2, 3, 4], [5, 6, 7, 8]])
    emb.table.flush()
    emb.prefetch(torch.tensor([1, 2, 99]))
    emb.table.tier._staged.future.result()  # let the background read finish
    reads = []
    real_get = store._get
    monkeypatch.setattr(store, "_get", lambda ids: reads.append(ids.copy()) or real_get(ids))
    emb(torch.tensor([1, 2, 99])).sum().backward()
    # 1 and 2 came from the prefetch; 99 was known absent: no synchronous read at all
    assert reads == []
    assert emb.table.last_call.loaded == 2 and emb.table.last_call.inserts == 1


def test_rows_of_a_failed_background_write_stay_queued_and_are_retried(redis_server):
    import redis

    batches = [np.arange(i, i + 8) for i in range(0, 80, 4)]
    full = train(de.DynamicEmbedding(dim=2, optimizer=de.optim.SGD(lr=0.1), seed=1),
                 batches)
    store = RedisStore(redis_server.url, namespace="behind", retries=1, backoff_base=0.01)
    store.background_io = True  # evicted rows go through the write-behind queue
    admin = redis.Redis.from_url(redis_server.url)
    emb = de.DynamicEmbedding(dim=2, optimizer=de.optim.SGD(lr=0.1), seed=1,
                              max_rows=16, store=store)
    step = 0
    try:
        for keys in batches[:8]:
            train(emb, [keys])
            step += 1
        admin.config_set("maxmemory", "1")  # the store is full: writes fail, reads work
        with pytest.raises(de.StoreFullError):
            for keys in batches[step:]:
                train(emb, [keys])  # evicted rows queue up; their write fails
                step += 1
        queued = len(emb.table.tier._pending)
        assert queued > 0  # rows that did not reach the store are still held
    finally:
        admin.config_set("maxmemory", "0")
    for keys in batches[step:]:  # the refused step again, then the rest: retried writes
        train(emb, [keys])
    assert_same_table(full.table, emb.table)
    store.close()
    admin.close()


def test_background_writes_over_rocksdb_equal_plain_training(tmp_path):
    rng = np.random.default_rng(5)
    batches = [rng.zipf(1.2, 48) % 2000 for _ in range(80)]
    full = train(de.DynamicEmbedding(dim=4, optimizer=de.optim.Adam(lr=0.01), seed=3),
                 batches)
    store = RocksDBStore(tmp_path / "db", background_io=True)
    emb = de.DynamicEmbedding(dim=4, optimizer=de.optim.Adam(lr=0.01), seed=3, max_rows=64,
                              store=store)
    for keys, upcoming in zip(batches, batches[1:] + [None]):
        if upcoming is not None:
            emb.prefetch(torch.from_numpy(upcoming))
        train(emb, [keys])
    assert emb.table.stats().totals.evicted > 0
    assert_same_table(full.table, emb.table)
    store.close()


def test_extreme_ids_round_trip_through_the_store():
    lo, hi = -(2**63), 2**63 - 1
    batches = [[lo, hi, 0], [1, 2, 3], [4, 5, 6], [lo, 7, hi]]
    full = train(de.DynamicEmbedding(dim=2, optimizer=de.optim.SGD(lr=0.1), seed=1), batches)
    emb = train(de.DynamicEmbedding(dim=2, optimizer=de.optim.SGD(lr=0.1), seed=1,
                                    max_rows=3, store=MemoryStore()), batches)
    assert emb.table.stats().totals.loaded >= 2  # lo and hi came back from the store
    assert_same_table(full.table, emb.table)


def test_deferred_updates_reach_rows_evicted_before_the_step():
    batches = [[1, 2, 3], [4, 5, 6], [7, 8, 9], [1, 4, 7]]
    def run(**kw):
        emb = de.DynamicEmbedding(dim=2, optimizer=de.optim.Adagrad(lr=0.1), seed=1,
                                  update_mode="deferred", **kw)
        for i in range(0, len(batches), 2):  # accumulate two batches, then step
            train(emb, batches[i:i + 2])
            emb.sparse_step()
        return emb
    full, bounded = run(), run(max_rows=5, store=MemoryStore())
    assert bounded.table.stats().totals.skipped_gradients == 0
    assert bounded.table.stats().totals.evicted > 0
    assert_same_table(full.table, bounded.table)


def test_close_flushes_then_closes_the_store(tmp_path):
    store = RocksDBStore(tmp_path / "db", background_io=True)
    emb = de.DynamicEmbedding(dim=2, optimizer=de.optim.SGD(lr=0.1), seed=1, max_rows=4,
                              store=store)
    train(emb, [[1, 2, 3, 4], [5, 6, 7, 8], [9]])
    expected = by_id(emb.table.export())
    emb.table.close()
    assert store.closed
    reopened = RocksDBStore(tmp_path / "db")
    reopened.bind(2, 0)
    found, rows = reopened.get(expected["ids"].numpy())
    assert found.all() and np.array_equal(rows.weights, expected["weights"].numpy())
    reopened.close()


def test_key_log_keeps_only_keys_that_got_rows():
    emb = de.DynamicEmbedding(dim=2, optimizer=de.optim.SGD(lr=0.1), key_log=True,
                              admission=de.policy.FrequencyAdmission(threshold=2))
    emb(["a", "b", "b"]).sum().backward()  # "b" seen twice: admitted; "a" refused
    assert emb.table.keys_of(emb.table.ids_of(["a", "b"]).ids) == [None, "b"]


def test_insert_or_assign_past_the_budget_logs_its_keys_once(monkeypatch):
    """The batch's strings were logged again for every budget-sized chunk: quadratic in the
    batch (160k keys over 2,000 rows took 8.5 s)."""
    table = de.DynamicTable(de.TableConfig(dim=2, optimizer=de.optim.SGD(lr=0.1), key_log=True,
                                           max_rows=4, store=MemoryStore()))
    calls = []
    add = table.key_log.add
    monkeypatch.setattr(table.key_log, "add", lambda *a: calls.append(1) or add(*a))
    keys = [f"k{i}" for i in range(20)]
    table.insert_or_assign(keys, torch.arange(40.0).reshape(20, 2))
    assert len(calls) == 1
    export = table.export()
    assert sorted(table.keys_of(export.ids)) == sorted(keys)


def test_load_state_dict_that_fails_to_write_changes_nothing(redis_server):
    import redis

    store = RedisStore(redis_server.url, namespace="loadfail")
    emb = train(de.DynamicEmbedding(dim=2, optimizer=de.optim.SGD(lr=0.1), seed=1,
                                    max_rows=2, store=store), [[1, 2], [3, 4]])
    state = emb.table.state_dict()
    before = by_id(emb.table.export())
    admin = redis.Redis.from_url(redis_server.url)
    admin.config_set("maxmemory", "1")
    try:
        with pytest.raises(de.StoreFullError):
            emb.table.load_state_dict(state)
    finally:
        admin.config_set("maxmemory", "0")
        admin.close()
    after = by_id(emb.table.export())
    assert all(torch.equal(before[k], after[k]) for k in before)
    emb.table.load_state_dict(state)  # works once the store accepts writes
    loaded = by_id(emb.table.export())
    order = np.argsort(state["ids"].numpy())
    assert torch.equal(loaded["ids"], state["ids"][order])
    assert torch.equal(loaded["weights"], state["weights"][order])
    store.close()


def test_load_state_dict_whose_store_delete_fails_keeps_memory():
    """Every store call runs before memory changes: a failing delete (of the stored rows the
    state lacks) once left memory wiped with half a load applied."""

    class FailingDeletes(MemoryStore):
        fail = True

        def _delete(self, ids):
            if self.fail:
                raise de.StoreError(f"{self.name}: delete refused")
            return super()._delete(ids)

    store = FailingDeletes()
    emb = train(de.DynamicEmbedding(dim=2, optimizer=de.optim.SGD(lr=0.1), seed=1,
                                    max_rows=2, store=store), [[1, 2]])
    state = emb.table.state_dict()
    train(emb, [[3, 4], [5, 6]])  # rows the state lacks, some evicted to the store
    before = by_id(emb.table.export())
    in_memory = emb.table.size()
    with pytest.raises(de.StoreError, match="delete refused"):
        emb.table.load_state_dict(state)
    assert emb.table.size() == in_memory
    assert all(torch.equal(before[k], by_id(emb.table.export())[k]) for k in ("ids", "counts"))
    store.fail = False
    emb.table.load_state_dict(state)  # the retry completes the load
    assert sorted(emb.table.export().ids.tolist()) == [1, 2]


def test_failed_write_through_says_the_update_is_in_memory_and_flush_writes_it():
    class FailingPuts(MemoryStore):
        fail = False

        def _put(self, ids, values):
            if self.fail:
                raise de.StoreError(f"{self.name}: write refused")
            return super()._put(ids, values)

    store = FailingPuts()
    emb = de.DynamicEmbedding(dim=2, optimizer=de.optim.SGD(lr=0.5), seed=1, store=store,
                              write_policy="through")
    train(emb, [[1]])
    before = emb.table.find([1]).values.clone()
    out = emb(torch.tensor([1])).sum()
    store.fail = True
    with pytest.raises(de.StoreError, match="do not apply the change again"):
        out.backward()
    updated = emb.table.find([1]).values
    torch.testing.assert_close(updated, before - 0.5)  # applied once, in memory
    store.fail = False
    assert emb.table.flush() == 1  # the marked row is written now
    found, rows = store.get(np.array([1]))
    assert found.all() and np.array_equal(rows.weights, updated.numpy())


def test_clear_counts_stored_rows_and_read_backs_count_as_loaded():
    emb = train(de.DynamicEmbedding(dim=2, optimizer=de.optim.SGD(lr=0.1), seed=1, max_rows=4,
                                    store=MemoryStore()), [[2 * i, 2 * i + 1] for i in range(5)])
    assert emb.table.size() == 4 and len(emb.table.export().ids) == 10
    emb.table.clear()
    assert emb.table.stats().totals.erased == 10  # once 4: the rows in memory only
    train(emb, [[1, 2, 3]])
    state = emb.table.state_dict()
    train(emb, [[4, 5, 6]])
    emb.table.load_state_dict(state)  # the saved counters; the rows it replaces are no erase
    totals = emb.table.stats().totals
    assert totals.erased == 10 and totals.inserts == int(state["counters.inserts"])

    table = DynamicTable(TableConfig(dim=2, seed=1, max_rows=4, store=MemoryStore()))
    table.find_or_insert(torch.arange(4))
    table.evict(rows=4)
    before = table.stats().totals
    table.find_or_insert(torch.arange(4))  # every row read back from the store
    after = table.stats().totals
    assert after.loaded - before.loaded == 4 and after.inserts == before.inserts


def test_a_clear_that_fails_part_way_loses_no_row_still_in_memory():
    """Stored copies deleted before the failure, of rows clean in memory: those rows were
    never written again, and vanished at their eviction."""

    class PartialDeletes(MemoryStore):
        fail = False

        def _delete(self, ids):
            if self.fail:
                super()._delete(ids[: ids.shape[0] // 2])
                raise de.StoreError(f"{self.name}: delete cut short")
            return super()._delete(ids)

    store = PartialDeletes()
    table = DynamicTable(TableConfig(dim=2, seed=1, max_rows=40, store=store))
    table.find_or_insert(np.arange(40))
    table.flush()  # every row stored and clean
    store.fail = True
    with pytest.raises(de.StoreError, match="cut short"):
        table.clear()
    store.fail = False
    assert table.contains(np.arange(40)).all()
    table.evict(rows=40)  # everything leaves memory: written back, not dropped
    assert table.contains(np.arange(40)).all()


def test_clear_store_keeps_the_rows_in_memory_reaching_the_store():
    """clear_store marked the rows in memory clean: an eviction then dropped them, uncounted,
    and flush wrote nothing."""
    store = MemoryStore()
    table = de.DynamicTable(de.TableConfig(dim=4, seed=1, store=store,
                                           eviction=de.policy.LRU()))
    before = table.find_or_insert(torch.arange(4)).values.clone()
    table.flush()
    table.clear_store()
    assert store.size() == 0 and table.size() == 4
    assert table.evict(4) == 4
    assert store.size() == 4 and table.contains(torch.arange(4)).all()
    torch.testing.assert_close(table.find(torch.arange(4)).values, before)


def _small_stored_table(**options):
    return de.DynamicTable(de.TableConfig(dim=4, optimizer=de.optim.SGD(lr=0.1), seed=1,
                                          max_rows=4, store=MemoryStore(), **options))


def test_clear_store_erases_the_rows_only_the_store_held(tmp_path):
    """They were gone but recorded nowhere: a delta saved next loaded them back, a lazily
    opened checkpoint's older copy came back, and a pending gradient landed on a new row
    of the same key."""
    table = _small_stored_table()
    table.insert_or_assign(torch.arange(8), torch.ones(8, 4))  # 4 in memory, 4 in the store
    de.checkpoint.save(tmp_path / "a", tables={"t": table})
    in_memory = table.index.find(np.arange(8)) != -1
    assert in_memory.sum() == 4 and table.contains(torch.arange(8)).all()
    assert table.clear_store() == 4 and table.stats().totals.erased == 4
    assert table.contains(torch.arange(8)).tolist() == in_memory.tolist()
    de.checkpoint.save(tmp_path / "b", tables={"t": table}, parent=tmp_path / "a")
    loaded = _small_stored_table()
    de.checkpoint.load(tmp_path / "b", tables={"t": loaded})
    assert loaded.contains(torch.arange(8)).tolist() == in_memory.tolist()

    lazy = _small_stored_table()
    de.checkpoint.load(tmp_path / "a", tables={"t": lazy}, lazy=True)
    lazy.assign(torch.tensor([7]), torch.full((1, 4), 2.0))
    lazy.evict(4)  # the newer row 7 goes to the store
    lazy.clear_store()
    assert not lazy.find(torch.tensor([7])).found.any()  # not the checkpoint's 1.0

    emb = de.DynamicEmbedding(table=_small_stored_table(update_mode="deferred"))
    emb(torch.tensor([42])).sum().backward()  # queued
    emb.table.evict(4)
    emb.table.clear_store()  # row 42 is gone
    emb.table.insert_or_assign(torch.tensor([42]), torch.zeros(1, 4))
    de.sparse_step(emb)
    assert torch.equal(emb.table.find(torch.tensor([42])).values, torch.zeros(1, 4))
    assert emb.table.stats().totals.skipped_gradients == 1


def test_stored_rows_are_read_in_blocks_of_chunk_rows():
    """rows_below_memory read the store in blocks of 65,536 whatever chunk_rows said, so
    top_k(chunk_rows=) did not bound its score blocks for stored rows."""
    table = de.DynamicTable(de.TableConfig(dim=4, seed=1, store=MemoryStore(),
                                           eviction=de.policy.LRU()))
    table.find_or_insert(torch.arange(500))
    table.evict(450)
    blocks = [len(b) for b in table.rows_below_memory(chunk_rows=64)]
    assert sum(blocks) == 450 and max(blocks) <= 64


@pytest.mark.parametrize("free", ["erase", "evict"])
def test_freeing_rows_in_batches_stays_within_the_memory_budget(free):
    """The free-slot stack doubled past the 8 bytes a row the budget counts for it."""
    table = DynamicTable(TableConfig(dim=16, optimizer=de.optim.Adagrad(lr=0.1),
                                     memory_budget=np.int64(256 * 1024), store=MemoryStore(),
                                     eviction=de.policy.LRU()))
    n = table.max_rows
    ids = np.arange(n, dtype=np.int64)
    table.lookup_slots(ids, np.ones(n, dtype=np.int64), insert=True)
    if free == "erase":
        table.erase(ids[:-1])
        table.erase(ids[-1:])
    else:
        table.evict(np.int64(n - 1))
        table.evict(1)
    assert table.size() == 0
    assert table.stats().bytes_allocated <= 256 * 1024


def test_a_store_of_another_optimizer_or_hash_seed_is_refused(tmp_path):
    """Only dim and state width were checked: an FTRL table took an Adam table's rows
    (same width: the moments read as z and n), and a table of another hash_seed opened
    the store and found none of its string keys."""
    path = str(tmp_path / "db")
    adam = de.DynamicEmbedding(dim=4, optimizer=de.optim.Adam(lr=0.1), seed=1, max_rows=20,
                               store=RocksDBStore(path))
    train(adam, [np.arange(i * 10, i * 10 + 15) for i in range(5)])
    adam.table.close()
    for options, field in (({"optimizer": de.optim.FTRL(lr=0.1)}, "'optimizer': 'Adam'"),
                           ({"optimizer": de.optim.Adam(lr=0.1), "hash_seed": 7},
                            "'hash_seed': 0")):
        store = RocksDBStore(path)
        with pytest.raises(de.errors.StoreCorruptError, match=field):
            de.DynamicEmbedding(dim=4, seed=1, store=store, **options)
        store.close()
    sgd_path = str(tmp_path / "sgd")
    sgd = de.DynamicEmbedding(dim=4, optimizer=de.optim.SGD(lr=0.1), seed=1, max_rows=20,
                              store=RocksDBStore(sgd_path))
    train(sgd, [np.arange(15), np.arange(15, 30)])
    sgd.table.close()
    reader = de.DynamicEmbedding(dim=4, seed=1, store=RocksDBStore(sgd_path))  # no optimizer
    assert reader.table.count_below_memory() > 0  # an evaluation table reads trained rows
    reader.table.close()


def test_close_twice_is_a_no_op(tmp_path):
    """The second close raised "is closed; open a new store object", though closing a
    store is documented as idempotent."""
    emb = de.DynamicEmbedding(dim=2, optimizer=de.optim.SGD(lr=0.1), seed=1, max_rows=8,
                              store=RocksDBStore(str(tmp_path / "db")))
    train(emb, [np.arange(8), np.arange(8, 16)])
    emb.table.close()
    emb.table.close()
    assert emb.table.tier._store.closed


def test_close_after_the_store_was_closed_still_says_the_rows_are_not_written(tmp_path):
    """A second-close shortcut that read the store's flag returned quietly here, and the
    table's changed rows were lost without a word."""
    store = RocksDBStore(str(tmp_path / "db"))
    emb = de.DynamicEmbedding(dim=2, optimizer=de.optim.SGD(lr=0.1), seed=1, store=store)
    train(emb, [np.arange(8)])
    store.close()
    with pytest.raises(de.errors.StoreError, match="is closed"):
        emb.table.close()


def test_clear_store_without_a_store_or_on_a_read_only_table():
    """Without a store it raised a bare AttributeError; on a read-only table (a serving
    copy over the store a training job writes) it emptied the shared store."""
    assert de.DynamicTable(de.TableConfig(dim=4)).clear_store() == 0
    store = MemoryStore()
    trained = de.DynamicTable(de.TableConfig(dim=4, seed=1, store=store))
    trained.find_or_insert(torch.arange(4))
    trained.flush()
    reader = de.DynamicTable(de.TableConfig(dim=4, store=store, read_only=True))
    with pytest.raises(de.errors.ReadOnlyTableError, match="clear_store: the table is read-only"):
        reader.clear_store()
    assert store.size() == 4


def test_a_spread_scan_of_a_shard_sees_only_its_own_buckets():
    """A shard over a shared store sweeps its own rows, never another shard's."""
    from dynembed.keys.buckets import buckets_of
    store = MemoryStore()
    table = DynamicTable(TableConfig(dim=2, seed=1, store=store))
    table.find_or_insert(np.arange(200))
    table.flush()
    table.tier.owned = (range(2048), 4096)
    seen, cursor = [], None
    while True:
        block, cursor = table.tier.scan_from(cursor, 16)
        seen.append(block.ids)
        if cursor is None:
            break
    seen = np.concatenate(seen)
    mine = np.arange(200)[buckets_of(np.arange(200), 4096) < 2048]
    assert 0 < mine.shape[0] < 200
    assert np.array_equal(np.sort(seen), mine)
