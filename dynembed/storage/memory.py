"""MemoryStore: a store in a Python dict, for tests and small jobs."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterator
from itertools import islice, repeat

import numpy as np

from dynembed.storage.base import EmbeddingStore
from dynembed.storage.rows import decode_ids, encode_ids


class MemoryStore(EmbeddingStore):
    """Rows in process memory, in the same binary layout as the other backends.

    Batch operations run as C-level ``map``/``zip`` over the dict (no per-key Python code).
    Nothing survives the process.
    """

    def __init__(self) -> None:
        super().__init__()
        self.name = f"MemoryStore(at {id(self):#x})"
        self._rows: dict[bytes, bytes] = {}
        self._meta: bytes | None = None
        self._clock: bytes | None = None
        self._lock = threading.Lock()

    def _get(self, ids: np.ndarray) -> list:
        with self._lock:
            return list(map(self._rows.get, encode_ids(ids)))

    def _put(self, ids: np.ndarray, values: list[bytes]) -> None:
        with self._lock:
            self._rows.update(zip(encode_ids(ids), values))

    def _delete(self, ids: np.ndarray) -> None:
        with self._lock:
            deque(map(self._rows.pop, encode_ids(ids), repeat(None)), maxlen=0)

    def _scan(self, batch_size: int) -> Iterator[tuple[np.ndarray, list]]:
        with self._lock:
            items = list(self._rows.items())  # a snapshot: writes during the scan are safe
        it = iter(items)
        while chunk := list(islice(it, batch_size)):
            keys, values = zip(*chunk)
            yield decode_ids(list(keys)), list(values)

    def _count(self) -> int:
        return len(self._rows)

    def _get_meta(self) -> bytes | None:
        return self._meta

    def _put_meta(self, value: bytes) -> None:
        self._meta = value

    def _get_clock(self) -> bytes | None:
        return self._clock

    def _put_clock(self, value: bytes) -> None:
        self._clock = value

    def _delete_clock(self) -> None:
        self._clock = None
