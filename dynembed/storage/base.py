"""EmbeddingStore: the protocol every storage tier implements.

A store keeps rows (weights, optimizer state, metadata) of one table by id, in the binary
layout of :mod:`dynembed.storage.rows`, plus one description record (layout, dims) kept
apart from the rows so that every int64 id is a valid key. The public verbs take and
return :class:`RowBlock` batches; a backend implements a few byte-level primitives
(``_get``, ``_put``, ``_delete``, ``_scan``, ``_count``, ``_get_meta``, ``_put_meta``,
``_flush``, ``_close``) on ids and encoded records. Each primitive must
apply a batch whole or not at all and raise a :class:`~dynembed.errors.StoreError` naming the
store and the cause.
"""

from __future__ import annotations

import json
import numbers
from abc import ABC, abstractmethod
from collections.abc import Iterator

import numpy as np
from typing_extensions import Self

from dynembed.errors import StoreCorruptError, StoreError
from dynembed.storage.rows import LAYOUT_VERSION, RowBlock, RowCodec


def _as_ids(ids, arg: str = "ids") -> np.ndarray:
    ids = np.asarray(ids)
    if ids.ndim != 1 or ids.dtype != np.int64:
        raise ValueError(f"{arg} must be a 1-D int64 array, got shape {ids.shape} and dtype "
                         f"{ids.dtype}; convert keys with table.ids_of(keys).ids")
    return np.ascontiguousarray(ids)


