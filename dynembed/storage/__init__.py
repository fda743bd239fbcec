"""Storage tiers under a table's memory: the EmbeddingStore protocol and its backends."""

from dynembed.storage.base import EmbeddingStore
from dynembed.storage.memory import MemoryStore
from dynembed.storage.redis import RedisStore
from dynembed.storage.rocksdb import RocksDBStore
from dynembed.storage.rows import LAYOUT_VERSION, RowBlock, RowCodec

__all__ = [
           "LAYOUT_VERSION",
           "EmbeddingStore",
           "MemoryStore",
           "RedisStore",
           "RocksDBStore",
           "RowBlock",
           "RowCodec",
]
