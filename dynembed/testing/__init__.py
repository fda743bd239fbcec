"""Helpers for tests and benchmarks that need real local servers (loopback only)."""

from dynembed.testing.redis_server import RedisCluster, RedisServer, free_port

__all__ = ["RedisCluster", "RedisServer", "free_port"]
