"""A Redis Cluster node out of memory: the error must not claim the batch was refused whole
(a cluster pipeline has no transaction, so the other nodes took their part)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import redis

from dynembed.errors import StoreFullError
from dynembed.storage import RedisStore

from .test_conformance import rows

_namespaces = itertools.count()


def test_a_cluster_write_refused_by_one_full_node_does_not_claim_nothing_was_written(
        redis_cluster):
    store = RedisStore(redis_cluster.url, namespace=f"full{next(_namespaces)}", shards=16,
                       cluster=True)
    store.bind(256, 0)
    node = redis_cluster.servers[1]
    admin = redis.Redis(host="127.0.0.1", port=node.port)
    used = int(admin.info("memory")["used_memory"])
    admin.config_set("maxmemory-policy", "noeviction")
    admin.config_set("maxmemory", used + 200_000)  # room for a few hundred of the rows
    try:
        batch = rows(range(3000), dim=256, width=0)  # ~3 MB over three nodes
        with pytest.raises(StoreFullError, match="out of memory") as info:
            store.put(batch)
        written = int(store.get(batch.ids)[0].sum())
    finally:
        admin.config_set("maxmemory", 0)
        admin.close()
    assert 0 < written < 3000  # the other nodes took their part
    assert "nothing of this batch was applied" not in str(info.value)
    assert "part of this batch may have been written" in str(info.value)
    store.clear()
    store.close()


def test_a_standalone_write_refused_for_memory_says_nothing_was_written(redis_server):
    store = RedisStore(redis_server.url, namespace=f"full{next(_namespaces)}", shards=4)
    store.bind(4, 2)
    admin = redis.Redis.from_url(redis_server.url)
    admin.config_set("maxmemory-policy", "noeviction")
    admin.config_set("maxmemory", 1)
    try:
        with pytest.raises(StoreFullError, match="nothing of this batch was applied"):
            store.put(rows(np.arange(10)))
    finally:
        admin.config_set("maxmemory", 0)
        admin.close()
    assert store.size() == 0
    store.close()
