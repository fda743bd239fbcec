"""The clock record a table keeps in its store, on every backend: apart from the rows,
overwritten by each flush, dropped with the rows."""

from __future__ import annotations

import pytest
import redis

from dynembed.errors import StoreCorruptError, StoreError
from dynembed.storage import MemoryStore, RedisStore, RocksDBStore

from .test_conformance import BACKENDS, make_store, rows


@pytest.fixture(params=BACKENDS)
def store(request, tmp_path):
    """A bound store of each backend (as the conformance suite's)."""
    s = make_store(request.param, request, tmp_path)
    s.bind(4, 2)
    yield s
    s.close()


def test_a_new_store_has_no_clock(store):
    assert store.read_clock() is None


def test_the_clock_round_trips_and_is_overwritten(store):
    store.write_clock({"step": 7, "update_step": 5})
    assert store.read_clock() == {"step": 7, "update_step": 5}
    store.write_clock({"step": 2**62, "update_step": 0})  # a later flush, or a restore's
    assert store.read_clock() == {"step": 2**62, "update_step": 0}


def test_the_seed_round_trips_and_records_without_one_read_without_one(store):
    store.write_clock({"step": 7, "update_step": 5, "seed": 2**64 - 1})
    assert store.read_clock() == {"step": 7, "update_step": 5, "seed": 2**64 - 1}
    store.write_clock({"step": 8, "update_step": 6, "seed": None})  # not recorded
    assert store.read_clock() == {"step": 8, "update_step": 6}


def test_the_clock_is_not_a_row(store):
    store.put(rows([1, 2, 3]))
    store.write_clock({"step": 3, "update_step": 3})
    assert store.size() == 3
    assert sorted(i for block in store.scan(2) for i in block.ids.tolist()) == [1, 2, 3]


def test_clear_and_drop_clock_remove_the_clock(store):
    store.put(rows([1]))
    store.write_clock({"step": 3, "update_step": 3})
    store.clear()
    assert store.read_clock() is None and store.size() == 0
    store.write_clock({"step": 4, "update_step": 4})
    store.drop_clock()
    store.drop_clock()  # absent is fine
    assert store.read_clock() is None
    store.bind(4, 2)  # the description stayed


@pytest.mark.parametrize("clock, error", [
    ({"step": 1}, ValueError), ({"step": -1, "update_step": 0}, ValueError),
    ({"step": 1.5, "update_step": 0}, ValueError),
    ({"step": True, "update_step": 0}, ValueError), ([1, 2], TypeError),
    ({"step": 1, "update_step": 0, "seed": -1}, ValueError),
    ({"step": 1, "update_step": 0, "seed": 2**64}, ValueError),
    ({"step": 1, "update_step": 0, "seed": 1.5}, ValueError)])
def test_a_bad_clock_is_refused_and_the_record_kept(store, clock, error):
    store.write_clock({"step": 1, "update_step": 1})
    with pytest.raises(error):
        store.write_clock(clock)
    assert store.read_clock() == {"step": 1, "update_step": 1}


def test_a_damaged_clock_record_is_corruption(store):
    store._put_clock(b"not json")  # what another program might write there
    with pytest.raises(StoreCorruptError, match="clock record"):
        store.read_clock()
    store.drop_clock()  # the way out the message names
    assert store.read_clock() is None


@pytest.mark.parametrize("seed", [b"-1", b"1.5", b"true", str(2**64).encode()])
def test_a_damaged_seed_is_corruption(store, seed):
    store._put_clock(b'{"step": 4, "update_step": 3, "seed": ' + seed + b"}")
    with pytest.raises(StoreCorruptError, match="clock record"):
        store.read_clock()


def test_a_later_version_s_fields_are_ignored(store):
    store._put_clock(b'{"step": 4, "update_step": 3, "epoch": 9}')
    assert store.read_clock() == {"step": 4, "update_step": 3}


def test_an_unbound_or_closed_store_refuses_the_clock():
    unbound = MemoryStore()
    with pytest.raises(StoreError, match="not bound"):
        unbound.write_clock({"step": 1, "update_step": 1})
    unbound.close()
    with pytest.raises(StoreError, match="closed"):
        unbound.read_clock()


def test_the_rocksdb_clock_survives_reopening(tmp_path):
    with RocksDBStore(tmp_path / "db") as written:
        written.bind(4, 2)
        written.put(rows([1]))
        written.write_clock({"step": 9, "update_step": 8})
    with RocksDBStore(tmp_path / "db") as reopened:
        assert reopened.read_clock() == {"step": 9, "update_step": 8}


def test_a_redis_clock_left_without_its_description_is_not_adopted(redis_server):
    """A server that lost (or evicted) the description record lost the rows too: a store
    bound anew there must not offer the clock of rows no longer there."""
    first = RedisStore(redis_server.url, namespace="clock-orphan", shards=2)
    first.bind(4, 2)
    first.write_clock({"step": 5, "update_step": 5})
    client = redis.Redis.from_url(redis_server.url)
    try:
        client.delete(b"clock-orphan:meta")
        with pytest.raises(StoreCorruptError, match="description record"):
            first.write_clock({"step": 6, "update_step": 6})  # a flush notices the loss
        again = RedisStore(redis_server.url, namespace="clock-orphan", shards=2)
        again.bind(4, 2)
        assert again.read_clock() is None
        assert client.exists(b"clock-orphan:clock") == 0
        again.close()
    finally:
        client.close()
        first.close()


def test_admission_state_and_logged_keys_round_trip(store):
    state = bytes(range(256)) * 3
    store.write_clock({"step": 7, "update_step": 5, "seed": 1, "admission": state,
                       "logged_keys": 12})
    assert store.read_clock() == {"step": 7, "update_step": 5, "seed": 1,
                                  "admission": state, "logged_keys": 12}
    with pytest.raises(TypeError, match="admission must be bytes"):
        store.write_clock({"step": 1, "update_step": 1, "admission": "text"})
    store._put_clock(b'{"step": 4, "update_step": 3, "admission": "not base64!"}')
    with pytest.raises(StoreCorruptError, match="admission state is not base64"):
        store.read_clock()
