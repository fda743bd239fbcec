"""Shared fixtures: real local servers for the storage tests (loopback only, stopped after)."""

from __future__ import annotations

import pytest

from dynembed.testing import RedisCluster, RedisServer


@pytest.fixture(scope="session")
def redis_server():
    """A real redis-server on a free 127.0.0.1 port for the whole session."""
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="session")
def redis_cluster():
    """A real 3-node Redis Cluster on 127.0.0.1 for the whole session."""
    with RedisCluster() as cluster:
        yield cluster
