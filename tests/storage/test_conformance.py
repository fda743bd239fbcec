"""One conformance suite, run against every EmbeddingStore backend."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dynembed.errors import StoreCorruptError, StoreError
from dynembed.storage import MemoryStore, RedisStore, RocksDBStore, RowBlock

BACKENDS = ["memory", "rocksdb", "redis", "redis-cluster"]
_namespaces = itertools.count()


def make_store(kind, request, tmp_path):
    if kind == "memory":
        return MemoryStore()
    if kind == "rocksdb":
        return RocksDBStore(tmp_path / f"rocks{next(_namespaces)}")
    if kind == "redis":
        server = request.getfixturevalue("redis_server")
        return RedisStore(server.url, namespace=f"conf{next(_namespaces)}", shards=8)
    cluster = request.getfixturevalue("redis_cluster")
    return RedisStore(cluster.url, namespace=f"conf{next(_namespaces)}", cluster=True)


@pytest.fixture(params=BACKENDS)
def store(request, tmp_path):
    s = make_store(request.param, request, tmp_path)
    s.bind(4, 2)
    yield s
    s.close()


def rows(ids, seed=0, dim=4, width=2) -> RowBlock:
    ids = np.asarray(ids, dtype=np.int64)
    rng = np.random.default_rng(seed)
    n = ids.shape[0]
    return RowBlock(ids, rng.standard_normal((n, dim)).astype(np.float32),
                    rng.standard_normal((n, width)).astype(np.float32),
                    rng.integers(0, 2**40, n), rng.integers(-5, 2**40, n))


def assert_rows_equal(a: RowBlock, b: RowBlock) -> None:
    for field in ("ids", "weights", "state", "counts", "last_step"):
        x, y = getattr(a, field), getattr(b, field)
        assert x.dtype == y.dtype and x.shape == y.shape, field
        assert x.tobytes() == y.tobytes(), field  # bit-exact, NaN payloads included


EXTREMES = [0, 1, -1, 2**63 - 1, -(2**63) + 1, 12345678901234, -987654321]


def test_put_get_round_trip_is_bit_exact(store):
    block = rows(EXTREMES)
    block.weights[0, 0] = np.float32("nan")
    block.weights[1, 1] = np.float32("-inf")
    block.weights[2, 2] = np.float32(-0.0)
    store.put(block)
    found, got = store.get(block.ids)
    assert found.all()
    assert_rows_equal(got, block)


def test_get_reports_absent_ids_and_keeps_order(store):
    store.put(rows([5, 7, 9]))
    found, got = store.get(np.array([9, 8, 5, 100, 7], dtype=np.int64))
    assert found.tolist() == [True, False, True, False, True]
    assert got.ids.tolist() == [9, 5, 7]
    expected = rows([5, 7, 9])
    assert_rows_equal(got.take(np.array([1, 2, 0])), expected)


def test_put_overwrites(store):
    store.put(rows([1, 2], seed=1))
    newer = rows([2], seed=2)
    store.put(newer)
    _, got = store.get(np.array([2], dtype=np.int64))
    assert_rows_equal(got, newer)
    assert store.size() == 2


def test_delete_and_size(store):
    store.put(rows(range(100)))
    assert store.size() == 100
    store.delete(np.array([3, 4, 1000], dtype=np.int64))  # an absent id is ignored
    assert store.size() == 98
    found, _ = store.get(np.array([3, 4, 5], dtype=np.int64))
    assert found.tolist() == [False, False, True]


def test_scan_returns_every_row_once(store):
    block = rows(np.arange(-500, 500) * 7919)
    store.put(block)
    seen = list(store.scan(batch_size=np.int64(64)))
    assert all(len(b) <= 64 for b in seen)  # Redis's HSCAN once gave a whole small hash
    ids = np.concatenate([b.ids for b in seen])
    assert np.array_equal(np.sort(ids), np.sort(block.ids))
    merged = RowBlock.concat(seen, 4, 2)
    order = np.argsort(merged.ids)
    assert_rows_equal(merged.take(order), block.take(np.argsort(block.ids)))


@pytest.mark.parametrize("batch", [1, 7, 64])
def test_a_scan_spread_over_calls_sees_every_row_that_stays(store, batch):
    """A sweep's scan, one block per call, while rows are written and deleted between
    calls: every row there from start to end is seen, none twice, in blocks of about
    ``batch``."""
    stays = np.arange(-60, 60, dtype=np.int64) * 1_000_003
    leaves = stays[::3] + 1
    store.put(rows(np.concatenate([stays, leaves])))
    seen, cursor, calls = [], None, 0
    while True:
        block, cursor = store.scan_from(cursor, batch)
        calls += 1
        assert len(block) <= batch + 40  # a backend may answer a little more
        seen.append(block.ids)
        if calls == 2:
            store.delete(leaves)
            store.put(rows(stays[:5] + 2))  # new rows may be seen or not
        if cursor is None:
            break
        assert calls < 1000
    seen = np.concatenate(seen)
    assert np.isin(stays, seen).all()
    assert np.unique(seen).shape[0] == seen.shape[0]
    assert np.isin(seen, np.concatenate([stays, leaves, stays[:5] + 2])).all()
    with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
        store.scan_from(None, 0)
    store.close()
    with pytest.raises(StoreError):
        store.scan_from(None, 8)


def test_clear_empties_the_store(store):
    store.put(rows(range(50)))
    store.clear()
    assert store.size() == 0
    assert not store.get(np.arange(50, dtype=np.int64))[0].any()


def test_empty_batches_are_fine(store):
    empty = np.empty(0, dtype=np.int64)
    found, got = store.get(empty)
    assert found.shape == (0,) and len(got) == 0
    store.put(rows([]))
    store.delete(empty)
    assert store.size() == 0


def test_flush_then_close_then_use_raises(store):
    store.put(rows([1]))
    store.flush()
    store.close()
    with pytest.raises(StoreError, match="closed"):
        store.get(np.array([1], dtype=np.int64))


def test_rebinding_with_other_dims_is_refused(request, tmp_path):
    for kind in ("rocksdb", "redis"):
        first = make_store(kind, request, tmp_path)
        first.bind(4, 2)
        first.put(rows([1]))
        if kind == "rocksdb":
            first.close()
            second = RocksDBStore(first.path)
        else:
            second = RedisStore(first.url, namespace=first.namespace, shards=8)
        with pytest.raises(StoreCorruptError, match="dim"):
            second.bind(8, 2)
        second.bind(4, 2)  # the right dims are accepted and the row is there
        assert second.get(np.array([1], dtype=np.int64))[0].all()
        second.close()
        first.close()


def test_bad_ids_are_refused(store):
    with pytest.raises(ValueError, match="ids"):
        store.get(np.array([1.5]))
    with pytest.raises(ValueError, match="ids"):
        store.delete(np.array([[1, 2]], dtype=np.int64))
    with pytest.raises(ValueError, match="batch_size"):
        next(store.scan(batch_size=0))


def test_unbound_store_explains_itself():
    with pytest.raises(StoreError, match="bind"):
        MemoryStore().get(np.array([1], dtype=np.int64))


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["put", "delete"]),
                          st.lists(st.integers(-(2**63) + 1, 2**63 - 1), max_size=20)),
                max_size=12))
def test_backends_agree_with_a_dict(tmp_path_factory, ops):
    """Property: after any sequence of batch puts and deletes, RocksDB holds what a dict
    model holds (the memory backend is checked the same way)."""
    stores = [MemoryStore(), RocksDBStore(tmp_path_factory.mktemp("prop"))]
    model: dict[int, bytes] = {}  # id -> the weights bytes last written
    for s in stores:
        s.bind(4, 2)
    for step, (op, keys) in enumerate(ops):
        ids = np.array(keys, dtype=np.int64)
        if op == "put":
            uniq = np.unique(ids)
            block = rows(uniq, seed=step)
            for s in stores:
                s.put(block)
            model.update(zip(uniq.tolist(), (w.tobytes() for w in block.weights)))
        else:
            for s in stores:
                s.delete(ids)
            for i in keys:
                model.pop(i, None)
    probe = np.array(sorted(model) + [7, -7], dtype=np.int64)
    for s in stores:
        assert s.size() == len(model)
        found, got = s.get(probe)
        assert found.tolist() == [int(i) in model for i in probe.tolist()]
        assert [w.tobytes() for w in got.weights] == [model[i] for i in got.ids.tolist()]
        s.close()


def test_every_int64_id_is_a_row_key_even_the_smallest(store):
    """The description record lives apart from rows, so -(2**63) is an ordinary id."""
    block = rows([-(2**63), 0])
    store.put(block)
    assert store.size() == 2
    found, got = store.get(block.ids)
    assert found.all()
    assert_rows_equal(got, block)
    assert sorted(np.concatenate([b.ids for b in store.scan()]).tolist()) == [-(2**63), 0]
    store.delete(np.array([-(2**63)], dtype=np.int64))
    assert store.size() == 1


@pytest.mark.parametrize("record", [b"[1, 2]", b"{}", b"not json", b"7"])
def test_a_description_record_of_another_program_is_named_corruption(record):
    """A JSON record that is not an object was a bare AttributeError; {} passed as a store
    of any layout."""
    store = MemoryStore()
    store._put_meta(record)
    with pytest.raises(StoreCorruptError, match="not a dynembed store's"):
        store.bind(4, 2)
