"""RedisStore's URL and options: refused by name where redis-py would misread them, and
failures while scanning that must not pass for a complete scan."""

from __future__ import annotations

import numpy as np
import pytest
import redis

from dynembed.errors import StoreCorruptError, StoreError, StoreUnavailableError
from dynembed.storage import MemoryStore, RedisStore, RocksDBStore
from dynembed.testing import RedisServer

from .test_conformance import rows


def with_path(url: str, path: str) -> str:
    """``url`` (``redis://127.0.0.1:port/0``) with another path and query."""
    return url.rsplit("/", 1)[0] + path


@pytest.mark.parametrize("path", ["/1/2", "/0/extra", "/abc", "/-1", "/?db=x"])
def test_a_database_path_redis_py_misreads_is_refused_naming_the_url(redis_server, path):
    """redis-py drops a path that is not a bare number and uses database 0 ("/0/extra",
    "/abc"), or glues its digits together ("/1/2" is database 12): the table's rows went to
    another database than the one named, silently."""
    url = with_path(redis_server.url, path)
    with pytest.raises(ValueError, match=r"url .* not a database number.*host:port/db"):
        RedisStore(url, namespace="misread")


def test_a_database_path_with_a_trailing_slash_is_that_database(redis_server):
    store = RedisStore(with_path(redis_server.url, "/3/"), namespace="slash")
    store.bind(4, 2)
    store.close()
    admin = redis.Redis.from_url(with_path(redis_server.url, "/3"))
    try:
        assert admin.exists(b"slash:meta")
    finally:
        admin.close()


@pytest.mark.parametrize("url, match", [
    ("redis://127.0.0.1:notaport/0", "url 'redis://127.0.0.1:notaport/0' has a bad port"),
    ("redis://:pw@127.0.0.1:1/0?decode_responses=true", "decode_responses.*bytes"),
])
def test_malformed_urls_are_refused_naming_the_url(url, match):
    """A bad port was redis-py's bare "Port could not be cast"; decode_responses (even
    "=false", a truthy string) made every row a UnicodeDecodeError."""
    with pytest.raises(ValueError, match=match) as info:
        RedisStore(url, namespace="bad")
    assert "pw" not in str(info.value)  # the password stays redacted


def test_an_unknown_url_option_is_refused_naming_the_url(redis_server):
    """It was a bare TypeError from deep in redis-py's connection class."""
    with pytest.raises(ValueError, match=r"url .*has an option redis-py refuses.*'foo'"):
        RedisStore(redis_server.url + "?foo=bar", namespace="bad")


def test_a_cluster_url_with_a_database_is_an_argument_error():
    with pytest.raises(ValueError, match="Redis Cluster has only database 0"):
        RedisStore("redis://127.0.0.1:1/2", namespace="c", cluster=True)


def test_numpy_numbers_are_accepted_as_options(redis_server, tmp_path):
    """shards=np.int64(64) was refused as "not a power of two"; bind(np.int64(4), ...) on a
    new store was json's "int64 is not JSON serializable"."""
    store = RedisStore(redis_server.url, namespace="np", shards=np.int64(8),
                       retries=np.int64(2), timeout=np.float32(2.0))
    assert type(store.shards) is int and store.shards == 8
    store.bind(np.int64(4), np.int64(2))
    store.put(rows([1, 2]))
    assert store.get(np.array([1, 2], dtype=np.int64))[0].all()
    store.close()
    rocks = RocksDBStore(tmp_path / "db", cache_bytes=np.int64(1 << 20))
    rocks.bind(np.int32(4), np.int32(2))
    rocks.close()


@pytest.mark.parametrize("dim, width, match", [
    (0, 2, "dim must be an int >= 1, got 0"), (4, -1, "width must be an int >= 0, got -1"),
    (4.0, 2, "dim must be an int"), (True, 2, "dim must be an int")])
def test_bind_refuses_bad_dims_by_name(dim, width, match):
    with pytest.raises(ValueError, match=match):
        MemoryStore().bind(dim, width)


def clients(url: str) -> int:
    admin = redis.Redis.from_url(url)
    try:
        return int(admin.info("clients")["connected_clients"]) - 1  # not this one
    finally:
        admin.close()


def test_a_cluster_node_opened_as_a_standalone_server_is_refused(redis_cluster):
    """Each node answers for its own slots only: cluster=False worked for some ids and
    failed with MOVED for others, in the middle of training."""
    before = clients(redis_cluster.url)
    with pytest.raises(StoreError, match="is a Redis Cluster node; pass cluster=True"):
        RedisStore(redis_cluster.url, namespace="wrong-mode")
    assert clients(redis_cluster.url) == before  # the refused store left no socket open


def test_a_standalone_server_opened_as_a_cluster_is_named(redis_server):
    """It read "the server is unreachable ... check that it runs"; it runs."""
    with pytest.raises(StoreError, match="not a Redis Cluster node.*pass cluster=False") as info:
        RedisStore(redis_server.url, namespace="wrong-mode", cluster=True, retries=0)
    assert not isinstance(info.value, StoreUnavailableError)


def big_store(url: str, namespace: str, **kwargs) -> RedisStore:
    """A bound single-hash store with enough rows that HSCAN answers in several pages."""
    store = RedisStore(url, namespace=namespace, shards=1, **kwargs)
    store.bind(2, 0)
    store.put(rows(range(2000), dim=2, width=0))
    return store


def test_a_redis_scan_left_open_stops_at_close(redis_server):
    """redis-py reconnects a closed client: the scan went on reading the closed store (and
    left a new socket open)."""
    store = big_store(redis_server.url, "scan-close")
    scan = store.scan(batch_size=100)
    assert len(next(scan)) <= 100
    store.close()
    with pytest.raises(StoreError, match="is closed"):
        next(scan)


def test_a_redis_server_that_lost_its_data_mid_scan_fails_the_scan():
    """A server restarted without persistence answered the rest of the scan as empty
    hashes: the scan ended early and passed for the whole store (a flush or checkpoint
    reading it would silently miss rows)."""
    with RedisServer() as server:
        store = big_store(server.url, "scan-lost", retries=40, backoff_base=0.02,
                          backoff_cap=0.2, timeout=1.0)
        scan = store.scan(batch_size=100)
        seen = len(next(scan))
        server.stop()
        server.start()  # no persistence: the namespace is gone
        with pytest.raises(StoreCorruptError, match="no longer holds the description"):
            for block in scan:
                seen += len(block)
        assert seen < 2000
        store.close()