def _as_size(arg: str, value, minimum: int) -> int:
    """``value`` as a Python int: numpy integers count (JSON cannot write them into the
    description record), bools and other numbers do not."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral) \
            or value < minimum:
        raise ValueError(f"{arg} must be an int >= {minimum}, got {value!r}")
    return int(value)


class EmbeddingStore(ABC):
    """Rows of one table kept outside memory (or in a plain dict, for tests and small jobs).

    A table binds its store with :meth:`bind` before use, which checks that rows already in
    the store have the table's dim and optimizer state width.
    """

    name: str = "store"
    """How errors refer to this store (backend and location)."""
    background_io: bool = False
    """Whether a table writes evicted rows on its background thread (write-behind) rather
    than in the lookup that evicts them. Worth it only where the client releases the GIL
    while it works (RocksDB) and a core is free; a client that works in Python (redis-py
    packs every argument in Python) would hold the GIL and stall the training thread.
    Off by default; a store's constructor or attribute turns it on."""

    shared: bool = False
    """Whether processes on several machines may use this very store at once (a Redis
    namespace): the shards of a distributed table then see each other's rows in it, and
    each one scans and clears only the rows of the key buckets it owns."""

    def __init__(self) -> None:
        self.codec: RowCodec | None = None
        self.closed = False

    # ------------------------------------------------------------------ protocol
    def bind(self, dim: int, width: int, meaning: dict | None = None) -> None:
        """Fixes the row layout; checks it against what the store already holds.

        Args:
            dim: row width.
            width: optimizer state floats per row.
            meaning: more that rows of the same layout must share to mean the same (a
                table gives its optimizer and string hash seed: Adam's moments read as
                FTRL's state, or keys hashed with another seed, would be silently wrong).

        Raises:
            StoreCorruptError: the store holds rows of another dim, optimizer width or
                meaning.
            ValueError: dim is not an int >= 1, or width not an int >= 0.
        """
        self._check_open()
        dim, width = _as_size("dim", dim, 1), _as_size("width", width, 0)
        want = {"layout": LAYOUT_VERSION, "dim": dim, "width": width, **self._layout(),
                **(meaning or {})}
        meta = self._get_meta()
        if meta is None:  # a new store: describe it, unless another process just did
            self._put_meta(json.dumps(want).encode())
            meta = self._get_meta()
        try:
            have = json.loads(bytes(meta))
        except ValueError:
            have = None
        if not isinstance(have, dict) or "dim" not in have:
            raise StoreCorruptError(f"{self.name}: its description record is not a dynembed "
                                    "store's (not a JSON object with the row layout); the "
                                    "store is corrupted, or another program wrote it")
        # a record from before a field existed (e.g. Redis shards) leaves it unchecked
        if any(have.get(key, value) != value for key, value in want.items()):
            raise StoreCorruptError(
                f"{self.name} holds rows with {have}, but the table needs {want}; use "
                "another path/namespace or a table (and store options) that match")
        self.codec = RowCodec(dim, width, self.name)

    def get(self, ids) -> tuple[np.ndarray, RowBlock]:
        """Reads rows of ids in one batched call.

        Args:
            ids: (n,) int64.

        Returns:
            ((n,) bool found mask, RowBlock of the found rows, in the order of ``ids``).
        """
        ids = _as_ids(ids)
        codec = self._codec()
        if ids.shape[0] == 0:
            return np.zeros(0, bool), RowBlock.concat([], codec.dim, codec.width)
        return codec.decode(ids, self._get(ids))

    def put(self, rows: RowBlock) -> None:
        """Writes rows (insert or overwrite), all or none."""
        codec = self._codec()  # a closed or unbound store refuses even an empty batch
        if len(rows):
            self._put(_as_ids(rows.ids, "rows.ids"), codec.encode(rows))

    def delete(self, ids) -> None:
        """Removes ids (absent ids are ignored), all or none."""
        ids = _as_ids(ids)
        self._check_open()
        if ids.shape[0]:
            self._delete(ids)

    def scan(self, batch_size: int = 65536) -> Iterator[RowBlock]:
        """Every stored row, in blocks of at most ``batch_size`` (order is the backend's)."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) \
                or batch_size <= 0:
            raise ValueError(f"batch_size must be an int > 0, got {batch_size!r}")
        batch_size = int(batch_size)
        codec = self._codec()
        for ids, values in self._scan(batch_size):
            # a backend may answer more at once (Redis's HSCAN COUNT is only a hint)
            for start in range(0, ids.shape[0], batch_size):
                self._check_open()  # closed between two blocks: stop, even mid-answer
                yield codec.decode_present(ids[start:start + batch_size],
                                           values[start:start + batch_size])
        self._check_open()  # a store closed mid-scan ends it with an error, not early

    def size(self) -> int:
        """Rows stored (exact; may cost a scan on some backends, see each backend)."""
        self._check_open()
        return self._count()

    def clear(self) -> None:
        """Removes every row (the layout description stays)."""
        for block in self.scan():
            self.delete(block.ids)

    def flush(self) -> None:
        """Makes every write so far durable as far as the backend allows."""
        self._check_open()
        self._flush()

    def close(self) -> None:
        """Flushes and releases the backend (idempotent)."""
        if not self.closed:
            try:
                self._flush()
            finally:
                self.closed = True
                self._close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return self.name

    # ------------------------------------------------------------------ helpers
    def _check_open(self) -> None:
        if self.closed:
            raise StoreError(f"{self.name} is closed; open a new store object")

    def _codec(self) -> RowCodec:
        self._check_open()
        if self.codec is None:
            raise StoreError(f"{self.name} is not bound to a table; pass it as store= to a "
                             "table, or call bind(dim, width) first")
        return self.codec

    def _layout(self) -> dict:
        """Backend options that decide where rows live, recorded and checked by bind."""
        return {}

    # ------------------------------------------------------------------ backend primitives
    @abstractmethod
    def _get(self, ids: np.ndarray) -> list:
        """Records of ids (``bytes``-like, or None where absent), in order."""

    @abstractmethod
    def _put(self, ids: np.ndarray, values: list[bytes]) -> None:
        """Writes records atomically."""

    @abstractmethod
    def _delete(self, ids: np.ndarray) -> None:
        """Deletes ids atomically."""

    @abstractmethod
    def _scan(self, batch_size: int) -> Iterator[tuple[np.ndarray, list]]:
        """Yields (ids, records) of every row (not the description record)."""

    @abstractmethod
    def _count(self) -> int:
        """Rows stored (not the description record)."""

    @abstractmethod
    def _get_meta(self) -> bytes | None:
        """The description record, None if absent."""

    @abstractmethod
    def _put_meta(self, value: bytes) -> None:
        """Writes the description record if there is none (a shared store keeps the first)."""

    def _flush(self) -> None:
        """Makes writes durable (no-op by default)."""

    def _close(self) -> None:
        """Releases resources (no-op by default)."""
