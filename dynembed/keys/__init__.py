"""Keys: str/bytes/int input -> int64 ids (a fixed seeded hash), and the optional key log."""

from dynembed.keys.convert import KeyBatch, to_jagged, to_key_batch, validate_offsets
from dynembed.keys.hashing import DEFAULT_HASH_SEED, hash_bytes, hash_strings
from dynembed.keys.key_log import KeyLog

__all__ = [
           "DEFAULT_HASH_SEED",
           "KeyBatch",
           "KeyLog",
           "hash_bytes",
           "hash_strings",
           "to_jagged",
           "to_key_batch",
           "validate_offsets",
]
